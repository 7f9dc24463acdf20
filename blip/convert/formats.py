"""The table of checkpoint formats, and the one reader over it.

Each :class:`Format` says once how to recognise itself and how its keys map to blip's names. :func:`read_checkpoint`
resolves a source (a path, a ``blip.zoo`` name, a run directory, an HF directory, a state dict) and returns a
:class:`Checkpoint`: where it is, its format, its tensors as stored (``raw``) and under our names (``state``). Every
way weights enter a model starts here and keeps only its own policy:

- ``blip.load``: the format's ``load`` builds the model from the file's own config; every key is accounted for;
- ``init_from`` (:mod:`blip.train.init`): by name; each trainable part covered, position embeddings resized;
- ``model.vision_init`` / ``model.text_init`` (:mod:`blip.convert.unimodal`): a one-tower format's ``tower_map``;
- the BLIP-2 stage-1 -> stage-2 hand-off (:func:`blip.convert.blip2_handoff.init_from_stage1`): a stage-1
  format, strictly;
- run directories: :func:`blip.runs.load_run` rebuilds the model from the run's ``config.yaml`` (the registry, one
  layer above this table, builds it), then loads ``raw`` strictly;
- LoRA adapter directories (:mod:`blip.models.lora`): ``blip.load`` builds their base (any row, or a run), then
  attaches the adapters strictly.

To add a format, add a row to :data:`FORMATS` (before any row that would also recognise it) and, next to its key map
in this package, the functions it names; ``docs/design.md`` lists the rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from torch import nn

from ..checkpoints import (CheckpointError, CheckpointNotFoundError, StateDict, read_hf_config_json, read_state_dict,
                           unwrap_state_dict)
from ..models.family import Family, family_of
from ..models.lora import ADAPTER_CONFIG
from ..run_layout import STATE, checkpoint_path, find_run, read_run_weights
from . import blip as blip_convert
from . import blip2 as blip2_convert
from . import blip2_hf, blip2_lavis, blip2_ours
from .bert import text_state_to_ours
from .blip2_parts import is_lavis_blip2
from .vit import hf_clip_tower, is_clip_vit, is_hf_clip_vit, is_timm_vit, openai_clip_tower, timm_tower

TowerMap = Callable[[StateDict, nn.Module], tuple[StateDict, set[str], list[str]]]


@dataclass(frozen=True)
class Format:
    """One checkpoint layout.

    recognise: whether a :class:`Checkpoint` is in this layout (from its path, ``config.json`` or key names).
    to_ours: the whole-model key map, file names -> ours (pure; None for one-tower formats).
    load: ``blip.load``'s builder, ``(checkpoint, arch=, task=, llm=, **options) -> model`` (None: not a model).
    tower, tower_map: the one tower a unimodal file holds ("vision" / "text") and its map onto a given tower.
    """
    name: str
    description: str
    recognise: Callable[[Checkpoint], bool]
    to_ours: Callable[[StateDict], StateDict] | None = None
    load: Callable[..., nn.Module] | None = None
    tower: str | None = None
    tower_map: TowerMap | None = None


class Checkpoint:
    """A source resolved and recognised.

    path: the file, the HF directory or the run's checkpoint directory (None for an in-memory state dict);
    run: ``(config.yaml, checkpoint dir)`` of a training run; format: its row of :data:`FORMATS`;
    raw: the tensors under the file's own names (read once, when first asked for; safetensors stay memory-mapped);
    state: the same tensors under our names (``format.to_ours(raw)``).
    """

    def __init__(self, path: Path | None, raw: StateDict | None = None, run: tuple[Path, Path] | None = None):
        self.path, self.run, self._raw = path, run, raw
        self.format = identify(self)

    @property
    def name(self) -> str:
        return "<state dict>" if self.path is None else str(self.path)

    @property
    def raw(self) -> StateDict:
        if self._raw is None:
            self._raw = read_run_weights(self.run[1])[1] if self.run else read_state_dict(self.path)
        return self._raw

    @cached_property
    def hf_architectures(self) -> list[str]:
        """``config.json["architectures"]`` of an HF directory; [] for anything else."""
        if self.path is None or not self.path.is_dir() or not (self.path / "config.json").is_file():
            return []
        return list(read_hf_config_json(self.path).get("architectures") or [])

    @cached_property
    def state(self) -> StateDict:
        if self.format.to_ours is None:
            raise CheckpointError(f"{self.name} is a {self.format.description}: it holds one {self.format.tower} "
                                  f"tower, not a model; use it as model.{self.format.tower}_init")
        return self.format.to_ours(self.raw)

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, format={self.format.name!r})"


# ---------------------------------------------------------------------------------------------------------------
# the table

def _keys(check: Callable[[StateDict], bool]) -> Callable[[Checkpoint], bool]:
    """A recogniser that reads the file's key names (not HF model directories: their config.json decides)."""
    return lambda c: not c.hf_architectures and check(c.raw)


def _hf(names) -> Callable[[Checkpoint], bool]:
    return lambda c: any(a in names for a in c.hf_architectures)


def _hf_load(loaders: dict) -> Callable[..., nn.Module]:
    def load(c: Checkpoint, arch=None, task=None, llm=None, **options) -> nn.Module:
        name = next(a for a in c.hf_architectures if a in loaders)
        return loaders[name](c.path, llm=llm, **options)
    return load


def _strip_objective(sd: StateDict) -> StateDict:
    """A training objective's weights (every key under ``model.``) -> the model's own names."""
    if sd and all(k.startswith("model.") for k in sd):
        return {k[len("model."):]: v for k, v in sd.items()}
    return sd


def _hf_blip2_to_ours(sd: StateDict) -> StateDict:
    if any(k.startswith("language_projection.") for k in sd):
        return blip2_hf.hf_llm_to_ours(sd, instruct="qformer.embeddings.word_embeddings.weight" in sd)[0]
    return blip2_hf.hf_retrieval_to_ours(sd)[0]


def _is_hf_bert(sd: StateDict) -> bool:
    return any(k.endswith("embeddings.word_embeddings.weight") and k.count(".") <= 4 for k in sd) and \
        any(".encoder.layer.0." in f".{k}" for k in sd) and not any(k.startswith("Qformer.") for k in sd)


def _is_blip_ours(sd: StateDict) -> bool:
    return blip_convert.owns(sd) and blip_convert.is_ours(sd)


def _adapters_hold_no_weights(sd: StateDict) -> StateDict:
    raise CheckpointError("a LoRA adapter directory holds adapters, not a model's weights: load it with "
                          "blip.load(<dir>), or fold them in with `blip convert <dir> out.safetensors --merge` and "
                          "start from that file")


def _is_adapters(c: Checkpoint) -> bool:
    return c.path is not None and c.path.is_dir() and (c.path / ADAPTER_CONFIG).is_file()


def _original_load(family_load: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    return lambda c, **options: family_load(c.raw, c.name, **options)


FORMATS: list[Format] = [
    Format("run", "training run of scripts/train.py (config.yaml + checkpoints/step_*/state.pt)",
           recognise=lambda c: c.run is not None, to_ours=_strip_objective),
    # loaded by blip.load (api.py), which builds the base through this table or blip.runs, then attaches them
    Format("adapters", "LoRA adapter directory (adapter_config.json + adapter_model.safetensors, a base's source)",
           recognise=_is_adapters, to_ours=_adapters_hold_no_weights),
    Format("hf-blip", "HF transformers BlipFor* directory",
           recognise=_hf(blip_convert.HF_CLASSES), to_ours=blip_convert.hf_to_ours,
           load=_hf_load(blip_convert.HF_LOADERS)),
    Format("hf-blip2", "HF transformers Blip2For* / InstructBlipForConditionalGeneration directory",
           recognise=_hf(blip2_hf.HF_LOADERS), to_ours=_hf_blip2_to_ours, load=_hf_load(blip2_hf.HF_LOADERS)),
    # blip's own BLIP-2 layout before LAVIS's: LAVIS InstructBLIP-Vicuna files also say llm_proj
    Format("blip2", "blip BLIP-2 weights (a .safetensors export, a training objective's state)",
           recognise=_keys(blip2_ours.is_ours), to_ours=blip2_ours.unwrap_objective,
           load=_original_load(blip2_convert.load_ours_layout)),
    Format("lavis-blip2-llm", "LAVIS BLIP-2 stage-2 / InstructBLIP .pth (opt_proj, t5_proj, llm_proj)",
           recognise=_keys(lambda sd: is_lavis_blip2(sd) and blip2_lavis.is_lavis_llm(sd)),
           to_ours=lambda sd: blip2_lavis.lavis_llm_to_ours(sd)[0],
           load=_original_load(blip2_lavis.load_lavis_llm)),
    Format("lavis-blip2-stage1", "LAVIS BLIP-2 stage-1 .pth (blip2_pretrained*.pth)",
           recognise=_keys(is_lavis_blip2), to_ours=lambda sd: blip2_lavis.lavis_stage1_to_ours(sd)[0],
           load=_original_load(blip2_convert.load_lavis_stage1_as_task)),
    Format("blip", "blip BLIP weights (a .safetensors export, a training objective's state)",
           recognise=_keys(lambda sd: _is_blip_ours(_strip_objective(sd))),
           to_ours=_strip_objective, load=lambda c, **options: blip_convert.load_original(c.state, c.name, **options)),
    Format("blip-original", "salesforce/BLIP or LAVIS BLIP .pth",
           recognise=_keys(blip_convert.owns), to_ours=blip_convert.original_to_ours,
           load=_original_load(blip_convert.load_original)),
    Format("hf-clip-vision", "HF CLIPVisionModel / CLIPModel weights",
           recognise=lambda c: is_hf_clip_vit(c.raw), tower="vision", tower_map=hf_clip_tower),
    Format("openai-clip-vit", "OpenAI CLIP ViT (LAVIS clip_vit_L.pth, a CLIP state dict's visual.*)",
           recognise=lambda c: is_clip_vit(c.raw) or is_clip_vit(c.raw, "visual."), tower="vision",
           tower_map=openai_clip_tower),
    Format("timm-vit", "timm-layout or EVA ViT (DeiT, ViT-L in21k, eva_vit_g.pth)",
           recognise=lambda c: is_timm_vit(c.raw), tower="vision", tower_map=timm_tower),
    Format("hf-bert", "HF BERT weights (bert-base-uncased)",
           recognise=lambda c: _is_hf_bert(c.raw), tower="text", tower_map=text_state_to_ours),
    # last: tensors no row knows are taken under their own names (init_from then reports what they cover)
    Format("by-name", "state dict in no known layout (its keys taken as blip's names)",
           recognise=_keys(lambda sd: True), to_ours=_strip_objective),
]


def identify(checkpoint: Checkpoint) -> Format:
    """The first row of :data:`FORMATS` that recognises ``checkpoint``; a CheckpointError listing them otherwise."""
    for fmt in FORMATS:
        if fmt.recognise(checkpoint):
            return fmt
    if checkpoint.hf_architectures:
        supported = sorted([*blip_convert.HF_CLASSES, *blip2_hf.HF_LOADERS])
        raise CheckpointError(f"{checkpoint.name}: architectures {checkpoint.hf_architectures} are not supported; "
                              f"supported: {supported}")
    raise CheckpointError(f"{checkpoint.name}: not a checkpoint in any known layout; first keys "
                          f"{list(checkpoint.raw)[:5]}. Known: " + "; ".join(f.description for f in FORMATS))


# ---------------------------------------------------------------------------------------------------------------
# the reader

def resolve_source(source: str | Path, what: str = "checkpoint") -> Path:
    """A path, a ``blip.zoo`` name whose file must be under ``$BLIP_HOME``, or an HF hub repository id ("org/name")
    whose snapshot the local Hugging Face cache holds (blip never downloads: the errors say where to get it)."""
    path = Path(source)
    if path.exists():
        return path
    from ..zoo import PRETRAINED, hf_cache_dir, hf_cache_snapshot, resolve
    if isinstance(source, str) and source in PRETRAINED:
        return resolve(source)
    snapshot = hf_cache_snapshot(source) if isinstance(source, str) else None
    if snapshot is not None:
        return snapshot
    raise CheckpointNotFoundError(f"{what} {str(source)!r}: no such file or directory, not a blip.zoo name (known: "
                                  f"{sorted(PRETRAINED)}) and not a repository in the Hugging Face cache "
                                  f"({hf_cache_dir()}); blip never downloads: pass a local path")


def read_checkpoint(source: str | Path | StateDict | Checkpoint, what: str = "checkpoint") -> Checkpoint:
    """The one reader of weights: ``source`` (a file, an HF directory, a run directory / one of its checkpoint
    directories / a folder of runs of one name, a ``blip.zoo`` name, a state dict) -> :class:`Checkpoint`. ``what``
    names the source in errors (``init_from``, ``vision_init``...)."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, dict):
        return Checkpoint(None, raw=unwrap_state_dict(source))
    path = resolve_source(source, what)
    run = find_run(path.parent if path.name == STATE and path.is_file() else path)
    if run is not None:
        return Checkpoint(run[1], run=run)
    if path.is_dir() and not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        try:   # checkpoints without the run's config.yaml: their weights, recognised by key
            path = checkpoint_path(path) / STATE
        except FileNotFoundError:
            raise CheckpointError(f"{path}: a model directory needs a config.json (HF layout); a training run "
                                  "needs config.yaml + checkpoints/step_*/state.pt") from None
    return Checkpoint(path)


def exporter_of(model: nn.Module):
    """The module that writes ``model`` by its family (``save_safetensors``, ``export_hf``): :mod:`blip.convert.blip`
    or :mod:`blip.convert.blip2`; None for a module that is no BLIP / BLIP-2 model."""
    try:
        family = family_of(model)
    except TypeError:
        return None
    return blip_convert if family is Family.BLIP else blip2_convert
