"""Blip2Qformer mechanics: the ITG mask, query-KV reuse, frozen / low-precision ViT, no image without queries."""
import dataclasses

import pytest
import torch

import blip
from blip import create_model as create
from blip.models import blip2
from blip.nn.vit import LayerNorm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create("blip2_tiny_qformer", "qformer").eval()
    with torch.no_grad():  # larger weights than the init so every path visibly matters
        for p in m.qformer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _inputs(b=2, t=6):
    torch.manual_seed(1)
    px = torch.randn(b, 3, 56, 56)
    ids = torch.randint(1000, 2000, (b, t))
    ids[:, 0] = 30522
    return px, ids


@torch.no_grad()
def test_itg_mask_queries_never_see_text(model):
    px, ids = _inputs()
    vit = model.image_features(px)
    q = model.num_queries
    queries = model.qformer.query_tokens.expand(2, -1, -1)
    joint = model.qformer.transformer(ids, query_embeds=queries, causal=True, prefix_length=q,
                                      encoder_hidden_states=vit)
    other = ids.clone()
    other[:, 1:] = torch.randint(3000, 4000, other[:, 1:].shape)
    joint2 = model.qformer.transformer(other, query_embeds=queries, causal=True, prefix_length=q,
                                       encoder_hidden_states=vit)
    torch.testing.assert_close(joint[:, :q], joint2[:, :q], rtol=0, atol=0)  # queries: identical
    assert (joint[:, q + 1:] - joint2[:, q + 1:]).abs().max() > 1e-2       # text: changed
    # text is causal: position t does not see later text ...
    logits = model(px, ids).logits
    later = ids.clone()
    later[:, 4:] = 7
    torch.testing.assert_close(model(px, later).logits[:, :4], logits[:, :4], rtol=0, atol=1e-6)
    # ... but does see the image through the queries
    assert (model(px.flip(0), ids).logits[:, 0] - logits[:, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_query_kv_reuse_equals_joint_forward(model):
    px, ids = _inputs()
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    vit = model.image_features(px)
    q = model.num_queries
    queries = model.qformer.query_tokens.expand(2, -1, -1)
    full_mask = torch.cat([torch.ones(2, q, dtype=torch.long), am], 1)
    joint = model.qformer.transformer(ids, query_embeds=queries, attention_mask=full_mask, causal=True,
                                      prefix_length=q, encoder_hidden_states=vit)
    reused = model.lm_logits(vit, ids, am)
    keep = am.bool()
    torch.testing.assert_close(reused[keep], model.lm_head(joint[:, q:])[keep], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_greedy_generation_is_the_argmax_of_the_forward(model):
    px, _ = _inputs()
    out = model.generate(px, max_new_tokens=5)
    logits = model(px, out[:, :-1]).logits
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    beams = model.generate(px, max_new_tokens=5, num_beams=3)
    assert beams.shape[0] == 2 and torch.all(beams[:, 0] == 30522)


def test_image_without_queries_is_impossible(model):
    px, ids = _inputs()
    vit = model.image_features(px)
    with pytest.raises(ValueError, match="without query_embeds"):
        model.qformer.transformer(ids, encoder_hidden_states=vit)
    with pytest.raises(ValueError, match="without query_embeds"):
        model.qformer.transformer(ids, cross_kv=model.qformer.transformer.cross_kv(vit))
    with pytest.raises(ValueError, match="image"):
        model.qformer(None, input_ids=ids)


def test_vit_frozen_and_kept_in_eval_mode():
    m = create("blip2_tiny_qformer", "qformer")
    m.train()
    assert not m.image_encoder.visual_encoder.training and m.qformer.training
    assert not any(p.requires_grad for p in m.image_encoder.visual_encoder.parameters())
    assert all(p.requires_grad for p in m.image_encoder.ln_vision.parameters())
    unfrozen = create("blip2_tiny_qformer", "qformer", freeze_vit=False).train()
    assert unfrozen.image_encoder.visual_encoder.training
    assert all(p.requires_grad for p in unfrozen.image_encoder.visual_encoder.parameters())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_vit_keeps_fp32_norms(dtype):
    torch.manual_seed(0)
    ref = create("blip2_tiny_qformer", "qformer").eval()
    low = create("blip2_tiny_qformer", "qformer", vit_dtype=dtype).eval()
    low.load_state_dict(ref.state_dict())
    vit = low.image_encoder.visual_encoder
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert vit.blocks[0].attn.qkv.weight.dtype == want and vit.patch_embed.proj.weight.dtype == want
    assert all(m.weight.dtype == torch.float32 for m in vit.modules() if isinstance(m, LayerNorm))
    assert vit.blocks[0].attn.q_bias.dtype == torch.float32 and vit.pos_embed.dtype == torch.float32
    px, ids = _inputs()
    with torch.no_grad():
        a, b = low.image_features(px), ref.image_features(px)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
        low.itm_logits(px, ids)  # the fp32 Q-Former runs on the low-precision ViT's output


def test_family_plumbing():
    assert {"blip2_vitg_qformer", "blip2_vitL_qformer", "blip2_tiny_qformer"} <= set(blip2.QFORMER_ARCHS)
    assert {("blip2_tiny_qformer", "qformer"), ("blip2_tiny_qformer", "stage1")} <= set(blip.list_models())
    vitg = blip2.QFORMER_ARCHS["blip2_vitg_qformer"]
    assert (vitg.vision.depth, vitg.vision.width, vitg.vision.qkv_bias,
            vitg.vision.final_norm) == (39, 1408, "qv", False)
    assert vitg.qformer.num_query_tokens == 32 and vitg.embed_dim == 256 and vitg.ln_vision_eps == 1e-5
    assert type(blip.create_model("blip2_tiny_qformer", "stage1")).__name__ == "Blip2Stage1Objective"
    from blip.convert.blip2_hf import HF_LOADERS
    from blip.convert.formats import read_checkpoint
    assert {"Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration",
            "InstructBlipForConditionalGeneration"} <= set(HF_LOADERS)
    for keys in ({"query_tokens": torch.zeros(1)}, {"Qformer.bert.x": torch.zeros(1)}):
        assert read_checkpoint(keys).format.name == "lavis-blip2-stage1"
    assert {(arch, "stage2") for arch in blip2.LLM_ARCHS} <= set(blip.list_models())


def _openai_clip_visual(width=32, layers=3, grid=2, embed=16):
    """A random state dict in OpenAI CLIP / LAVIS clip_vit.py naming (``visual.`` prefix, as in a full CLIP file)."""
    g = torch.Generator().manual_seed(2)
    shapes = {"conv1.weight": (width, 3, 14, 14), "class_embedding": (width,),
              "positional_embedding": (grid * grid + 1, width), "ln_pre.weight": (width,), "ln_pre.bias": (width,),
              "ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, embed)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                       p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                       p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                       p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (4 * width, width),
                       p + "mlp.c_fc.bias": (4 * width,), p + "mlp.c_proj.weight": (width, 4 * width),
                       p + "mlp.c_proj.bias": (width,)})
    return {"visual." + k: torch.randn(s, generator=g) * (s[-1] ** -0.5 if len(s) > 1 else 0.5)
            for k, s in shapes.items()}


def test_clip_vit_file_matches_timm_openai_clip():
    """CLIP ViT-L is a configuration of the one ViT: an OpenAI-format file (LAVIS clip_vit_L.pth) loads into it and
    gives timm's output for the same file (timm's own OpenAI converter), LAVIS-style without the last block."""
    import timm
    from timm.models.vision_transformer import _convert_openai_clip

    from blip.convert.vit import vision_file_to_ours
    from blip.models.qformer import CLIP_VIT_L, FrozenImageEncoder
    sd = _openai_clip_visual()
    cfg = dataclasses.replace(CLIP_VIT_L, image_size=28, width=32, depth=2, heads=4, mlp_dim=128)
    ours = FrozenImageEncoder(cfg).eval()
    converted = vision_file_to_ours(sd, dst="", depth=cfg.depth, num_patches=cfg.num_patches)
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.startswith("ln_vision") for k in missing)
    ref = timm.create_model("vit_large_patch14_clip_quickgelu_224", pretrained=False, img_size=28, embed_dim=32,
                            depth=2, num_heads=4, num_classes=0, global_pool="").eval()
    ref_sd = {k: v for k, v in _convert_openai_clip(sd, ref).items()
              if not k.startswith(("blocks.2.", "norm.", "head."))}
    missing, unexpected = ref.load_state_dict(ref_sd, strict=False)
    assert not unexpected and set(missing) <= {"norm.weight", "norm.bias"}
    ref.norm = torch.nn.Identity()   # LAVIS's clip_vit has no ln_post; ln_vision follows instead
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.visual_encoder(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_tiny_stage1_weights_cover_the_tiny_stage2_qformer():
    """blip2_tiny_qformer shares the ViT and Q-Former sizes of the tiny LLM archs (stage 1 -> stage 2 hand-off)."""
    stage1 = create("blip2_tiny_qformer", "qformer").state_dict()
    stage2 = {k: v for k, v in blip.create_model("blip2_tiny_opt", "stage2").state_dict().items()
              if k.startswith(("qformer.", "image_encoder."))}
    assert stage2 and all(k in stage1 and stage1[k].shape == v.shape for k, v in stage2.items())


def test_archs_are_told_from_their_widths_and_a_registered_arch_cannot_change_size():
    from blip.registry import register_qformer_arch
    assert blip2.qformer_arch_of_widths(768, 1408) == "blip2_vitg_qformer"
    assert blip2.qformer_arch_of_widths(768, 1024) == "blip2_vitL_qformer"
    assert blip2.qformer_arch_of_widths(16, 48) == "blip2_lavis_tiny_qformer"   # registered by the conftest
    assert blip2.qformer_arch_of_widths(20, 48) is None
    assert blip2.llm_arch_of_sizes("opt", 32, 48) == "blip2_tiny_opt"
    assert blip2.llm_arch_of_sizes("t5", 32, 40) == "blip2_tiny_t5"
    assert blip2.llm_arch_of_sizes("opt", 32, 2560) is None   # released sizes: the LAVIS converter's table
    with pytest.raises(ValueError, match="already exists"):
        register_qformer_arch("blip2_vitg_qformer", blip2.QFORMER_ARCHS["blip2_tiny_qformer"])
