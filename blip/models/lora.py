"""LoRA adapters (through ``peft``) for every model family: settings, injection into chosen towers, the adapter
files, and merging them back into plain weights.

A tower is a named part of a model: ``llm`` (BLIP-2 / InstructBLIP's HF language model), ``qformer`` (BLIP-2's
Q-Former), ``vit`` (the image encoder's ViT) and ``text`` (BLIP's text encoder and / or decoder). :func:`apply_lora`
injects peft's ``lora.Linear`` into the chosen towers' linears (``W x + B A dropout(x) * alpha / r``, B zero at the
start, so the adapted model computes what the base model does) and freezes every other parameter. An adapter
directory holds ``adapter_model.safetensors`` (the adapter tensors under the inference model's ``state_dict`` names)
and ``adapter_config.json`` (the settings and a pointer to the base weights); ``blip.load(<directory>)`` rebuilds
base + adapters, :func:`merge_lora` folds them into plain weights (``blip convert --merge``).

peft is imported inside the functions that use it: ``import blip`` stays light.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError, load_into, read_json, read_state_dict, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "blip-lora"

# where each tower lives in an inference model (a model has the tower when it has at least one of its paths)
TOWER_PATHS: dict[str, tuple[str, ...]] = {
    "llm": ("llm",),
    "qformer": ("qformer",),
    "vit": ("image_encoder.visual_encoder", "visual_encoder"),
    "text": ("text_encoder", "text_decoder"),
}
# our towers' default targets (peft suffix match): the text stacks' self-attention (q, k, v fused as ``qkv``) and
# cross-attention (``q``; ``kv`` fused) query / value inputs, the ViT's fused ``qkv``. The LLM's defaults are peft's
# for its model_type (OPT / Llama: q_proj, v_proj; T5: q, v).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"qformer": ("qkv", "q", "kv"), "text": ("qkv", "q", "kv"),
                                               "vit": ("qkv",)}


@dataclass(frozen=True)
class LoraSettings:
    """The Hydra ``model.lora`` block. r=0: no LoRA. towers: which parts get adapters (llm | qformer | vit | text);
    target_modules: module-name suffixes to adapt in each chosen tower (None: the tower's defaults, see
    :data:`DEFAULT_TARGETS`; peft's per-model_type defaults for the LLM)."""
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    towers: tuple[str, ...] = ("llm",)
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        towers = (self.towers,) if isinstance(self.towers, str) else tuple(str(t) for t in self.towers)
        targets = self.target_modules
        if targets is not None:
            targets = (targets,) if isinstance(targets, str) else tuple(str(t) for t in targets)
        object.__setattr__(self, "towers", towers)
        object.__setattr__(self, "target_modules", targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"model.lora.r must be an integer >= 0 (0: no LoRA), got {self.r!r}")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be a number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        unknown = [t for t in towers if t not in TOWER_PATHS]
        if unknown or not towers or len(set(towers)) != len(towers):
            raise ValueError(f"model.lora.towers must be distinct names from {list(TOWER_PATHS)}, got {list(towers)}")
        if targets is not None and (not targets or not all(targets)):
            raise ValueError(f"model.lora.target_modules must be null (each tower's defaults) or module-name "
                             f"suffixes, got {list(targets)}")

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> "LoraSettings":
        """The Hydra ``model.lora`` block (r, alpha, dropout, towers, target_modules; missing keys: the defaults;
        None: no LoRA). Unknown keys and bad values are a ValueError naming them."""
        if cfg is None:
            return cls()
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"model.lora: unknown keys {unknown}; known: {known}")
        values = dict(cfg)
        for key in ("towers", "target_modules"):   # an OmegaConf ListConfig or a list -> tuple
            if values.get(key) is not None and not isinstance(values[key], str):
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def to_json(self) -> dict:
        return {"r": self.r, "alpha": float(self.alpha), "dropout": float(self.dropout), "towers": list(self.towers),
                "target_modules": None if self.target_modules is None else list(self.target_modules)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# injecting, inspecting, merging

def inference_model(model: nn.Module) -> tuple[nn.Module, str]:
    """(the inference model, the prefix of its names in ``model.state_dict()``): ``model`` itself, or the model a
    training objective holds as ``.model`` ("model." for BLIP-2 objectives; "" for BLIP's, which register the task
    model's children as their own)."""
    if getattr(model, "family", None) is not None or not isinstance(getattr(model, "model", None), nn.Module):
        return model, ""
    inner = model.model
    prefix = next((name + "." for name, m in model.named_modules() if m is inner and name), "")
    return inner, prefix


def model_towers(model: nn.Module) -> dict[str, list[str]]:
    """The towers an inference model has: tower -> the paths of its modules."""
    found = {tower: [p for p in paths if _has_submodule(model, p)] for tower, paths in TOWER_PATHS.items()}
    return {tower: paths for tower, paths in found.items() if paths}


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _targets(tower: str, module: nn.Module, settings: LoraSettings, where: str) -> list[str]:
    """The names (inside ``module``) of the modules to adapt: the settings' suffixes or the tower's defaults."""
    suffixes = settings.target_modules
    if suffixes is None and tower == "llm":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        suffixes = PEFT_DEFAULTS.get(model_type)
        if suffixes is None:
            raise ValueError(f"peft has no default LoRA targets for LLM model_type {model_type!r}: set "
                             "model.lora.target_modules (e.g. [q_proj, v_proj])")
    suffixes = suffixes if suffixes is not None else DEFAULT_TARGETS[tower]
    names = [n for n, _ in module.named_modules() if n and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        linears = sorted({n.rpartition(".")[2] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"model.lora.target_modules {list(suffixes)} match no module of the {tower} tower "
                         f"({where}); its linear layers are named {linears}")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA into the chosen towers of ``model`` (an inference model or a training objective wrapping it as
    ``.model``) and freeze every other parameter; returns the adapted modules' names in ``model``.

    Adapters are created in float32 whatever the tower's dtype (peft casts inputs and outputs at their boundary).
    BLIP momentum copies (``<tower>_m`` of a retrieval / pretraining objective) get the same adapters, frozen, so the
    EMA still pairs their parameters with the online ones. ``settings.r == 0`` changes nothing and returns [].
    """
    if not settings.enabled:
        return []
    from peft import LoraConfig, inject_adapter_in_model
    inner, prefix = inference_model(model)
    if has_lora(model):
        raise ValueError(f"{type(inner).__name__} already has LoRA adapters: merge them first (merge_lora)")
    towers = model_towers(inner)
    missing = [t for t in settings.towers if t not in towers]
    if missing:
        raise ValueError(f"model.lora.towers {missing}: {type(inner).__name__} has no such tower; its towers: "
                         f"{list(towers)}")
    plan: list[tuple[str, list[str]]] = []   # (module path in ``model``, its targets): all resolved before injecting
    copies: list[str] = []
    for tower in settings.towers:
        for path in towers[tower]:
            online, momentum = prefix + path, f"{prefix}{path}_m"
            places = [online] + ([momentum] if _has_submodule(model, momentum) else [])
            plan += [(where, _targets(tower, model.get_submodule(where), settings, where)) for where in places]
            copies += places[1:]
    for where, names in plan:
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=names, bias="none")
        inject_adapter_in_model(config, model.get_submodule(where))
    for name, param in model.named_parameters():
        adapter = is_adapter_key(name)
        if adapter and param.dtype != torch.float32:
            param.data = param.data.float()
        param.requires_grad_(adapter and not name.startswith(tuple(c + "." for c in copies)))
    return [f"{where}.{n}" for where, names in plan if where not in copies for n in names]


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / state_dict name belongs to a LoRA adapter (peft's ``lora_A`` / ``lora_B`` ...)."""
    return ".lora_" in name


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if "peft" not in sys.modules:   # nothing was ever injected
        return []
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters (not merged)."""
    return bool(_lora_layers(model))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only, under ``model.state_dict()`` names."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into their base weights (``W += B A * alpha / r``) and put the plain modules back, in place:
    ``state_dict()`` keys are exactly the base model's again. Returns ``model``."""
    for name, layer in _lora_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    for module in model.modules():   # peft's record of what it injected (a plain attribute)
        if "peft_config" in module.__dict__:
            del module.__dict__["peft_config"]
    return model


def set_adapter_dropout(module: nn.Module, mode: bool) -> None:
    """LoRA dropout follows ``mode`` inside a tower kept in eval mode (a frozen ViT: its own dropout stays off)."""
    for m in module.modules():
        dropout = getattr(m, "lora_dropout", None)
        if isinstance(dropout, nn.ModuleDict):
            dropout.train(mode)


# ---------------------------------------------------------------------------------------------------------------
# adapter directories

def save_adapters(model: nn.Module, directory: str | Path, *, base: str | Path, settings: LoraSettings,
                  extra_state: dict[str, Tensor] | None = None) -> Path:
    """Write ``directory/adapter_model.safetensors`` (the adapters under the inference model's names, plus
    ``extra_state``: other trainable tensors, under the inference model's or ``model``'s names) and
    ``directory/adapter_config.json`` (format, ``base`` as given, the settings, the peft version), each atomically.
    Returns the directory."""
    import peft
    inner, prefix = inference_model(model)
    tensors = lora_state_dict(inner)
    if not tensors:
        raise ValueError(f"{type(inner).__name__} has no LoRA adapters to save: apply_lora first")
    own = inner.state_dict()
    for key, value in (extra_state or {}).items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name not in own or is_adapter_key(name):
            raise ValueError(f"extra_state {key!r} is not a base tensor of {type(inner).__name__}")
        tensors[name] = value
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, directory / ADAPTER_WEIGHTS, {"blip_format": ADAPTER_FORMAT})
    config = {"format": ADAPTER_FORMAT, "base": str(base), **settings.to_json(), "peft_version": peft.__version__}
    tmp = directory / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, directory / ADAPTER_CONFIG)
    return directory


def read_adapters(directory: str | Path) -> tuple[LoraSettings, str, dict[str, Tensor]]:
    """An adapter directory -> (settings, base source as saved, adapter tensors). CheckpointError naming the
    directory when it is not one of ours or is incomplete."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG}; an adapter directory is written by save_adapters")
    config = read_json(path, "adapter settings")
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a blip LoRA directory (format {ADAPTER_FORMAT!r}; peft's own "
                              "PeftModel.save_pretrained layout is not read): re-save it with blip.models.lora."
                              "save_adapters")
    keys = ("r", "alpha", "dropout", "towers", "target_modules")
    missing = [k for k in ("base", *keys) if k not in config]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}; re-save the adapters")
    try:
        settings = LoraSettings.from_config({k: config[k] for k in keys})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not settings.enabled:
        raise CheckpointError(f"{path}: r is 0, so there are no adapters; re-save the adapters")
    return settings, str(config["base"]), read_state_dict(directory / ADAPTER_WEIGHTS)


def base_source(directory: str | Path, base: str) -> str | Path:
    """Where an adapter directory's base is: the source as saved (a path that exists, a ``blip.zoo`` name), or that
    path relative to the adapter directory (a directory moved together with its base)."""
    beside = Path(directory) / base
    if not Path(base).exists() and not Path(base).is_absolute() and beside.exists():
        return beside
    if Path(base).exists() and Path(base).resolve() == Path(directory).resolve():
        raise CheckpointError(f"{directory}: its base is the adapter directory itself; save the adapters with the "
                              "base weights' source")
    return base


def attach_adapters(model: nn.Module, settings: LoraSettings, tensors: dict[str, Tensor], source: str) -> nn.Module:
    """Inject LoRA with ``settings`` into a base model and load the adapter tensors strictly: every adapter key
    present, no unknown key (other tensors saved with them replace base tensors of the same name)."""
    if has_lora(model):
        raise CheckpointError(f"{source}: its base already carries LoRA adapters; merge them into plain weights "
                              "(blip convert --merge) and point the adapters at that")
    try:
        apply_lora(model, settings)
    except ValueError as e:
        raise CheckpointError(f"{source}: the adapters do not fit the base model: {e}") from None
    load_into(model, tensors, source, expected_missing=[r"(?!.*\.lora_).*"])   # base tensors come from the base
    return model
