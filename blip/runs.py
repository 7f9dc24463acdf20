"""A training run of ``scripts/train.py`` as a model: ``blip.load(<run dir>)``, ``blip caption --model <run dir>``.

The run-directory layout (``config.yaml``, ``checkpoints/step_*/state.pt``, the newest run of a name) is
:mod:`blip.run_layout`. The model is rebuilt from the run's own config (arch, image size, objective, LLM and its
tokenizer) with the builder training used, never by guessing sizes from tensor shapes, and the newest checkpoint's
weights load into it strictly by name. What comes back is the inference model: the task model of a fine-tuning run, the
Q-Former of a BLIP-2 stage-1 run, the LLM model of a stage-2 run; a BLIP pretraining run holds every head, so it loads
into the ``task`` asked for (default "caption").
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from .checkpoints import CheckpointError
from .finetune import freeze_matching
from .registry import create_model, create_objective
from .convert.formats import Checkpoint, read_checkpoint

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
BLIP_PRETRAIN_TASKS = ("caption", "retrieval", "vqa", "feature_extractor")


def build_model(model_cfg: DictConfig, **extra) -> nn.Module:
    """The training objective of ``(model.arch, model.task)`` from :data:`blip.registry.OBJECTIVES`; ``extra``:
    builder arguments that are not in the config (``qformer_from=`` for the stage-1 -> stage-2 hand-off)."""
    from omegaconf import OmegaConf
    overrides = OmegaConf.to_container(model_cfg.overrides, resolve=True) if model_cfg.get("overrides") else {}
    if model_cfg.get("objective"):   # null: a setting of another objective (BLIP pretraining's, in a task config)
        settings = OmegaConf.to_container(model_cfg.objective, resolve=True)
        overrides["objective"] = {k: v for k, v in settings.items() if v is not None}
    if model_cfg.get("freeze_vit") is not None:   # BLIP-2: false trains the ViT (fine-tuning recipes)
        overrides["freeze_vit"] = bool(model_cfg.freeze_vit)
    for key in ("llm", "llm_tokenizer"):  # BLIP-2 stage 2
        if model_cfg.get(key):
            overrides[key] = model_cfg[key]
    overrides.update({k: v for k, v in extra.items() if v is not None})
    model = create_objective(model_cfg.arch, model_cfg.task, **overrides)
    freeze_matching(model, model_cfg.get("freeze"))
    return model


def load_source(checkpoint: Checkpoint, *, arch: str | None = None, task: str | None = None, llm=None,
                **options) -> nn.Module:
    """The model a recognised checkpoint holds, built by its format's ``load`` (a run: :func:`load_run`)."""
    fmt = checkpoint.format
    if fmt.name == "run":   # rebuilt from its config.yaml through the registry
        return load_run(checkpoint, task)
    if fmt.tower is not None:
        raise CheckpointError(f"{checkpoint.name}: a {fmt.description} holds one {fmt.tower} tower, not a model: "
                              f"train from it with model.{fmt.tower}_init, or load a whole-model checkpoint")
    if fmt.load is None:
        raise CheckpointError(f"{checkpoint.name}: not a BLIP / BLIP-2 checkpoint in any known layout (original "
                              f"BLIP, LAVIS, HF, blip export); first keys: {list(checkpoint.raw)[:5]}")
    return fmt.load(checkpoint, arch=arch, task=task, llm=llm, **options)


def custom_objective(cfg: DictConfig, base: nn.Module | None = None) -> nn.Module:
    """The objective of a ``task=custom`` run, before its own weights: the base (``init_from``, or ``base`` when the
    caller already loaded it) with the run's recipe and adapters applied (:func:`blip.finetune.finetune_objective`)."""
    from .finetune import finetune_objective, load_task
    if base is None:
        base = load_source(read_checkpoint(cfg.init_from, "init_from"),
                           task=load_task(cfg.model.family, cfg.data.kind), llm=cfg.model.get("llm"))
    return finetune_objective(base, cfg.data.kind, cfg.model)


def load_trained_weights(objective: nn.Module, state: dict, source: str) -> None:
    """A custom run's saved weights (its trainable parameters and buffers) into the rebuilt objective: every saved
    key must exist there and every trainable parameter must be saved."""
    own = objective.state_dict()
    unknown = [k for k in state if k not in own]
    trainable = [n for n, p in objective.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in state]
    if unknown or missing:
        raise CheckpointError(f"{source}: does not fit the model its run rebuilds from init_from "
                              f"(not in the model: {unknown[:5]}; trained but not saved: {missing[:5]}); was the "
                              "base checkpoint replaced since training?")
    objective.load_state_dict(state, strict=False)


def load_run(path, task: str | None = None) -> nn.Module:
    """The inference model of a run (see the module docstring), on CPU. path: a run directory, one of its checkpoint
    directories, a folder of runs of one name (its newest run), or their :class:`blip.convert.formats.Checkpoint`."""
    checkpoint = read_checkpoint(path)
    config, ckpt = checkpoint.run or (None, None)
    if config is None:
        raise CheckpointError(f"{checkpoint.name}: not a training run directory (config.yaml + "
                              "checkpoints/step_*/state.pt)")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    state = checkpoint.raw
    if cfg.model.task == "pretrain" and str(cfg.model.arch).startswith("blip_"):
        return _blip_task_from_pretraining(cfg, state, str(ckpt), task or "caption")
    if OmegaConf.select(cfg, "stage.id") == "finetune":   # task=custom: the base, its recipe, the trained weights
        objective = custom_objective(cfg)
        load_trained_weights(objective, state, str(ckpt))
        objective.eval()
        model = objective.model
        log.info("%s: custom run from %s, step %s", checkpoint.name, cfg.init_from, ckpt.name)
        return model
    objective = build_model(cfg.model)
    try:
        objective.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: does not fit the model its run's config.yaml builds ({cfg.model.arch}/"
                              f"{cfg.model.task}): {' '.join(str(e).split())[:600]}") from None
    model = getattr(objective, "model", objective)
    if task is not None and task not in ("qformer", "stage2", cfg.model.task):
        raise CheckpointError(f"{path}: a {cfg.model.arch}/{cfg.model.task} run gives a {type(model).__name__}, not "
                              f"task {task!r}")
    log.info("%s: %s/%s run, step %s", checkpoint.name, cfg.model.arch, cfg.model.task, ckpt.name)
    return model


def _blip_task_from_pretraining(cfg, state: dict, source: str, task: str) -> nn.Module:
    """A BLIP pretraining checkpoint holds the ViT, text encoder, decoder and heads: load the task model's part."""
    from omegaconf import OmegaConf

    from .objectives.blip_pretrain import load_pretrain_weights
    if task not in BLIP_PRETRAIN_TASKS:
        raise CheckpointError(f"{source}: a BLIP pretraining run loads as one of {BLIP_PRETRAIN_TASKS}, not {task!r}")
    overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True) if cfg.model.get("overrides") else {}
    model = create_model(cfg.model.arch, task, **overrides)
    log.info(load_pretrain_weights(model, {k: v for k, v in state.items()}, source).summary())
    return model
