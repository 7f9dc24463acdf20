"""ViT names <-> blip's :class:`blip.nn.vit.VisionTransformer` (whose names are the original BLIP / timm / EVA ones).

- HF ``vision_model.*`` (``BlipVisionModel``, ``Blip2VisionModel``): :func:`hf_vit_to_ours`, :func:`ours_to_hf_vit`;
- EVA ``eva_vit_g.pth`` / timm-layout files (names are ours): :func:`eva_vit_to_ours`;
- OpenAI CLIP ViT (LAVIS ``clip_vit_L.pth``, ``visual.*``): :func:`clip_vit_to_ours`;
- HF ``CLIPVisionModel`` / ``CLIPModel`` directories: :func:`hf_clip_vision_to_ours`;
- one ViT tower of these layouts for ``model.vision_init``: :func:`hf_clip_tower`, :func:`openai_clip_tower`,
  :func:`timm_tower` (the rows of :data:`blip.convert.formats.FORMATS` that name them).
"""
from __future__ import annotations

import re

import torch

from ..checkpoints import CheckpointError, StateDict
from ..nn.vit import VisionTransformer, resize_pos_embed

VISION_PREFIX = "image_encoder."   # where blip's BLIP-2 models keep their FrozenImageEncoder
# the 40th EVA block (LAVIS builds 39 of them), EVA-CLIP's final norm / head, which LAVIS loads with strict=False
EVA_FILE_UNUSED = [r"norm\.(weight|bias)", r"fc_norm\.(weight|bias)", r"head\.(weight|bias)", r"lm_head\..*"]


# HF vision_model names <-> ours, one table for both directions: "{i}" stands for a block index; a name ending in "."
# is a prefix (the rest of the key is kept), any other is a whole name
_HF_VIT_NAMES = [
    ("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("encoder.layers.{i}.layer_norm1.", "blocks.{i}.norm1."), ("encoder.layers.{i}.layer_norm2.", "blocks.{i}.norm2."),
    ("encoder.layers.{i}.self_attn.qkv.", "blocks.{i}.attn.qkv."),
    ("encoder.layers.{i}.self_attn.projection.", "blocks.{i}.attn.proj."),
    ("encoder.layers.{i}.mlp.", "blocks.{i}.mlp."), ("post_layernorm.", "norm."),
]


def _hf_vit_rules(to_ours: bool) -> list[tuple[re.Pattern, str]]:
    """:data:`_HF_VIT_NAMES` as (pattern, replacement) pairs, HF -> ours or ours -> HF."""
    rules = []
    for hf, ours in _HF_VIT_NAMES:
        src, dst = (hf, ours) if to_ours else (ours, hf)
        pattern = r"(\d+)".join(map(re.escape, src.split("{i}"))) + ("" if src.endswith(".") else "$")
        rules.append((re.compile("^" + pattern), dst.replace("{i}", r"\1")))
    return rules


def _rename(rest: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    """``rest`` renamed by the first rule that matches it; None when none does."""
    for pattern, repl in rules:
        new, hit = pattern.subn(repl, rest)
        if hit:
            return new
    return None


def hf_vit_to_ours(sd: StateDict, src: str, dst: str, qv_bias: bool = False) -> tuple[StateDict, set[str]]:
    """HF ``vision_model.*`` -> ours. With ``qv_bias`` (EVA), HF's fused qkv bias is split into q_bias/v_bias."""
    out: StateDict = {}
    used: set[str] = set()
    rules = _hf_vit_rules(to_ours=True)
    for name, value in sd.items():
        if not name.startswith(src):
            continue
        new = _rename(name[len(src):], rules)
        if new is None:
            continue
        if qv_bias and new.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[dst + new[:-len("qkv.bias")] + "q_bias"] = q
            out[dst + new[:-len("qkv.bias")] + "v_bias"] = v
        else:
            out[dst + new] = value
        used.add(name)
    return out, used


def ours_to_hf_vit(sd: StateDict, src: str, dst: str) -> StateDict:
    """Inverse of :func:`hf_vit_to_ours`; EVA q_bias/v_bias become HF's fused bias with a zero k part."""
    rules = _hf_vit_rules(to_ours=False)
    out: StateDict = {}
    for name, value in sd.items():
        if not name.startswith(src):
            continue
        rest = name[len(src):]
        m = re.match(r"blocks\.(\d+)\.attn\.q_bias$", rest)
        if m:
            v = sd[f"{src}blocks.{m.group(1)}.attn.v_bias"]
            out[f"{dst}encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat([value, torch.zeros_like(value), v])
            continue
        if rest.endswith("attn.v_bias"):
            continue
        new = _rename(rest, rules)
        if new is not None:
            out[dst + new] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# EVA / timm and OpenAI CLIP files

def eva_vit_to_ours(sd: StateDict, dst: str = VISION_PREFIX, depth: int | None = None,
                    num_patches: int | None = None) -> tuple[StateDict, set[str]]:
    """A plain EVA ViT state dict (``eva_vit_g.pth``: ``cls_token``, ``blocks.N.*``...) -> ``{dst}visual_encoder.*``.

    depth: keep blocks ``< depth`` (LAVIS builds EVA ViT-g with 39 of the file's 40 blocks); the others stay unconsumed
    (see :data:`EVA_FILE_UNUSED` for the rest). num_patches: resize ``pos_embed`` bicubically as LAVIS's
    ``interpolate_pos_embed`` does (e.g. 224 -> 364 px models).
    """
    out, used = {}, set()
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.", k)
        if m and depth is not None and int(m.group(1)) >= depth:
            continue
        if m or k in ("cls_token", "pos_embed") or k.startswith("patch_embed."):
            if k == "pos_embed" and num_patches is not None:
                v = resize_pos_embed(v, num_patches)
            out[dst + "visual_encoder." + k] = v
            used.add(k)
    return out, used


def unused_eva_keys(sd: StateDict, used: set[str]) -> list[str]:
    """Keys of an EVA file that :func:`eva_vit_to_ours` did not take and that are not known-harmless."""
    return [k for k in sd if k not in used and not re.match(r"blocks\.\d+\.", k)
            and not any(re.fullmatch(p, k) for p in EVA_FILE_UNUSED)]


_CLIP_SWAPS = [(r"^conv1\.", "patch_embed.proj."), (r"^ln_pre\.", "norm_pre."),
               (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
               (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
               (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
               (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
               (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
               (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2.")]
CLIP_FILE_UNUSED = [r"ln_post\.(weight|bias)", r"proj"]   # OpenAI CLIP's head: LAVIS uses neither


def is_clip_vit(sd: StateDict, src: str = "") -> bool:
    """OpenAI-CLIP-named ViT weights (LAVIS ``clip_vit_L.pth``, ``visual.*`` of an OpenAI CLIP state dict)."""
    return src + "conv1.weight" in sd


def clip_vit_to_ours(sd: StateDict, dst: str = VISION_PREFIX, src: str = "", depth: int | None = None,
                     num_patches: int | None = None) -> tuple[StateDict, set[str]]:
    """OpenAI CLIP ViT names (LAVIS ``clip_vit.py``: ``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``) under
    ``src`` -> ``{dst}visual_encoder.*``. Blocks ``>= depth`` are left unconsumed (LAVIS uses 23 of CLIP-L's 24);
    fairscale's ``_checkpoint_wrapped_module.`` infix is ignored."""
    out, used = {}, set()
    for name, v in sd.items():
        if not name.startswith(src):
            continue
        k = name[len(src):].replace("_checkpoint_wrapped_module.", "")
        m = re.match(r"transformer\.resblocks\.(\d+)\.", k)
        if m and depth is not None and int(m.group(1)) >= depth:
            continue
        if k == "class_embedding":
            new, v = "cls_token", v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            new, v = "pos_embed", v.unsqueeze(0)
            if num_patches is not None:
                v = resize_pos_embed(v, num_patches)
        else:
            for pattern, repl in _CLIP_SWAPS:
                new, hit = re.subn(pattern, repl, k)
                if hit:
                    break
            else:
                continue
        out[dst + "visual_encoder." + new] = v
        used.add(name)
    return out, used


def vision_file_to_ours(sd: StateDict, dst: str = VISION_PREFIX, depth: int | None = None,
                        num_patches: int | None = None) -> StateDict:
    """A frozen-ViT file (EVA ``eva_vit_g.pth`` or CLIP ``clip_vit_L.pth``, optionally ``visual.``-prefixed) ->
    ``{dst}visual_encoder.*``. Raises :class:`CheckpointError` on keys that are neither converted nor known-unused."""
    src = "visual." if is_clip_vit(sd, "visual.") else ""
    if is_clip_vit(sd, src):
        out, used = clip_vit_to_ours(sd, dst, src, depth, num_patches)
        left = [k for k in sd if k not in used and k.startswith(src)
                and not re.match(r"transformer\.resblocks\.\d+\.", k[len(src):])
                and not any(re.fullmatch(p, k[len(src):]) for p in CLIP_FILE_UNUSED)]
    else:
        out, used = eva_vit_to_ours(sd, dst, depth, num_patches)
        left = unused_eva_keys(sd, used)
    if left or not out:
        raise CheckpointError(f"not an EVA or CLIP ViT state dict; unknown keys {left[:6] or list(sd)[:6]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF CLIP directories, and one ViT tower of any layout

def hf_clip_vision_to_ours(sd: StateDict, src: str, depth: int) -> tuple[StateDict, set[str]]:
    """HF ``CLIPVisionModel`` / ``CLIPModel`` (``vision_model.``) keys under ``src`` -> our ViT names (layers
    ``< depth``)."""
    out, used, fused = {}, set(), {}
    swaps = [(r"embeddings\.patch_embedding\.", "patch_embed.proj."), (r"pre_layrnorm\.", "norm_pre."),
             (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
             (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
             (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
             (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.")]
    for name, v in sd.items():
        if not name.startswith(src):
            continue
        k = name[len(src):]
        layer = re.match(r"encoder\.layers\.(\d+)\.", k)
        if layer and int(layer.group(1)) >= depth:
            continue
        qkv = re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif qkv:
            i, which, kind = qkv.groups()
            fused.setdefault(f"blocks.{i}.attn.qkv.{kind}", {})["qkv".index(which)] = v
        else:
            for pattern, repl in swaps:
                new, hit = re.subn("^" + pattern, repl, k)
                if hit:
                    out[new] = v
                    break
            else:
                continue
        used.add(name)
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in range(3)])
    return out, used


def is_hf_clip_vit(sd: StateDict) -> bool:
    """HF ``CLIPVisionModel`` / ``CLIPModel`` weights (``vision_model.`` prefixed or bare)."""
    return any(p + "embeddings.patch_embedding.weight" in sd for p in ("vision_model.", ""))


def is_timm_vit(sd: StateDict) -> bool:
    """A single ViT under timm / EVA names (DeiT, ViT-L in21k, ``eva_vit_g.pth``): our names, no prefix."""
    return "cls_token" in sd and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def _fit_grid(out: StateDict, used: set[str], vit: VisionTransformer) -> tuple[StateDict, set[str], list[str]]:
    """A tower map's result with ``pos_embed`` resized bicubically to ``vit``'s grid (class token kept)."""
    resized, pos, n = [], out.get("pos_embed"), vit.cfg.num_patches
    if pos is not None and pos.shape[1] - 1 != n:
        out["pos_embed"] = resize_pos_embed(pos, n)
        resized.append(f"pos_embed {pos.shape[1]} -> {n + 1} positions (bicubic)")
    return out, used, resized


def _strip_encoder(out: StateDict) -> StateDict:
    return {k[len("visual_encoder."):]: v for k, v in out.items()}


def hf_clip_tower(sd: StateDict, vit: VisionTransformer) -> tuple[StateDict, set[str], list[str]]:
    """HF CLIP weights -> (``vit``'s keys, consumed file keys, resized): layers beyond ``vit``'s depth unused."""
    src = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in sd else ""
    return _fit_grid(*hf_clip_vision_to_ours(sd, src, vit.cfg.depth), vit)


def openai_clip_tower(sd: StateDict, vit: VisionTransformer) -> tuple[StateDict, set[str], list[str]]:
    """OpenAI CLIP ViT weights (bare or under ``visual.``) -> (``vit``'s keys, consumed file keys, resized)."""
    out, used = clip_vit_to_ours(sd, "", "visual." if is_clip_vit(sd, "visual.") else "", vit.cfg.depth)
    return _fit_grid(_strip_encoder(out), used, vit)


def timm_tower(sd: StateDict, vit: VisionTransformer) -> tuple[StateDict, set[str], list[str]]:
    """timm / EVA ViT weights (names are ours) -> (``vit``'s keys, consumed file keys, resized); the final norm
    where ``vit`` has one, the classifier head unused."""
    out, used = eva_vit_to_ours(sd, "", vit.cfg.depth)
    out = _strip_encoder(out)
    if vit.cfg.final_norm:
        for k in ("norm.weight", "norm.bias"):
            if k in sd:
                out[k] = sd[k]
                used.add(k)
    return _fit_grid(out, used, vit)
