"""How a training run's model starts: unimodal files (``model.vision_init`` / ``model.text_init``), another run or a
released checkpoint (``init_from``), and a refusal to train against a frozen tower nothing initialised.

``init_from`` is strict: weights load by name (BLIP / LAVIS / HF layouts are converted first), position embeddings
of another grid are resized bicubically (online and momentum ViTs, as BLIP's ``interpolate_pos_embed``), and every
required part of the model (a top-level module with trainable weights) must be covered: a part that loads nothing,
or less than ``init_from_min_fraction`` of its tensors (default all of them), stops the run with a by-name list of
what was loaded, resized, new by design (the model's ``new_on_init_from`` patterns, e.g. BLIP-2's ``llm_proj``)
and ignored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig
from torch import Tensor, nn

from blip.checkpoints import CheckpointError, LoadReport, StateDict, fold_names
from blip.convert.formats import read_checkpoint
from blip.convert.unimodal import init_unimodal, sync_momentum
from blip.nn.vit import resize_pos_embed

log = logging.getLogger("blip.train")


# ---- unimodal ----------------------------------------------------------------------------------------------
def unimodal_init(model: nn.Module, model_cfg: DictConfig, data_cfg: DictConfig, text: bool = True
                  ) -> list[LoadReport]:
    """``model.vision_init`` / ``model.text_init`` (paths, blip.zoo names; ``synthetic``: the cached tiny encoder
    trained on the synthetic shapes, see :mod:`blip.train.synthetic_vision`). ``text=False``: leave text_init to
    the caller (a question-aware BLIP-2 Q-Former takes only its text parts from it, after init_from)."""
    vision, text = model_cfg.get("vision_init"), model_cfg.get("text_init") if text else None
    if vision == "synthetic":
        from blip.nn.vit import VisionTransformer
        from blip.train.synthetic_vision import ensure_synthetic_vision_encoder

        vit = next(m for m in model.modules() if isinstance(m, VisionTransformer))
        synthetic = data_cfg.get("synthetic") or {}
        vision = ensure_synthetic_vision_encoder(vit.cfg, synthetic.get("cache_dir"))
    return init_unimodal(model, vision=vision, text=text) if vision or text else []


def refuse_random_frozen(model: nn.Module, covered: set[str], model_cfg: DictConfig) -> None:
    """Stop if a frozen tower (BLIP-2's image encoder, an LLM) has no weights from any source, unless
    ``model.allow_random_frozen``: training against a random frozen tower learns nothing useful."""
    from blip.train.precision import frozen_towers

    if model_cfg.get("allow_random_frozen"):
        return
    for name, tower in frozen_towers(model):
        if name.split(".")[-1] == "llm" and model_cfg.get("llm"):
            continue   # the HF directory it was built from
        keys = [f"{name}.{k}" for k in tower.state_dict()]
        if not any(k in covered for k in keys):
            raise ValueError(
                f"model {model_cfg.arch}: the frozen {name} would stay at its random initialisation. Set "
                f"model.vision_init=<file or blip.zoo name> (the real-size recipes name theirs under $BLIP_HOME), "
                f"init_from=<a run with this tower>, or model.allow_random_frozen=true to train against it anyway")


# ---- init_from ---------------------------------------------------------------------------------------------
def to_model_names(state: StateDict, own: dict[str, Tensor]) -> StateDict:
    """A checkpoint's weights under our names (``Checkpoint.state``) -> under an objective's ``model.`` when the
    model being initialised is one (a fine-tuning objective around its task model)."""
    wrapped = {k for k in own if k.startswith("model.")}
    if wrapped and len(wrapped) == len(own) and not any(k.startswith("model.") for k in state):
        return {"model." + k: v for k, v in state.items()}
    return dict(state)


def _resize_pos_embeds(state: StateDict, own: dict[str, Tensor]) -> list[str]:
    resized = []
    for k, v in list(state.items()):
        if k.endswith("pos_embed") and k in own and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            state[k] = resize_pos_embed(v, own[k].shape[1] - 1)
            resized.append(f"{k} {v.shape[1]} -> {own[k].shape[1]} positions (bicubic)")
    return resized


def part_of(key: str) -> str:
    """The part a key belongs to: its top-level module (inside an objective's ``model.``); BLIP-2's image encoder
    counts as two parts (the frozen ViT and the trainable ``ln_vision``)."""
    parts = key.split(".")
    start = 1 if parts[0] == "model" and len(parts) > 2 else 0
    depth = 2 if parts[start] == "image_encoder" else 1
    return ".".join(parts[start:start + depth])


def new_by_design(model: nn.Module) -> list[str]:
    """Regexes of keys the model declares new when it starts from another model (``new_on_init_from``)."""
    found = list(getattr(model, "new_on_init_from", ()))
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        found += [r"model\." + p for p in getattr(inner, "new_on_init_from", ())] + list(
            getattr(inner, "new_on_init_from", ()))
    return found


def init_from_checkpoint(model: nn.Module, source: str | Path, min_fraction: float = 1.0,
                         already: set[str] = frozenset()) -> LoadReport:
    """Load ``source`` into ``model`` by name (see the module doc); raises :class:`CheckpointError` when a required
    part is not covered. ``already``: keys an earlier source set (``model.vision_init``: a trainable ViT that a LAVIS
    stage-2 file lacks), which count as covered where the file has none. Returns the report (also logged)."""
    checkpoint = read_checkpoint(source, "init_from")
    path, own = checkpoint.name, model.state_dict()
    state = to_model_names(checkpoint.state, own)
    new = new_by_design(model)
    from blip.convert.blip_nlvr import FROM_SINGLE_MISSING, is_nlvr, twin_from_single
    if is_nlvr(own) and not is_nlvr(state):   # NLVR2 from a single-image run: both branches from its cross-attn
        state, new = twin_from_single(state), new + FROM_SINGLE_MISSING
    report = LoadReport(str(path))
    report.resized = _resize_pos_embeds(state, own)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    required = {part_of(k) for k in trainable}
    short = []
    for part in sorted(required):
        keys = [k for k in own if part_of(k) == part and not any(re.fullmatch(p, k) for p in new)]
        total, got = len(keys), sum(k in usable or k in already for k in keys)
        if total and got < min_fraction * total:
            lacking = fold_names(k for k in keys if k not in usable)[:4]
            short.append(f"{part}: {got / total:.0%} loaded (missing e.g. {lacking})")
    report.loaded = sorted(usable)
    report.expected_missing = [k for k in own if k not in usable and any(re.fullmatch(p, k) for p in new)]
    report.unused = [k for k in state if k not in usable]
    if short:
        raise CheckpointError(f"init_from={path} does not fit {type(model).__name__}: a required part loads less "
                              f"than {min_fraction:.0%}:\n  " + "\n  ".join(short) + f"\n{report.describe()}\n"
                              "Check that the checkpoint is of this architecture (arch, sizes) or lower "
                              "init_from_min_fraction.")
    model.load_state_dict(usable, strict=False)
    sync_momentum(model, loaded=set(usable))
    kept = [k for k in own if k not in usable and k not in report.expected_missing]
    log.info("init_from %s\n%s%s", path, report.describe(),
             f"\n  kept at init ({len(kept)}): {', '.join(fold_names(kept)[:16])}" if kept else "")
    return report


def question_text_init(objective: nn.Module, covered: set[str], text_init: str | Path | None) -> LoadReport:
    """A question-aware (InstructBLIP-structured) model's Q-Former text parts, after ``init_from``: kept when the
    checkpoint had them all (an InstructBLIP file, a stage-1 hand-off), else set from ``model.text_init`` (a stage-1
    BLIP-2 run / file or an HF BERT directory) or the query FFN
    (:func:`blip.convert.blip2_handoff.init_question_text`). A checkpoint holding only some of them is refused."""
    from blip.convert.blip2_handoff import init_question_text
    from blip.models.blip2_finetune import is_question_text_part

    keys = [f"model.{k}" for k in objective.model.state_dict() if is_question_text_part(k)]
    have = [k for k in keys if k in covered]
    if len(have) == len(keys):
        return LoadReport("init_from (text parts)", loaded=have)
    if have:
        raise CheckpointError(f"init_from holds {len(have)} of the Q-Former's {len(keys)} text-part tensors (missing "
                              f"e.g. {fold_names(k for k in keys if k not in covered)[:4]}): a checkpoint either has "
                              "the question-aware text parts or none")
    report = init_question_text(objective.model, text_init)
    report.loaded = [f"model.{k}" for k in report.loaded]
    return report
