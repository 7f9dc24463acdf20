"""A ViT whose weights are stored in bf16 / fp16 keeps its residual stream in fp32 (LAVIS casts only EVA's Linear and
Conv weights), so it stays closer to the fp32 tower than a fully cast one."""

import copy

import pytest
import torch

from blip import create_model as create
from blip.nn.vit import VisionConfig, VisionTransformer
from blip.train.precision import PrecisionPolicy

EVA_LIKE = VisionConfig(image_size=56, patch_size=14, width=64, depth=8, heads=4, mlp_dim=280, qkv_bias="qv",
                        final_norm=False)


def block_output_dtypes(vit, pixels):
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for b in vit.blocks]
    with torch.no_grad():
        out = vit(pixels)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_keep_an_fp32_stream(dtype, one_thread):
    torch.manual_seed(0)
    ref = VisionTransformer(EVA_LIKE).eval()
    with torch.no_grad():   # EVA-like magnitudes: a large residual stream where bf16 rounding costs the most
        for b in ref.blocks:
            b.attn.q_bias.normal_(0, 0.5)
            b.attn.v_bias.normal_(0, 0.5)
        ref.pos_embed.normal_(0, 2.0)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = ref(pixels)
    mixed = copy.deepcopy(ref).cast_matmul_weights(dtype)
    assert mixed.blocks[0].attn.qkv.weight.dtype == dtype and mixed.blocks[0].norm1.weight.dtype == torch.float32
    got, stream = block_output_dtypes(mixed, pixels)
    assert stream == [torch.float32] * EVA_LIKE.depth and got.dtype == torch.float32
    full, full_stream = block_output_dtypes(copy.deepcopy(ref).to(dtype), pixels.to(dtype))
    assert full_stream == [dtype] * EVA_LIKE.depth
    err_mixed = (got - want).abs().mean().item()
    err_full = (full.float() - want).abs().mean().item()
    assert err_mixed < 0.5 * err_full, (err_mixed, err_full)


def test_training_policy_casts_the_frozen_eva_like_lavis():
    model = create("blip2_tiny_qformer", "qformer")
    assert PrecisionPolicy("bf16", frozen_dtype="bf16").cast_frozen(model) == ["image_encoder.visual_encoder"]
    vit = model.image_encoder.visual_encoder
    assert vit.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert vit.pos_embed.dtype == vit.cls_token.dtype == vit.blocks[0].attn.q_bias.dtype == torch.float32
    _, stream = block_output_dtypes(vit, torch.randn(1, 3, 56, 56))
    assert set(stream) == {torch.float32}
