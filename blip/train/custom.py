"""``task=custom`` inside a training run: read the user's rows, pick the recipe, fill the settings it owns.

The family of ``init_from`` and the kind of the ``data.train`` rows pick a recipe (:func:`blip.finetune.recipe_for`);
its file ``configs/recipe/<name>.yaml`` fills every setting the command line left null or unset, so a value given on
the command line always wins and the paper's value is used otherwise. The resolved settings (family, kind, recipe,
the base's resolved path) are written into the run's ``config.yaml``, from which :func:`blip.runs.load_run` rebuilds
the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from blip.convert.formats import Checkpoint, read_checkpoint
from blip.data.custom import CustomData, read_custom
from blip.finetune import recipe_for
from blip.models.family import Family
from blip.registry import family

log = logging.getLogger("blip.train")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE_DIR = CONFIGS / "recipe"
# formats whose family is known from the format alone (the rest: from the loaded model)
FORMAT_FAMILY = {"hf-blip": Family.BLIP, "blip": Family.BLIP, "blip-original": Family.BLIP,
                 "hf-blip2": Family.BLIP2_LLM, "lavis-blip2-llm": Family.BLIP2_LLM,
                 "lavis-blip2-stage1": Family.BLIP2_QFORMER}


@dataclass
class CustomSplits:
    train: CustomData
    val: CustomData | None
    base: nn.Module | None = None   # the base model, when telling its family meant loading it (training reuses it)


def source_family(checkpoint: Checkpoint) -> tuple[Family, nn.Module | None]:
    """The model family a checkpoint holds: from its run's config or its format, or else from its model (loaded
    once: the model is returned with it so that it is not read again)."""
    if checkpoint.run is not None:
        run_cfg = OmegaConf.load(checkpoint.run[0])
        return Family(run_cfg.model.get("family") or family(run_cfg.model.arch)), None
    if checkpoint.format.name in FORMAT_FAMILY:
        return FORMAT_FAMILY[checkpoint.format.name], None
    from blip.models.family import family_of
    from blip.runs import load_source
    model = load_source(checkpoint)
    return family_of(model), model


def read_splits(cfg: DictConfig) -> CustomSplits:
    d = cfg.data
    strict = bool(d.get("strict", True))
    train = read_custom(d.train, d.get("image_root"), strict=strict)
    val = read_custom(d.val, d.get("image_root"), strict=strict) if d.get("val") else None
    if val is not None and val.kind != train.kind:
        raise ValueError(f"data.val={d.val} holds {val.kind} rows but data.train={d.train} holds {train.kind} rows: "
                         "evaluate with held-out rows of the kind you train on")
    return CustomSplits(train, val)


def on_gpu(cfg: DictConfig) -> bool:
    import torch
    return cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available()


def recipe_settings(name: str) -> DictConfig:
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"recipe {name!r}: no {path}; known: {known}")
    return OmegaConf.load(path)


def trainer_defaults() -> DictConfig:
    """The fine-tuning trainer group (configs/trainer/finetune.yaml over blip_pretrain.yaml): what task=custom falls
    back to where neither the command line nor the recipe sets a value."""
    group = CONFIGS / "trainer"
    finetune = OmegaConf.load(group / "finetune.yaml")
    bases = [OmegaConf.load(group / f"{name}.yaml") for name in finetune.pop("defaults") if name != "_self_"]
    return OmegaConf.create({"trainer": OmegaConf.merge(*bases, finetune)})


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config mapping."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def fill_open(cfg: DictConfig, settings: DictConfig) -> list[str]:
    """Set each of ``settings``' values where ``cfg`` has null or nothing; returns the keys set."""
    filled = []
    with open_dict(cfg):
        for key, value in leaves(settings):
            if key == "defaults" or OmegaConf.select(cfg, key, default=None) is not None:
                continue
            OmegaConf.update(cfg, key, value, force_add=True)
            filled.append(key)
    return filled


def resolve_custom(cfg: DictConfig) -> CustomSplits:
    """Read the splits, pick and apply the recipe (in place on ``cfg``); returns the splits."""
    splits = read_splits(cfg)
    checkpoint = read_checkpoint(cfg.init_from, "init_from")
    fam, splits.base = source_family(checkpoint)
    name = recipe_for(fam, splits.train.kind) if cfg.get("recipe", "auto") == "auto" else str(cfg.recipe)
    if not on_gpu(cfg):   # the recipes' bf16 autocast and bf16 frozen towers are for GPUs: fp32 on a CPU
        fill_open(cfg, OmegaConf.create({"trainer": {"precision": "fp32", "frozen_dtype": "fp32"}}))
    filled = fill_open(cfg, recipe_settings(name))
    fill_open(cfg, trainer_defaults())
    with open_dict(cfg):
        cfg.recipe = name
        cfg.init_from = str(checkpoint.path.resolve()) if checkpoint.path is not None else str(cfg.init_from)
        cfg.model.family = fam.value
        cfg.data.kind = splits.train.kind
        cfg.model.transform = cfg.model.get("transform") or ("blip" if fam is Family.BLIP else "blip2")
        if cfg.model.get("arch") is None:
            cfg.model.arch = f"{checkpoint.format.name}:{Path(cfg.init_from).name}"
        if cfg.data.get("max_words") is None:
            cfg.data.max_words = 50 if fam is not Family.BLIP else 30
    log.info("task=custom: %d %s rows (%s) from %s; recipe %s (%d settings from it: %s)", len(splits.train.rows),
             splits.train.kind, splits.train.path, cfg.init_from, name, len(filled), ", ".join(filled))
    return splits
