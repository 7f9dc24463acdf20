"""blip's own BLIP-2 layout: ``.safetensors`` written by :func:`save_safetensors` (the exact config in its metadata,
so ``blip.load(path)`` rebuilds the model, the LLM included) and training checkpoints (an objective's ``model.*``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..checkpoints import CheckpointError, StateDict, load_into, parse_json, safetensors_metadata, write_safetensors
from ..dtypes import dtype_name
from ..models.blip2 import Blip2LLMConfig, qformer_arch_config, qformer_arch_of_widths
from ..models.blip2_llm import Blip2LanguageModel, build, create
from ..models.blip2_qformer import Blip2Qformer, Blip2QformerConfig
from ..models.qformer import QFormerConfig
from ..nn.transformer import TextConfig
from ..nn.vit import VisionConfig
from .blip2_parts import load_parts

QFORMER_PARTS = ("image_encoder", "qformer", "lm_head", "vision_proj", "text_proj", "itm_head", "temp")


def is_ours(sd: StateDict) -> bool:
    """Our BLIP-2 keys, bare or under a training objective's ``model.`` prefix."""
    return "qformer.query_tokens" in sd or "model.qformer.query_tokens" in sd


def unwrap_objective(sd: StateDict) -> StateDict:
    """A training checkpoint of an objective (keys ``model.*``) -> the model's own keys."""
    if "model.qformer.query_tokens" in sd:
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """A BLIP-2 model (or its training objective) as ``.safetensors`` in our layout, the config in the metadata."""
    model = getattr(model, "model", model)
    if isinstance(model, Blip2Qformer):
        meta = {"blip_task": "qformer", "blip_config": json.dumps(dataclasses.asdict(model.cfg)),
                "blip_has_lm_head": str(model.has_lm_head)}
    elif isinstance(model, Blip2LanguageModel):
        meta = {"blip_task": "instruct" if model.instruct else "stage2",
                "blip_config": json.dumps(llm_config_dict(model)),
                "blip_lm_head_tied": str(lm_head_tied(model.llm))}
    else:
        raise TypeError(f"{type(model).__name__} is not a BLIP-2 model")
    return write_safetensors(model.state_dict(), path, {"blip_family": "blip2", **meta})


def llm_config_dict(model: Blip2LanguageModel) -> dict:
    """The model's :class:`Blip2LLMConfig` as JSON-ready values; the LLM as its full HF config (no directory needed
    to rebuild it)."""
    cfg, llm = model.config, model.llm
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d.update(vision=dataclasses.asdict(cfg.vision), qformer=dataclasses.asdict(cfg.qformer),
             llm=json.loads(llm.config.to_json_string(use_diff=False)), frozen_dtype=dtype_name(cfg.frozen_dtype),
             tokenizer=None if cfg.tokenizer is None else str(cfg.tokenizer))
    return d


def lm_head_tied(llm: nn.Module) -> bool:
    """Whether the LLM's output projection is its input embedding matrix. transformers leaves a checkpoint's lm_head
    untied when it differs from the embeddings, whatever the config says (T5 configs always say tied)."""
    out = llm.get_output_embeddings()
    return out is not None and out.weight is llm.get_input_embeddings().weight


def qformer_config_from_dict(d: dict) -> Blip2QformerConfig:
    d = dict(d)
    return Blip2QformerConfig(vision=VisionConfig(**d.pop("vision")), qformer=_qformer(d.pop("qformer")), **d)


def llm_config_from_dict(d: dict) -> Blip2LLMConfig:
    d = dict(d)
    return Blip2LLMConfig(vision=VisionConfig(**d.pop("vision")), qformer=_qformer(d.pop("qformer")), **d)


def _qformer(q: dict) -> QFormerConfig:
    return QFormerConfig(TextConfig(**q["text"]), q["num_query_tokens"])


def load_ours(sd: StateDict, source: str, arch: str | None = None, task: str | None = None, llm=None,
              **overrides) -> nn.Module:
    """A state dict in our layout -> model (config: ``arch``, else the file's metadata, else guessed from the widths
    for Q-Former models). LLM models: ``task`` "stage2" / "instruct" (default: the file's); without the metadata
    they need ``arch`` (and ``llm=`` when the file has no ``llm.*`` weights)."""
    sd = unwrap_objective(sd)
    meta = safetensors_metadata(source, family="blip2")
    saved = parse_json(meta["blip_config"], source, "blip_config metadata") if "blip_config" in meta and arch is None \
        else None
    if any(k.startswith("llm_proj.") for k in sd):
        return _load_llm_model(sd, source, saved, meta, arch, task, llm, overrides)
    if llm is not None:
        raise CheckpointError(f"{source} is a stage-1 (Q-Former) model: it has no language model, drop llm=")
    if saved is not None:
        cfg = dataclasses.replace(qformer_config_from_dict(saved), **overrides)
    else:
        key = (sd["qformer.query_tokens"].shape[-1], sd["image_encoder.ln_vision.weight"].shape[0])
        arch = arch or qformer_arch_of_widths(*key)
        if arch is None:
            raise CheckpointError(f"{source}: cannot tell the arch of a Q-Former of width {key[0]}; pass arch=")
        cfg = qformer_arch_config(arch, **overrides)
    model = Blip2Qformer(cfg)
    model.has_lm_head = meta.get("blip_has_lm_head", "True") == "True"
    report = load_into(model, sd, source)
    report.origins.update({p: source for p in QFORMER_PARTS})
    model.load_report = report
    return model


def _load_llm_model(sd: StateDict, source: str, saved: dict | None, meta: dict, arch: str | None, task: str | None,
                    llm, overrides: dict) -> nn.Module:
    has_llm = any(k.startswith("llm.") for k in sd)
    if not has_llm and llm is None:
        raise CheckpointError(f"{source} carries no LLM weights: pass llm=<HF directory of the language model>")
    if saved is not None:
        if llm is not None:
            saved["llm"] = llm
        model = build(dataclasses.replace(llm_config_from_dict(saved), **overrides), task or meta["blip_task"])
        if meta.get("blip_lm_head_tied") == "False" and lm_head_tied(model.llm):   # untie as it was saved
            head = model.llm.get_output_embeddings()
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    elif arch is not None:
        model = create(arch, task or "stage2", llm=llm, **overrides)
    else:
        raise CheckpointError(f"{source}: a blip-layout BLIP-2 LLM state dict without its config: pass arch= "
                              "(and llm=<HF directory> when the file has no llm.* weights)")
    origins = {"image_encoder": source, "qformer": source, "llm_proj": source, "llm": source if has_llm else str(llm)}
    load_parts(model, sd, source, origins)
    return model
