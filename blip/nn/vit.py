"""The one Vision Transformer: BLIP ViT-B/16 and ViT-L/16, EVA ViT-g/14 and CLIP ViT-L/14 are configurations of it.

Parameter names follow timm / the original BLIP and EVA code (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so the
original checkpoints load after stripping their prefix.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import attention, merge_heads


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: str = "qkv"          # "qkv": one bias; "qv": EVA's q_bias + v_bias with k bias fixed at 0; "none"
    layer_norm_eps: float = 1e-6
    final_norm: bool = True        # BLIP: LayerNorm on all tokens; EVA (BLIP-2): none, ln_vision lives outside
    pre_norm: bool = False         # CLIP: LayerNorm after the embeddings (ln_pre)
    patch_bias: bool = True        # CLIP's patch conv has no bias
    act: str = "gelu"              # "gelu" (exact erf) or "quick_gelu" (CLIP)
    drop_path: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (frozen low-precision towers keep fp32 norms)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)
        return super().forward(x)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias == "qkv")
        if cfg.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(cfg.width))
            self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        x = x.to(self.qkv.weight.dtype)  # an fp32 residual stream into low-precision weights
        qkv = self.qkv(x)   # a module call: a LoRA-adapted qkv (blip.models.lora) adds its update
        if hasattr(self, "q_bias"):
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(qkv.dtype)
        qkv = qkv.view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(merge_heads(attention(q, k, v)))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x.to(self.fc1.weight.dtype))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: Tensor, num_patches: int) -> Tensor:
    """Bicubically resize a [1, 1 + N, D] position embedding (CLS first) to ``num_patches`` patch positions.

    Same interpolation as the original BLIP ``interpolate_pos_embed`` (bicubic, align_corners=False, CLS kept),
    e.g. a 224-px checkpoint (197 positions) into a 384-px model (577).
    """
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = int(math.isqrt(old)), int(math.isqrt(num_patches))
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise ValueError(f"position embedding of {old} patches cannot be resized to {num_patches}: not square grids")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, num_patches, dim).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT returning all token features.

    forward(pixel_values [B, 3, H, W]) -> [B, 1 + N, width] (CLS first; final norm applied when configured).
    Images of another size than ``cfg.image_size`` are accepted: the position embedding is resized on the fly.
    The residual stream has the dtype of ``pos_embed``: after :meth:`cast_matmul_weights` (frozen towers in bf16 /
    fp16, as LAVIS stores EVA) the matmuls run in low precision while the stream and the norms stay fp32.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.norm_pre = LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed.is_meta:  # built on the meta device: a checkpoint will assign every tensor
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_image_size(self, image_size: int) -> None:
        """Train at another resolution: the position embedding becomes a parameter of the new grid, resized once
        (bicubic, as BLIP / LAVIS ``interpolate_pos_embed`` at load), e.g. 224 -> 364 px for BLIP-2 fine-tuning."""
        if image_size == self.cfg.image_size:
            return
        self.cfg = replace(self.cfg, image_size=image_size)
        with torch.no_grad():
            resized = resize_pos_embed(self.pos_embed.data, self.cfg.num_patches)
        self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)

    def cast_matmul_weights(self, dtype: torch.dtype) -> "VisionTransformer":
        """Store the Linear / Conv weights and biases in ``dtype`` (LAVIS ``convert_weights_to_fp16``); norms, cls
        and position embeddings and EVA's q/v biases keep their dtype, so the residual stream stays fp32."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.to(dtype)
        return self

    @property
    def width(self) -> int:
        return self.cfg.width

    @staticmethod
    def group_matcher(prefix: str = "") -> dict[str, str]:
        """timm's layer grouping for layer-wise LR decay, for parameters named ``{prefix}...``: "stem" (patch / cls /
        position embeddings, layer 0) and "blocks" (block i is layer i + 1, its index captured)."""
        p = re.escape(prefix)
        return {"stem": rf"^{p}(cls_token|pos_embed|patch_embed|norm_pre)", "blocks": rf"^{p}blocks\.(\d+)\."}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype)).to(self.pos_embed.dtype)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1] - 1:
            pos = resize_pos_embed(pos, x.shape[1])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + pos
        x = self.norm_pre(x)
        for block in self.blocks:
            # not gated on self.training: a frozen ViT stays in eval mode while its LoRA adapters train
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)
