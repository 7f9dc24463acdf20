"""Checkpoints are data: safe reading, key conversion as pure functions, and loading with an explicit report.

- :func:`read_state_dict` reads ``.safetensors`` or ``.pth/.pt/.bin`` (``weights_only=True``: a checkpoint can never
  run code), unwraps ``{"model": ...}``/``{"state_dict": ...}`` containers and strips DDP ``module.`` prefixes.
- :func:`load_into` loads with ``strict`` semantics against explicit lists of keys a format is expected to lack
  (``expected_missing``) or to carry without use (``expected_unused``) and returns a :class:`LoadReport`.
- Loading without a second copy: :func:`build_empty` builds a model on the meta device (no memory, no random
  initialisation) and :func:`load_into` then assigns the checkpoint's tensors to it; ``.safetensors`` files are
  memory-mapped (safetensors), so an assigned tensor is read from the file when first used.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message names the file and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint source that does not exist (a wrong path, or a ``blip.zoo`` file not yet under ``$BLIP_HOME``)."""


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from a file or an HF model directory (single or sharded weights)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_dir(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))  # memory-mapped: a tensor's pages are read when first used
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-export it") from e
    return unwrap_state_dict(read_torch_file(path), path)


def read_torch_file(path: str | Path) -> object:
    """The one reader of ``torch.save`` files (model weights, training checkpoints, RNG states): tensors and plain
    containers only (``weights_only=True``), so a file can never run code; anything else is a CheckpointError
    naming the file, why, and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path (a run dir, a checkpoint dir or a weights file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: report only the reason
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path}: cannot be read as a tensors-only torch checkpoint ({type(e).__name__}: {reason}). blip never "
            "unpickles objects (they can run code); if the file is truncated re-download it, if it holds objects "
            "re-save its state_dict with torch.save(model.state_dict()) or safetensors") from None


def hf_pretrained(loader, directory: str | Path, **kwargs):
    """``loader.from_pretrained(directory)`` (any transformers class: AutoConfig, AutoTokenizer, AutoModel*...) for a
    local HF directory: never downloads, never runs code shipped in the directory (``trust_remote_code=False``: an
    ``auto_map`` is refused, even if someone answers "y" on stdin), and errors name the directory, and the file where
    one of its text files is broken (not UTF-8, not JSON, nested too deeply)."""
    directory = Path(directory)
    name = getattr(loader, "__name__", type(loader).__name__)
    try:
        return loader.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False, **kwargs)
    except (MemoryError, torch.cuda.OutOfMemoryError):   # the machine's limit, not the directory's fault
        raise
    except Exception as e:  # noqa: BLE001 - transformers, tokenizers (a plain Exception) and json fail differently
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise CheckpointError(
                f"{directory}: config.json asks to run code shipped in the directory (auto_map); blip never runs a "
                "model directory's code. Use a model whose model_type transformers ships") from None
        broken = _broken_text_file(directory)
        if broken is not None:
            raise CheckpointError(f"{broken}; {name} cannot load {directory}: re-download or re-export it") from e
        raise CheckpointError(f"{directory}: {name} cannot load it ({type(e).__name__}: {str(e)[:300]}); check "
                              "config.json and the weight / tokenizer files") from e


# the text files of an HF model directory that transformers reads (configs, tokenizers, processors)
HF_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                 "preprocessor_config.json")


def _broken_text_file(directory: Path) -> str | None:
    """``"<file>: <why>"`` for the first of ``directory``'s :data:`HF_TEXT_FILES` that is not UTF-8 text (or, for a
    ``.json``, not JSON Python can parse); None when they all read."""
    for name in HF_TEXT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            return f"{path}: not UTF-8 text ({type(e).__name__}: {e})"
        problem = _json_value(text)[1] if name.endswith(".json") else None
        if problem is not None:
            return f"{path}: not JSON ({problem})"
    return None


def _json_value(text: str) -> tuple[object, str | None]:
    """``(json.loads(text), None)``, or ``(None, why it is no JSON Python can parse)``: not JSON, or nested deeper
    than the parser goes (a RecursionError, e.g. 100,000 nested lists in a crafted config)."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "nested deeper than Python's JSON parser goes"
    except ValueError as e:  # json.JSONDecodeError
        return None, str(e)


def parse_json(text: str, source: str, what: str = "JSON") -> object:
    """``json.loads(text)``, or a CheckpointError naming ``source`` (see :func:`_json_value`)."""
    value, problem = _json_value(text)
    if problem is not None:
        raise CheckpointError(f"{source}: not readable {what} ({problem}); re-download or re-export it")
    return value


def read_json(path: str | Path, what: str = "JSON") -> object:
    """A JSON file's value, or a CheckpointError naming the file (unreadable, not UTF-8, not JSON, nested too
    deeply)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable {what} ({type(e).__name__}: {e}); re-download or re-export "
                              "it") from None
    return parse_json(text, str(path), what)


def read_hf_config_json(directory: str | Path) -> dict:
    """config.json of an HF directory as a dict, or a CheckpointError naming the file."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: a model directory needs a config.json (HF layout)")
    config = read_json(path, "JSON config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def unwrap_state_dict(obj: object, path: str | Path = "<memory>") -> StateDict:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _weights_root(directory: Path) -> Path:
    """The folder whose files ``directory``'s weight files may be: the directory itself, or, for a snapshot of a
    Hugging Face cache (``models--org--name/snapshots/<revision>/``, files linked to ``../../blobs/<sha>``), its
    ``models--org--name`` folder."""
    root = directory.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def weight_file(directory: Path, name: object, source: Path) -> Path:
    """``directory / name`` for a weight file named by ``source`` (an index, or the directory itself): a plain file
    name, and, once links are followed, a file inside :func:`_weights_root` (a map to ``../`` or an absolute path,
    or a link out of the directory, would read files the directory does not hold)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise CheckpointError(f"{source}: weight_map points outside its directory ({name!r}); the index may be "
                              "crafted: only file names in the same directory are read")
    root, target = _weights_root(directory), (directory / name).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{directory / name}: links to {target}, outside {root}; blip reads a model "
                              "directory's weights from inside it (a Hugging Face cache snapshot: from inside its "
                              "models--org--name folder): copy the file in instead of linking it")
    return directory / name


def _index_shards(index: Path) -> list[Path]:
    """The weight files an HF ``*.index.json`` maps to (each checked by :func:`weight_file`)."""
    content = read_json(index, "HF weight index")
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not an HF weight index (no weight_map object); re-download it")
    names = list(dict.fromkeys(weight_map.values()))
    return [weight_file(index.parent, name, index) for name in sorted(names, key=str)]


def _read_hf_dir(path: Path) -> StateDict:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            state: StateDict = {}
            for shard in _index_shards(index):
                state.update(read_state_dict(shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return read_state_dict(weight_file(path, name, path))
    raise CheckpointError(f"{path}: directory without model.safetensors or pytorch_model.bin (is it an HF model dir?)")


# ---------------------------------------------------------------------------------------------------------------
# loading with a report

@dataclass
class LoadReport:
    """What happened to every key: loaded, expected to be absent, carried but unused, or a real mismatch."""
    source: str
    loaded: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)   # our key prefix -> file it came from

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.expected_missing:
            parts.append(f"{len(self.expected_missing)} absent as expected for this format")
        if self.unused:
            parts.append(f"{len(self.unused)} unused (e.g. momentum encoders, queues)")
        if self.resized:
            parts.append(f"resized {', '.join(self.resized)}")
        return "; ".join(parts)

    def describe(self, limit: int = 16) -> str:
        """What happened, by name (layer indices folded to N): loaded, resized, new by design, unused."""
        lines = [f"{self.source}:"]
        for title, keys in (("loaded", self.loaded), ("resized", self.resized),
                            ("new by design", self.expected_missing), ("unused", self.unused)):
            if keys:
                names = fold_names(keys)
                more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
                lines.append(f"  {title} ({len(keys)}): {', '.join(names[:limit])}{more}")
        return "\n".join(lines)


def fold_names(keys: Iterable[str]) -> list[str]:
    """Parameter names grouped per module, layer indices folded: ``blocks.3.attn.qkv.weight`` ->
    ``blocks.N.attn.qkv``."""
    out: dict[str, None] = {}
    for k in keys:
        out[re.sub(r"\.(weight|bias)$", "", re.sub(r"\.\d+\.", ".N.", k))] = None
    return list(out)


def check_fits_before_building(build: Callable[[], nn.Module], sd: StateDict, source: str) -> None:
    """Build the model on the meta device (no memory) and compare it with the file's tensors, so a config that does
    not describe them (metadata that is wrong or crafted to ask for 100 GB) fails before anything is allocated.
    Position embeddings may differ (they are interpolated); everything else must have the file's shape, and the
    model may not be much larger than the file."""
    with torch.device("meta"):
        own = build().state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs config {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and not k.endswith("pos_embed") and tuple(v.shape) != tuple(own[k].shape)]
    size, stored = sum(t.numel() for t in own.values()), sum(t.numel() for t in sd.values())
    if bad or size > 2 * stored + 1_000_000:
        detail = f"shapes differ: {bad[:4]}" if bad else f"{size:,} model values for {stored:,} in the file"
        raise CheckpointError(f"{source}: its config does not describe its tensors ({detail}); the file's metadata "
                              "is wrong or was tampered with: re-export the file, or pass arch= to ignore it")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def load_into(model: nn.Module, sd: StateDict, source: str, expected_missing: Iterable[str] = (),
              expected_unused: Iterable[str] = (), report: LoadReport | None = None) -> LoadReport:
    """Load converted ``sd`` into ``model``; every model key must be loaded or match ``expected_missing`` (regexes),
    every file key must be used or match ``expected_unused``. Anything else raises :class:`CheckpointError`."""
    expected_missing, expected_unused = list(expected_missing), list(expected_unused)
    own = model.state_dict()
    report = report or LoadReport(source)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_missing = [k for k in missing if not _matches(k, expected_missing)]
    bad_unexpected = [k for k in unexpected if not _matches(k, expected_unused)]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    mismatched += [f"{k}: file {sd[k].dtype} for a {own[k].dtype} tensor (a cast would invent values)"
                   for k in sd if k in own and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if bad_missing or bad_unexpected or mismatched:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        if bad_missing:
            lines.append(f"  missing ({len(bad_missing)}): {bad_missing[:8]}{' ...' if len(bad_missing) > 8 else ''}")
        if bad_unexpected:
            lines.append(f"  unexpected ({len(bad_unexpected)}): {bad_unexpected[:8]}"
                         f"{' ...' if len(bad_unexpected) > 8 else ''}")
        if mismatched:
            lines.append(f"  shape mismatch: {mismatched[:8]}")
        lines.append("  Check the architecture (arch=...) and the image size / config the checkpoint was trained with.")
        raise CheckpointError("\n".join(lines))
    if any(t.is_meta for t in own.values()):
        _assign(model, {k: v.to(own[k].dtype) for k, v in sd.items() if k in own})
    else:
        with torch.no_grad():
            for k, v in sd.items():
                if k in own:
                    own[k].copy_(v.to(own[k].dtype))
    report.loaded += [k for k in sd if k in own]
    report.expected_missing += missing
    report.unused += unexpected
    return report


# ---------------------------------------------------------------------------------------------------------------
# building on the meta device, loading by assignment

def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: shapes only, nothing allocated or initialised. :func:`load_into` then assigns
    the checkpoint's tensors, so memory holds one copy of the weights and no time goes into a random init."""
    with torch.device("meta"):
        return build()


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _assign(model: nn.Module, sd: StateDict) -> None:
    """Make ``sd``'s tensors the model's own (``load_state_dict(assign=True)``), keep tied weights tied, and
    initialise what the checkpoint did not hold (formats without some part; non-persistent buffers)."""
    groups: dict[int, list[str]] = {}
    for name, t in _named_tensors(model).items():
        groups.setdefault(id(t), []).append(name)
    model.load_state_dict(sd, strict=False, assign=True)
    tensors = _named_tensors(model)
    for names in groups.values():  # assignment replaced one alias of a tied weight: point the others at it
        loaded = [n for n in names if n in sd]
        for name in names if loaded and len(names) > 1 else ():
            _set_tensor(model, name, tensors[loaded[0]])
    _materialise_missing(model)


def _materialise_missing(model: nn.Module) -> None:
    """Allocate and initialise the tensors still on the meta device, module by module, with the module's own
    initialisation (an HF model's ``_init_weights``, else ``reset_parameters``); the loaded tensors of the same
    module are set aside meanwhile so that the initialisation cannot touch them."""
    device = next((t.device for t in _named_tensors(model).values() if not t.is_meta), torch.device("cpu"))
    hf_inits = {name: m._init_weights for name, m in model.named_modules() if hasattr(m, "_init_weights")}
    for name, module in model.named_modules():
        own = {**module._parameters, **module._buffers}
        meta = [k for k, t in own.items() if t is not None and t.is_meta]
        if not meta:
            continue
        owner = max((n for n in hf_inits if name == n or name.startswith(n + ".") or n == ""), key=len, default=None)
        init = hf_inits[owner] if owner is not None else getattr(module, "reset_parameters", None)
        if init is None:
            raise CheckpointError(f"{type(model).__name__}: {name}.{meta} are not in the checkpoint and {name} has no "
                                  "initialisation of its own; build this model for real instead of on the meta device")
        loaded = {k: t for k, t in own.items() if t is not None and not t.is_meta}
        for k, t in own.items():
            if t is not None:
                empty = torch.empty_like(t, device=device)
                _set_tensor(module, k, nn.Parameter(empty, t.requires_grad) if k in module._parameters else empty)
        with torch.no_grad():
            (init(module) if owner is not None else init())
        for k, t in loaded.items():
            _set_tensor(module, k, t)


# ---------------------------------------------------------------------------------------------------------------
# blip's own safetensors files: weights + the config that rebuilds the model, in the metadata

def write_safetensors(sd: StateDict, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``sd`` (moved to CPU, contiguous; tied aliases stored once) with ``metadata`` to ``path`` atomically;
    ``.safetensors`` is appended to a name without it (readers tell the format by the name). -> the path written."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen and v.numel():   # a tied alias (e.g. an LM head sharing the word embeddings)
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt", **metadata})
    tmp.replace(path)
    return path


def safetensors_metadata(path: str | Path, family: str | None = None) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file written by blip (``{}`` for other files, or another ``family``)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta if family is None or meta.get("blip_family") == family else {}


def write_hf_directory(directory: str | Path, config, sd: StateDict) -> Path:
    """An HF model directory transformers' ``from_pretrained`` loads: ``config.json`` (``config``: a transformers
    config) and ``model.safetensors`` (``sd`` already under HF names)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
