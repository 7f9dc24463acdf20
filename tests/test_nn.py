"""The nn core: ViT against timm, masks against hand-written ones, the KV cache against a full forward."""
import pytest
import timm
import torch

from blip.nn.attention import attention, causal_mask, padding_mask
from blip.nn.transformer import TextConfig, TextTransformer
from blip.nn.vit import VisionConfig, VisionTransformer, resize_pos_embed


def test_vit_matches_timm():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=48, depth=2, heads=4, mlp_dim=96)
    ours = VisionTransformer(cfg).eval()
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                            depth=2, num_heads=4, mlp_ratio=2.0, num_classes=0, global_pool="").eval()
    for p in ours.parameters():  # non-trivial values everywhere (timm inits biases and norms to constants)
        p.data.normal_(0, 0.5)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_eva_qv_bias_matches_timm_eva():
    torch.manual_seed(1)
    cfg = VisionConfig(image_size=28, patch_size=14, width=32, depth=2, heads=4, mlp_dim=80, qkv_bias="qv",
                       final_norm=False)
    ours = VisionTransformer(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.5)
    ref = timm.create_model("eva_giant_patch14_224", pretrained=False, img_size=28, patch_size=14, embed_dim=32,
                            depth=2, num_heads=4, mlp_ratio=2.5, num_classes=0, global_pool="", use_rot_pos_emb=False,
                            ref_feat_shape=None).eval()
    ref.norm = torch.nn.Identity()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if not k.endswith("k_bias")] and not unexpected, (missing, unexpected)
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(ours(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_pos_embed_resize_keeps_cls_and_grid():
    pe = torch.randn(1, 1 + 4, 8)
    same = resize_pos_embed(pe, 4)
    assert same is pe
    big = resize_pos_embed(pe, 16)
    assert big.shape == (1, 17, 8) and torch.equal(big[:, 0], pe[:, 0])
    # a constant grid stays constant under bicubic interpolation
    const = torch.cat([pe[:, :1], torch.ones(1, 4, 8)], 1)
    torch.testing.assert_close(resize_pos_embed(const, 9)[:, 1:], torch.ones(1, 9, 8))


def test_causal_and_multimodal_causal_masks():
    am = torch.tensor([[1, 1, 1, 1, 0]])
    allowed = causal_mask(am, 5) == 0
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]).bool()
    assert torch.equal(allowed[0, 0], expect)
    # prefix of 2 queries: queries see only queries; text sees queries + earlier text
    allowed = causal_mask(torch.ones(1, 5), 5, prefix_length=2) == 0
    expect = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    assert torch.equal(allowed[0, 0], expect)


def _text_model(**kw):
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=32, encoder_width=24, **kw)
    return TextTransformer(cfg).eval()


def test_kv_cache_decoding_equals_full_forward():
    model = _text_model()
    ids = torch.randint(0, 50, (3, 7))
    am = torch.ones(3, 7, dtype=torch.long)
    am[2, 5:] = 0
    img = torch.randn(3, 5, 24)
    full = model(ids, attention_mask=am, causal=True, encoder_hidden_states=img)
    cache = model.new_cache(3, 10)
    kv = model.cross_kv(img)
    static_mask = torch.cat([am, torch.ones(3, 3, dtype=torch.long)], 1)  # spans the cache; unwritten keys hidden
    steps = [model(ids[:, :3], attention_mask=static_mask, causal=True, cross_kv=kv, cache=cache)]
    for t in range(3, 7):
        steps.append(model(ids[:, t:t + 1], attention_mask=static_mask, causal=True, cross_kv=kv, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1)[am.bool()], full[am.bool()], atol=1e-5, rtol=1e-5)


def test_grouped_cross_attention_equals_repeated_images():
    model = _text_model()
    img = torch.randn(2, 5, 24)
    ids = torch.randint(0, 50, (6, 4))  # 2 images x 3 beams
    a = model(ids, causal=True, encoder_hidden_states=img.repeat_interleave(3, 0))
    b = model(ids, causal=True, encoder_hidden_states=img, beam_group=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_qformer_query_prefix_cache_equals_joint_multimodal_causal_forward():
    model = _text_model(cross_attention_freq=2, cross_attention_queries_only=True, query_ffn=True)
    queries = torch.randn(2, 3, 32)
    ids = torch.randint(0, 50, (2, 4))
    img = torch.randn(2, 5, 24)
    joint = model(ids, query_embeds=queries, causal=True, prefix_length=3, encoder_hidden_states=img)
    cache = model.new_cache(2, 7)
    q = model(query_embeds=queries, encoder_hidden_states=img, cache=cache)
    t = model(ids, attention_mask=torch.ones(2, 7), causal=True, prefix_length=3, cache=cache)
    torch.testing.assert_close(torch.cat([q, t], 1), joint, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_length", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_short_query_path_equals_fused_sdpa(query_length, dtype):
    """Decode-step shapes take the unfused CPU path; it must agree with torch's fused kernel (the reference) with a
    padding mask, in fp32 to 1e-6 and in bf16 to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g).to(dtype) for t in (query_length, 9, 9))
    mask = padding_mask(torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    got = attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    # the padded row equals attention over its 6 tokens alone
    torch.testing.assert_close(attention(q[1:], k[1:, :, :6], v[1:, :, :6]).float(), got[1:].float(),
                               **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
