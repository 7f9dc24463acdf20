"""The typed schema of a training run's settings, checked before any data or model work.

Every key of the trainer group (``configs/trainer/*.yaml``), of the ``eval`` block and the run's top-level numbers has
one :class:`Setting` in :data:`SCHEMA`: its type, its range or choices, and whether null is allowed (and what null
means). :func:`validate_settings` checks a composed config against it and raises :class:`SettingError`, a
``ValueError`` whose one-line message names the key, the value and what is allowed, e.g.
``trainer.grad_clip=-1: allowed: null (no clipping) or a number > 0``. The ``trainer`` and ``eval`` blocks are
closed: a key the schema does not know (a ``+trainer.optimzer.lr=...`` typo) is refused as well.

A schema rather than checks where each value is used: a wrong value fails in one line at the start of the run, not
as a TypeError deep inside (``batch_size=abc``) or, worse, not at all (a negative ``grad_clip`` is gradient ascent, a
negative ``keep_last`` deletes every checkpoint it writes).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from blip.dtypes import DTYPES

CLOSED_SECTIONS = ("trainer", "eval")   # every key under these must be in the schema


class SettingError(ValueError):
    """A setting of the composed config is of the wrong type, out of its range or unknown; ``key`` names it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class Setting:
    """One setting's type and range. kind: int | float | bool | str | list (``item`` types each element, ``length``
    fixes the count); low / high: bounds, inclusive unless ``low_open`` / ``high_open``; choices: the only values a
    str may take; pattern: a regex a str may match instead, ``pattern_shown`` its form in messages; null: what null
    means where it is allowed (None: null is refused); optional: the key may be absent (groups that have it set
    it)."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    pattern_shown: str = ""
    null: str | None = None
    item: Setting | None = None
    length: int | None = None
    optional: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.null is not None
        if self.kind is list:
            return (isinstance(value, list) and (self.length is None or len(value) == self.length)
                    and all(self.item.accepts(v) for v in value))
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and (value in self.choices or bool(
                self.pattern and re.fullmatch(self.pattern, value)) or not (self.choices or self.pattern))
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            return False
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (below or above)

    def allowed(self) -> str:
        """What the setting takes, in words: ``an integer >= 1``, ``null (no clipping) or a number > 0``."""
        if self.kind is list:
            count = f"{self.length} " if self.length else ""
            text = f"a list of {count}{self.item.allowed().removeprefix('a ').removeprefix('an ')}"
            text = text.replace("number ", "numbers ").replace("integer ", "integers ")
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            names = list(self.choices) + ([self.pattern_shown or f"matching {self.pattern}"] if self.pattern else [])
            text = "one of " + " | ".join(names) if names else "a string"
        else:
            text = "an integer" if self.kind is int else "a number"
            low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
            high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
            if low and high:
                text += (f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                         f"{')' if self.high_open else ']'}")
            elif low or high:
                text += f" {low or high}"
        return f"null ({self.null}) or {text}" if self.null is not None else text


def integer(low: int | None = None, null: str | None = None, **kw) -> Setting:
    return Setting(int, low=low, null=null, **kw)


def number(low: float | None = None, high: float | None = None, null: str | None = None, **kw) -> Setting:
    return Setting(float, low=low, high=high, null=null, **kw)


def flag() -> Setting:
    return Setting(bool)


def one_of(*choices: str, null: str | None = None, pattern: str | None = None, pattern_shown: str = "") -> Setting:
    return Setting(str, choices=choices, null=null, pattern=pattern, pattern_shown=pattern_shown)


PRECISIONS = tuple(DTYPES)
SCHEMA: dict[str, Setting] = {
    # the trainer group (configs/trainer/blip_pretrain.yaml lists them all; docs/training.md describes them)
    "trainer.epochs": integer(1),
    "trainer.max_steps": integer(1, null="run all epochs"),
    "trainer.batch_size": integer(1),
    "trainer.grad_accum": integer(1),
    "trainer.device": one_of("auto", "cpu", "cuda", "mps", pattern=r"cuda:\d+", pattern_shown="cuda:<index>"),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.frozen_dtype": one_of(*PRECISIONS, null="frozen towers keep their dtype"),
    "trainer.grad_clip": number(0, low_open=True, null="no clipping"),
    "trainer.optimizer.name": one_of("adamw", "sgd"),
    "trainer.optimizer.lr": number(0, low_open=True),
    "trainer.optimizer.weight_decay": number(0),
    "trainer.optimizer.weight_decay_exempt": one_of("ours", "lavis", "none"),
    "trainer.optimizer.betas": Setting(list, item=number(0, 1, high_open=True), length=2),
    "trainer.optimizer.eps": number(0, low_open=True),
    "trainer.optimizer.layer_decay": number(0, 1, low_open=True, null="no layer-wise decay"),
    "trainer.schedule.name": one_of("cosine", "cosine_epoch", "step", "constant"),
    "trainer.schedule.warmup_steps": integer(0),
    "trainer.schedule.warmup_lr": number(0),
    "trainer.schedule.min_lr": number(0),
    "trainer.schedule.decay_rate": number(0, 1, low_open=True),
    "trainer.distributed.strategy": one_of("auto", "none", "ddp", "fsdp"),
    "trainer.distributed.backend": one_of("auto", "nccl", "gloo"),
    "trainer.distributed.find_unused_parameters": flag(),
    "trainer.activation_checkpointing": flag(),
    "trainer.compile": flag(),
    "trainer.log_every": integer(1),
    "trainer.checkpoint_every": integer(1, null="no checkpoints"),
    "trainer.keep_last": integer(1, null="keep every checkpoint"),
    "trainer.tensorboard": flag(),
    "trainer.progress_bar": flag(),
    "trainer.threads": integer(1, null="torch's default"),
    "trainer.llm_warmup_steps": integer(0, optional=True),   # stage 2 (configs/trainer/cpu_tiny_stage2.yaml)
    "trainer.llm_warmup_lr": number(0, low_open=True, optional=True),
    # the evaluation at the end of the run (configs/train.yaml)
    "eval.enabled": flag(),
    "eval.split": one_of(),
    "eval.precision": one_of(*PRECISIONS),
    "eval.batch_size": integer(1),
    "eval.max_new_tokens": integer(1, null="the model's default"),
    "eval.min_new_tokens": integer(0),
    "eval.num_beams": integer(1, null="the model's default"),
    "eval.k_test": integer(1),
    "eval.num_captions_shown": integer(0),
    # the run
    "seed": integer(0),
    "init_from_min_fraction": number(0, 1),
}


def shown(value) -> str:
    """A value as it is written on the command line: null, 'text', [0.9, 0.999], 3."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(shown, value)) + "]"
    return repr(value)


_ABSENT = object()


def lookup(cfg: DictConfig, key: str):
    """The value at a dotted ``key`` as plain Python, ``_ABSENT`` when a level is missing; a level that is not a
    mapping (``trainer.optimizer=abc``) is a SettingError naming it."""
    node, walked = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            where = ".".join(walked)
            raise SettingError(where, f"{where}={shown(node)}: allowed: a group of settings ({key} is one of them)")
        if part not in node:
            return _ABSENT
        walked.append(part)
        node = node[part]
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys under the closed sections that the schema does not know (sub-groups reported as one key)."""
    known = set(SCHEMA) | {k.rsplit(".", i)[0] for k in SCHEMA for i in range(1, k.count(".") + 1)}
    out = []

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node:
            key = f"{prefix}.{name}"
            if key not in known:
                out.append(key)
            elif isinstance(node[name], DictConfig):
                walk(node[name], key)

    for section in CLOSED_SECTIONS:
        if isinstance(cfg.get(section), DictConfig):
            walk(cfg[section], section)
    return out


def validate_settings(cfg: DictConfig, *, open_nulls: bool = False) -> None:
    """Check ``cfg`` (a composed training config) against :data:`SCHEMA`; raises SettingError for the first bad key.

    open_nulls: null is accepted for every key (``task=custom`` leaves settings open until its recipe fills them;
    the run validates again after that fill). Non-null values are checked all the same."""
    for key, setting in SCHEMA.items():
        value = lookup(cfg, key)
        if value is _ABSENT:
            if setting.optional:
                continue
            raise SettingError(key, f"{key} is missing: allowed: {setting.allowed()}")
        if value is None and open_nulls:
            continue
        if not setting.accepts(value):
            raise SettingError(key, f"{key}={shown(value)}: allowed: {setting.allowed()}")
    unknown = unknown_keys(cfg)
    if unknown:
        section = unknown[0].split(".")[0]
        known = sorted(k.removeprefix(section + ".") for k in SCHEMA if k.startswith(section + "."))
        raise SettingError(unknown[0], f"{unknown[0]}: unknown setting (a typo?); the {section} settings are: "
                                       f"{', '.join(known)}")
