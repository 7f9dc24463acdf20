"""Unimodal initialisation against the libraries that wrote the files: timm ViTs (DeiT-B / ViT-L layout), HF BERT
(text encoder, decoder, Q-Former), LAVIS's EVA fixture, HF CLIP."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, CLIPVisionConfig, CLIPVisionModel

from blip import create_model
from blip.checkpoints import CheckpointError
from blip.convert.unimodal import init_text, init_unimodal, init_vision, vision_state_to_ours
from blip.nn.vit import VisionConfig, VisionTransformer
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"
pytestmark = pytest.mark.usefixtures("one_thread")


def timm_vit(**kw):
    """A timm VisionTransformer of BLIP ViT-B layout (class token, qkv bias, final norm, classifier head)."""
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2,
                                                           num_heads=4, mlp_ratio=4.0, num_classes=10, **kw).eval()
    with torch.no_grad():   # timm zero-initialises biases and the head: make every tensor count
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit


def bicubic(pos, side):
    """BLIP's interpolate_pos_embed, written out: class token kept, grid resized bicubically (align_corners=False)."""
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_vit_features_and_384px_pos_embed(tmp_path, fmt):
    vit = timm_vit()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "pth":
        torch.save({"model": vit.state_dict()}, path)     # DeiT's release wraps it in {"model": ...}
    else:
        save_file(vit.state_dict(), str(path))
    model = create_model("blip_tiny", "retrieval", image_size=224)
    report = init_vision(model, path)
    assert sorted(report.unused) == ["head.bias", "head.weight"]
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval().visual_encoder(pixels), vit.forward_features(pixels), atol=1e-5)
    big = create_model("blip_tiny", "pretrain", image_size=384)
    report = init_vision(big, path)
    want = bicubic(vit.pos_embed.detach(), 24)
    assert torch.allclose(big.visual_encoder.pos_embed, want, atol=1e-6)
    assert torch.equal(big.visual_encoder_m.pos_embed, big.visual_encoder.pos_embed)   # momentum copy follows
    assert report.resized == ["visual_encoder.pos_embed 197 -> 577 positions (bicubic)"]


@pytest.mark.parametrize("name,arch", [("deit_base_patch16_224", "blip_base"), ("vit_large_patch16_224", "blip_large")])
def test_real_timm_layouts_fit_blip_vits(name, arch):
    """DeiT-B and ViT-L/16 (in21k head: 21843 classes) as timm builds them, shapes only (meta device)."""
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, num_classes=21843 if "large" in name else 1000)
        ours = create_model(arch, "pretrain", image_size=224).visual_encoder
    converted, used, resized = vision_state_to_ours(theirs.state_dict(), ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert set(theirs.state_dict()) - used == {"head.weight", "head.bias"} and resized == []


def test_vision_file_that_does_not_cover_the_model_is_refused(tmp_path):
    vit = timm_vit()
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"short\.pth.*blocks\.1\."):
        init_vision(create_model("blip_tiny", "caption", image_size=224), tmp_path / "short.pth")
    with pytest.raises(FileNotFoundError, match="vision_init 'missing.pth'"):
        init_vision(create_model("blip_tiny", "caption", image_size=224), "missing.pth")


def bert_dir(tmp_path, hidden, layers, heads, inter):
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, hidden_act="gelu")
    bert = BertForMaskedLM(cfg).eval()
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", bert


def test_bert_dir_into_blip_text_encoder_and_decoder(tmp_path):
    path, mlm = bert_dir(tmp_path, 64, 2, 4, 256)
    model = create_model("blip_tiny", "pretrain", image_size=32).eval()
    rows_before = model.text_encoder.embeddings.word.weight[30522:].clone()
    report = init_text(model, path)
    bert = mlm.bert
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()   # MED has no token types
        ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
        mask = (ids != 0).long()
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.text_encoder(ids, attention_mask=mask)
        assert (got - want)[mask.bool()].abs().max() < 1e-5
        dec = model.text_decoder.transformer.layers[1].self_attn   # the decoder's own self-attention: BERT's too
        q = bert.encoder.layer[1].attention.self.query.weight
        assert torch.equal(dec.qkv.weight[:64], q)
        head = model.text_decoder.lm_head                         # BERT's MLM head, bias grown to 30524
        assert torch.equal(head.dense.weight, mlm.cls.predictions.transform.dense.weight)
        assert torch.equal(head.bias[:30522], mlm.cls.predictions.bias) and head.bias.shape[0] == 30524
    assert torch.equal(model.text_encoder.embeddings.word.weight[30522:], rows_before)   # [DEC] / [ENC] keep init
    assert model.text_decoder.transformer.embeddings is model.text_encoder.embeddings      # BLIP's sharing kept
    assert torch.equal(model.text_encoder_m.layers[0].ffn.fc1.weight, model.text_encoder.layers[0].ffn.fc1.weight)
    assert "text_encoder.embeddings.word 30522 -> 30524 rows (new rows keep their init)" in report.resized
    assert any(".cross_attn." in k for k in report.expected_missing)        # new by design
    assert not any(".cross_attn." in k for k in report.loaded)
    assert "bert.embeddings.token_type_embeddings.weight" in report.unused
    text = report.describe()
    assert "new by design" in text and "text_encoder.layers.N.cross_attn.q" in text


def test_bert_dir_into_qformer_copies_the_query_ffn(tmp_path):
    path, mlm = bert_dir(tmp_path, 32, 4, 4, 128)
    model = create_model("blip2_tiny_qformer", "qformer")
    init_text(model, path)
    bert = mlm.bert
    for i, layer in enumerate(model.qformer.transformer.layers):
        ffn = bert.encoder.layer[i]
        assert torch.equal(layer.ffn_query.fc1.weight, ffn.intermediate.dense.weight)
        assert torch.equal(layer.ffn_query.fc2.bias, ffn.output.dense.bias)
        assert torch.equal(layer.ffn_query.norm.weight, ffn.output.LayerNorm.weight)
        assert layer.ffn_query.fc1.weight.data_ptr() != layer.ffn.fc1.weight.data_ptr()   # a copy, trained apart
    assert model.qformer.transformer.embeddings.word.weight.shape[0] == 30523


def test_eva_fixture_reproduces_lavis_image_embeddings():
    model = create_model("blip2_lavis_tiny_qformer", "qformer").eval()
    reports = init_unimodal(model, vision=LAVIS / "eva_vit_tiny.pth")
    ckpt = torch.load(LAVIS / "blip2_qformer" / "checkpoint_trainable_only.pth", weights_only=True)["model"]
    model.image_encoder.ln_vision.load_state_dict({"weight": ckpt["ln_vision.weight"], "bias": ckpt["ln_vision.bias"]})
    inputs = torch.load(LAVIS / "blip2_qformer" / "inputs.pt", weights_only=True)
    want = torch.load(LAVIS / "blip2_qformer" / "outputs.pt", weights_only=True)["vit_embeds"]
    with torch.no_grad():
        got = model.image_features(inputs["image"])
    assert (got - want).abs().max() < 1e-5
    assert reports[0].loaded and model.init_reports == reports


def test_hf_clip_dir_into_a_clip_shaped_vit(tmp_path):
    torch.manual_seed(2)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14, hidden_act="quick_gelu")
    clip = CLIPVisionModel(cfg).eval()
    clip.save_pretrained(tmp_path / "clip")
    ours = VisionTransformer(VisionConfig(image_size=56, patch_size=14, width=32, depth=2, heads=4, mlp_dim=64,
                                          final_norm=False, pre_norm=True, patch_bias=False, act="quick_gelu",
                                          layer_norm_eps=1e-5)).eval()
    holder = torch.nn.Module()
    holder.visual_encoder = ours
    report = init_vision(holder, tmp_path / "clip")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():   # LAVIS drops CLIP's last block: our 2-block ViT is CLIP's hidden state after block 2
        want = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
        assert (ours(pixels) - want).abs().max() < 1e-5
    assert any("layers.2." in k for k in report.unused) and "post_layernorm.weight" in report.unused


def test_create_model_with_unimodal_files(tmp_path, capsys):
    import blip

    torch.save(timm_vit().state_dict(), tmp_path / "vit.pth")
    path, mlm = bert_dir(tmp_path, 64, 2, 4, 256)
    model = blip.create_model("blip_tiny", "caption", image_size=384, vision_init=tmp_path / "vit.pth",
                              text_init=path)
    assert model.visual_encoder.pos_embed.shape[1] == 577
    assert torch.equal(model.text_decoder.transformer.layers[0].ffn.fc1.weight,
                       mlm.bert.encoder.layer[0].intermediate.dense.weight)
    out = capsys.readouterr().out
    assert "resized (1): visual_encoder.pos_embed 197 -> 577" in out and "new by design" in out
    qformer = blip.create_model("blip2_lavis_tiny_qformer", "qformer", image_size=112,
                                vision_init=LAVIS / "eva_vit_tiny.pth")
    assert qformer.image_encoder.visual_encoder.pos_embed.shape[1] == 65


def test_plain_bert_model_dir_has_no_lm_head(tmp_path):
    """A BertModel directory (no "bert." prefix, no MLM head): the encoder loads, the decoder's LM head is new."""
    from transformers import BertModel

    _, mlm = bert_dir(tmp_path, 64, 2, 4, 256)
    mlm.bert.save_pretrained(tmp_path / "plain")
    model = create_model("blip_tiny", "caption", image_size=32)
    report = init_text(model, tmp_path / "plain")
    plain = BertModel.from_pretrained(tmp_path / "plain")
    assert torch.equal(model.text_decoder.transformer.layers[1].ffn.fc2.weight,
                       plain.encoder.layer[1].output.dense.weight)
    assert {"text_decoder.lm_head.dense.weight", "text_decoder.lm_head.bias"} <= set(report.expected_missing)
