"""BLIP (v1) checkpoints: original salesforce/BLIP and LAVIS ``.pth``, HF transformers directories, our own
safetensors, and export to the HF layout. Pure ``state_dict -> state_dict`` functions plus the loaders.

Formats and what each is expected to carry without use (everything else must load, or loading fails):
- every format: ``*.position_ids`` buffers and the tied LM-head aliases ``cls.predictions.decoder.{weight,bias}``;
- pretraining checkpoints (BLIP ``model_base.pth`` ...): momentum copies ``*_m``, ``image_queue``/``text_queue``/
  ``idx_queue``, ``queue_ptr``/``ptr_queue`` (ours: ``queue.*``), ``temp``; loaded into ``BlipPretrain``
  (task="pretrain") they all load, except ``queue.idx_queue`` which pretraining checkpoints lack;
- a task model takes what it needs: a caption model ignores ``text_encoder``/projections/``itm_head``, retrieval
  and the feature extractor ignore ``text_decoder`` (and the latter ``itm_head``), VQA ignores projections and ITM;
- NLVR2 (``model_base_nlvr.pth``, LAVIS ``blip_nlvr``; started from other checkpoints too): :mod:`.blip_nlvr`.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from ..checkpoints import (CheckpointError, LoadReport, StateDict, build_empty, check_fits_before_building,
                           hf_pretrained, load_into, parse_json, read_hf_config_json, read_state_dict,
                           safetensors_metadata, write_hf_directory, write_safetensors)
from ..models.blip import ARCHS, TASK_CLASSES, BlipConfig, build
from ..models.blip_tasks import BlipCaption, BlipRetrieval, BlipVQA
from ..nn.transformer import TextConfig
from ..nn.vit import VisionConfig, resize_pos_embed
from .bert import bert_to_ours, ours_to_bert
from .blip_nlvr import FROM_SINGLE_MISSING, NLVR_UNUSED, is_nlvr, twin_from_single
from .vit import hf_vit_to_ours, ours_to_hf_vit

ALWAYS_UNUSED = [r".*embeddings\.position_ids", r"text_decoder(_m)?\.cls\.predictions\.decoder\.(weight|bias)"]
PRETRAIN_UNUSED = [r".*_m\..*", r"queue\.(image_queue|text_queue|idx_queue|queue_ptr)", r"temp"]
_QUEUES = {"image_queue": "queue.image_queue", "text_queue": "queue.text_queue", "idx_queue": "queue.idx_queue",
           "queue_ptr": "queue.queue_ptr", "ptr_queue": "queue.queue_ptr"}   # BLIP retrieval says ptr_queue
TASK_UNUSED = {
    "caption": [r"text_encoder\..*", r"(vision_proj|text_proj|itm_head)\..*"],
    "retrieval": [r"text_decoder\..*"],
    "feature_extractor": [r"text_decoder\..*", r"itm_head\..*"],
    "vqa": [r"(vision_proj|text_proj|itm_head)\..*"],
    "nlvr": NLVR_UNUSED,
    "pretrain": [],
}
TASK_MISSING = {"pretrain": [r"queue\.idx_queue"]}   # BLIP pretraining keeps no image-id queue
_LM_HEAD = [("predictions.bias", "bias"), ("predictions.transform.dense.", "dense."),
            ("predictions.transform.LayerNorm.", "norm.")]
_PASS_THROUGH = re.compile(r"(visual_encoder(_m)?|vision_proj(_m)?|text_proj(_m)?|itm_head|cls_head)\.")


def owns(sd: StateDict) -> bool:
    """Original BLIP / LAVIS BLIP / blip's own layout: a timm-named ViT plus MED text towers, and no Q-Former."""
    if "visual_encoder.blocks.0.attn.qkv.weight" not in sd:
        return False
    if any(k.startswith(("Qformer.", "query_tokens", "qformer.")) for k in sd):
        return False
    return any(k.startswith(("text_encoder.", "text_decoder.")) for k in sd)


def is_ours(sd: StateDict) -> bool:
    return any(k.startswith(("text_decoder.transformer.", "text_encoder.layers.")) for k in sd)


def is_pretrain(sd: StateDict) -> bool:
    """Momentum encoders, queues or ``temp``: a pretraining (or BLIP retrieval) checkpoint."""
    return any(k in _QUEUES or re.fullmatch(p, k) for k in sd for p in PRETRAIN_UNUSED)


def original_to_ours(sd: StateDict) -> StateDict:
    """Original BLIP / LAVIS keys -> ours. Keys it does not know are passed through (``load_into`` judges them)."""
    out: StateDict = {}
    used: set[str] = set()
    for tower in ("text_encoder", "text_encoder_m"):
        conv, u = bert_to_ours(sd, f"{tower}.", f"{tower}.")
        out.update(conv), used.update(u)
    for tower in ("text_decoder", "text_decoder_m"):
        conv, u = bert_to_ours(sd, f"{tower}.bert.", f"{tower}.transformer.")
        out.update(conv), used.update(u)
        for src, dst in _LM_HEAD:
            for k, v in sd.items():
                if k.startswith(f"{tower}.cls.{src}"):
                    out[f"{tower}.lm_head.{dst}{k[len(f'{tower}.cls.{src}'):]}"] = v
                    used.add(k)
    out.update({_QUEUES.get(k, k): v for k, v in sd.items() if k not in used})
    return out


def hf_to_ours(sd: StateDict) -> StateDict:
    """HF ``BlipFor*`` keys -> ours: HF renamed only the ViT; the text towers keep the original MED names."""
    vision, used = hf_vit_to_ours(sd, "vision_model.", "visual_encoder.")
    rest = original_to_ours({k: v for k, v in sd.items() if k not in used})
    return {**vision, **rest}


def ours_to_original(sd: StateDict) -> StateDict:
    """Ours -> original BLIP / LAVIS keys (used by the HF export; the tied decoder alias is not written)."""
    out: StateDict = {k: v for k, v in sd.items() if _PASS_THROUGH.match(k)}
    for tower in ("text_encoder", "text_encoder_m"):
        out.update(ours_to_bert(sd, f"{tower}.", f"{tower}."))
    for tower in ("text_decoder", "text_decoder_m"):
        out.update(ours_to_bert(sd, f"{tower}.transformer.", f"{tower}.bert."))
        for src, dst in _LM_HEAD:
            for k, v in sd.items():
                if k.startswith(f"{tower}.lm_head.{dst}"):
                    out[f"{tower}.cls.{src}{k[len(f'{tower}.lm_head.{dst}'):]}"] = v
    return out


def detect_task(sd: StateDict) -> str:
    """Task from the keys (ours or original names): decoder only -> caption; encoder + ITM head -> retrieval (also
    with momentum encoders and queues, as BLIP's retrieval checkpoints); encoder + decoder -> vqa; classifier or
    twin cross-attention -> nlvr. A pretraining checkpoint holds decoder and ITM head: the caller must choose."""
    if is_nlvr(sd):
        return "nlvr"
    has = {p: any(k.startswith(p) for k in sd) for p in ("text_encoder.", "text_decoder.", "itm_head.")}
    if has["text_decoder."] and has["itm_head."]:
        raise CheckpointError("this is a BLIP pretraining checkpoint (text encoder, decoder, ITM head): pass "
                              "task='caption' | 'retrieval' | 'vqa' | 'nlvr' | 'feature_extractor' | 'pretrain'")
    if has["text_decoder."] and has["text_encoder."]:
        return "vqa"
    if has["text_decoder."]:
        return "caption"
    if has["text_encoder."]:
        return "retrieval" if has["itm_head."] else "feature_extractor"
    raise CheckpointError("no BLIP text tower (text_encoder / text_decoder) in the checkpoint")


def _indices(sd: StateDict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def _towers(sd: StateDict) -> list[str]:
    return [t for t in ("text_encoder.", "text_decoder.transformer.") if f"{t}embeddings.word.weight" in sd]


def config_from_state_dict(sd: StateDict, source: str = "<state dict>", heads_given: bool = False) -> BlipConfig:
    """Sizes from tensor shapes (ours layout), for files without metadata and without ``arch=``.

    Head counts are not stored: they come from the known arch with the same widths (whose depths the file must then
    have in full: a missing last block is an error naming it), or from ``vision={"heads": ...}`` /
    ``text={"num_heads": ...}`` (``heads_given``); otherwise a CheckpointError asks for them."""
    v = "visual_encoder."
    blocks = {v: _indices(sd, r"visual_encoder\.blocks\.(\d+)\.")}
    blocks.update({t: _indices(sd, re.escape(t) + r"layers\.(\d+)\.") for t in _towers(sd)})
    for prefix, found in blocks.items():
        gaps = sorted(set(range(max(found, default=-1) + 1)) - set(found))
        if gaps or not found:
            name = "blocks" if prefix == v else "layers"
            raise CheckpointError(f"{source}: {prefix}{name}.{gaps[0] if gaps else 0} is missing (found {found}); "
                                  "the file is incomplete: re-download or re-export it")
    width, patch = sd[v + "cls_token"].shape[-1], sd[v + "patch_embed.proj.weight"].shape[-1]
    vision = VisionConfig(image_size=_checkpoint_image_size(sd), patch_size=patch, width=width,
                          heads=max(width // 64, 1), depth=len(blocks[v]),
                          mlp_dim=sd[v + "blocks.0.mlp.fc1.weight"].shape[0])
    t = _towers(sd)[0]
    hidden = sd[t + "embeddings.word.weight"].shape[1]
    text = TextConfig(vocab_size=sd[t + "embeddings.word.weight"].shape[0], hidden_size=hidden,
                      num_layers=len(blocks[t]), num_heads=max(hidden // 64, 1),
                      intermediate_size=sd[t + "layers.0.ffn.fc1.weight"].shape[0],
                      max_position_embeddings=sd[t + "embeddings.position.weight"].shape[0], encoder_width=width)
    embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    known = next((a for a in ARCHS.values() if (a.vision.width, a.vision.patch_size, a.vision.mlp_dim,
                  a.text.hidden_size, a.text.intermediate_size) == (width, patch, vision.mlp_dim, hidden,
                                                                     text.intermediate_size)), None)
    if known is not None:
        for prefix, want in [(v, known.vision.depth)] + [(t, known.text.num_layers) for t in _towers(sd)]:
            if len(blocks[prefix]) < want:
                name = "blocks" if prefix == v else "layers"
                raise CheckpointError(f"{source}: {prefix}{name}.{len(blocks[prefix])} is missing: the file has "
                                      f"{len(blocks[prefix])} of the {want} its widths imply; re-download or re-export "
                                      "it (or pass arch= with overrides for a deliberately shallower model)")
        vision = replace(vision, heads=known.vision.heads)
        text = replace(text, num_heads=known.text.num_heads)
    elif not heads_given:
        raise CheckpointError(f"{source}: no arch has these widths (vision {width}, text {hidden}) and the file has no "
                              "metadata, so its attention head counts are unknown: pass arch=, or vision={'heads': "
                              "...} and text={'num_heads': ...}")
    return BlipConfig(vision, text, embed_dim=embed_dim)


def _fit_pos_embed(sd: StateDict, model: nn.Module, report: LoadReport) -> None:
    """Bicubic pos-embed interpolation when the checkpoint grid differs (224-px checkpoint -> 384-px model)."""
    own = model.state_dict()
    for key in [k for k in sd if k.endswith("pos_embed") and k in own]:
        old = sd[key].shape[1]
        if old != own[key].shape[1]:
            sd[key] = resize_pos_embed(sd[key], own[key].shape[1] - 1)
            report.resized.append(f"{key} {old}->{own[key].shape[1]} positions")


def load_state(model: nn.Module, sd: StateDict, source: str, task: str, pretrain: bool = False,
               expected_missing: list[str] = ()) -> LoadReport:
    """Load a converted (ours-layout) state dict against the explicit expected-absent / expected-unused lists
    (the task's, plus ``expected_missing`` of the conversion); keep the report."""
    report = LoadReport(source)
    _fit_pos_embed(sd, model, report)
    unused = ALWAYS_UNUSED + TASK_UNUSED.get(task, []) + (PRETRAIN_UNUSED if pretrain else [])
    missing = TASK_MISSING.get(task, []) + list(expected_missing)
    load_into(model, sd, source, expected_missing=missing, expected_unused=unused, report=report)
    model.load_report = report
    return report


def load_original(state_dict: StateDict, source: str, arch: str | None = None, task: str | None = None,
                  llm=None, config: BlipConfig | None = None, **overrides) -> nn.Module:
    """Original BLIP / LAVIS / blip-layout state dict -> task model.

    Config: ``config`` if given, else ``ARCHS[arch]``, else inferred from the shapes; then ``overrides``
    (``image_size=384`` loads a 224-px checkpoint into a 384-px model, ``vision={"heads": 4}``...).
    Image size with ``arch``: a fine-tuned checkpoint of the requested task keeps the resolution it was trained at
    (BLIP VQA: 480); a pretraining checkpoint (224) becomes the arch's (384), pos_embed interpolated bicubically.
    """
    if llm is not None:
        raise ValueError("BLIP (v1) models have no separate language model: drop llm=")
    pretrain = is_pretrain(state_dict)
    sd = dict(state_dict) if is_ours(state_dict) else original_to_ours(state_dict)
    saved = _saved_metadata(source)
    task = task or saved.get("task") or detect_task(sd)
    if config is None:
        if arch is not None:
            config = ARCHS[arch]
            if "image_size" not in overrides and _own_task(sd) == task:
                overrides["image_size"] = _checkpoint_image_size(sd)
        elif "config" in saved:
            config = config_from_dict(saved["config"])
        else:
            heads_given = "heads" in overrides.get("vision", {}) and "num_heads" in overrides.get("text", {})
            config = config_from_state_dict(sd, source, heads_given)
    missing = []
    if task == "nlvr" and not is_nlvr(sd):   # start NLVR2 fine-tuning: both branches from the one cross-attention
        sd, missing = twin_from_single(sd), FROM_SINGLE_MISSING
    config = config.with_overrides(**overrides)
    check_fits_before_building(lambda: build_for_task(config, task), sd, source)
    model = _build_to_load(lambda: build_for_task(config, task), sd)
    load_state(model, sd, source, task, pretrain, missing)
    return model.eval()


def _build_to_load(build: Callable[[], nn.Module], sd: StateDict) -> nn.Module:
    """On the meta device when ``sd`` holds every tensor of the model (``load_state`` then assigns them: no random
    init, one copy of the weights in memory); for real when it lacks some, which keep the model's own init."""
    model = build_empty(build)
    names = [*dict(model.named_parameters(remove_duplicate=False)), *dict(model.named_buffers(remove_duplicate=False))]
    return model if all(name in sd for name in names) else build()


def build_for_task(cfg: BlipConfig, task: str) -> nn.Module:
    """The model a checkpoint of ``task`` loads into: a task model, or for "pretrain" the pretraining objective
    (which holds the momentum encoders and queues of pretraining checkpoints)."""
    if task == "pretrain":
        from ..objectives.blip_pretrain import BlipPretrain
        return BlipPretrain(cfg)
    return build(cfg, task)


def _own_task(sd: StateDict) -> str | None:
    try:
        return detect_task(sd)
    except CheckpointError:
        return None


def _checkpoint_image_size(sd: StateDict) -> int:
    grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
    return grid * sd["visual_encoder.patch_embed.proj.weight"].shape[-1]


def config_from_dict(d: dict) -> BlipConfig:
    return BlipConfig(VisionConfig(**d.pop("vision")), TextConfig(**d.pop("text")), **d)


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Our layout as ``.safetensors`` with the exact config and task in its metadata (``blip.load`` reads them)."""
    model = getattr(model, "model", model)   # a fine-tuning objective holds its task model
    task = next((t for t, c in TASK_CLASSES.items() if type(model) is c), None)
    if task is None:
        raise TypeError(f"{type(model).__name__} is not a BLIP task model")
    meta = {"blip_family": "blip", "blip_task": task, "blip_config": json.dumps(asdict(model.cfg))}
    return write_safetensors(model.state_dict(), path, meta)


def _saved_metadata(source: str) -> dict:
    meta = safetensors_metadata(source)
    out = {}
    if "blip_task" in meta:
        out["task"] = meta["blip_task"]
    if "blip_config" in meta:
        out["config"] = parse_json(meta["blip_config"], source, "blip_config metadata")
    return out


# ---------------------------------------------------------------------------------------------------------------
# HF transformers directories

HF_CLASSES = {"BlipForConditionalGeneration": "caption", "BlipForImageTextRetrieval": "retrieval",
              "BlipForQuestionAnswering": "vqa"}


def config_from_hf(directory: str | Path) -> BlipConfig:
    """config.json (read by transformers' own BlipConfig, so its defaults apply) -> our config."""
    from transformers import BlipConfig as HFBlipConfig
    hf = hf_pretrained(HFBlipConfig, directory)
    vc, tc = hf.vision_config, hf.text_config
    for name, act in (("vision", vc.hidden_act), ("text", tc.hidden_act)):
        if act != "gelu":
            raise CheckpointError(f"{directory}: {name} hidden_act {act!r} is not supported (BLIP uses exact 'gelu')")
    vision = VisionConfig(image_size=vc.image_size, patch_size=vc.patch_size, width=vc.hidden_size,
                          depth=vc.num_hidden_layers, heads=vc.num_attention_heads, mlp_dim=vc.intermediate_size,
                          layer_norm_eps=vc.layer_norm_eps)
    text = TextConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers,
                      num_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
                      max_position_embeddings=tc.max_position_embeddings, layer_norm_eps=tc.layer_norm_eps,
                      encoder_width=vc.hidden_size, hidden_dropout=tc.hidden_dropout_prob,
                      attention_dropout=tc.attention_probs_dropout_prob)
    return BlipConfig(vision, text, embed_dim=hf.image_text_hidden_size, bos_token_id=tc.bos_token_id,
                      sep_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id)


def load_hf(directory: str | Path, task: str | None = None, llm=None, **_) -> nn.Module:
    """An HF ``BlipFor*`` directory (``save_pretrained``) -> our task model."""
    directory = Path(directory)
    if task is None:
        archs = read_hf_config_json(directory).get("architectures") or []
        task = next((HF_CLASSES[a] for a in archs if a in HF_CLASSES), None)
        if task is None:
            raise CheckpointError(f"{directory}: architectures {archs} name no BLIP task model")
    cfg = config_from_hf(directory)
    model = build_empty(lambda: build(cfg, task))
    load_state(model, hf_to_ours(read_state_dict(directory)), str(directory), task)
    return model.eval()


HF_LOADERS = {name: (lambda d, llm=None, _t=task, **kw: load_hf(d, _t, llm, **kw)) for name, task in HF_CLASSES.items()}


def export_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``BlipFor*.from_pretrained`` loads."""
    from transformers import BlipConfig as HFBlipConfig
    classes = {BlipCaption: "BlipForConditionalGeneration", BlipRetrieval: "BlipForImageTextRetrieval",
               BlipVQA: "BlipForQuestionAnswering"}
    name = classes.get(type(model))
    if name is None:
        raise CheckpointError(f"transformers has no class for {type(model).__name__} (exportable: "
                              f"{[c.__name__ for c in classes]}): save it with blip's safetensors instead")
    cfg: BlipConfig = model.cfg
    if isinstance(model, BlipVQA) and cfg.text.hidden_size != cfg.vision.width:
        raise ValueError("HF BlipForQuestionAnswering needs vision width == text hidden size")
    v, t = cfg.vision, cfg.text
    hf = HFBlipConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", initializer_range=0.02),
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size,
                         max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                         encoder_hidden_size=v.width, bos_token_id=cfg.bos_token_id, sep_token_id=cfg.sep_token_id,
                         pad_token_id=cfg.pad_token_id, hidden_act="gelu"),
        image_text_hidden_size=cfg.embed_dim)
    hf.architectures = [name]
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = ours_to_hf_vit(sd, "visual_encoder.", "vision_model.")
    out.update({k: v for k, v in ours_to_original(sd).items() if not k.startswith("visual_encoder.")})
    return write_hf_directory(directory, hf, out)
