"""Checked reads of annotation files: every entry's fields typed, ids unique, image paths inside their folder.

An annotation file is data from elsewhere (a download, a colleague's script), so each reader takes its fields
through :func:`entry_field`, :func:`unique_ids` and :func:`image_inside`, and a bad file fails with an
:class:`AnnotationError` naming the file, the entry and the field, instead of a bare ``KeyError: 'image'`` or,
worse, a result computed on the wrong data (a repeated question id scored twice, an image read from outside the
dataset). Errors describe values by their JSON type; they never echo a file's content.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Iterable

JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "true/false",
              type(None): "null"}
FIX = "fix the entry or re-download the file (docs/data.md lists the sources and layouts)"


class AnnotationError(ValueError):
    """An annotation file's entry lacks a field, has one of the wrong type, repeats an id, or names an image outside
    its folder; the message names the file, the entry and the field."""


def json_type(value: Any) -> str:
    return next((name for kind, name in JSON_TYPES.items() if type(value) is kind), type(value).__name__)


def entry_field(entry: Any, key: str, kinds: tuple[type, ...], path: str | os.PathLike, where: str) -> Any:
    """``entry[key]`` after checking that ``entry`` is a JSON object holding ``key`` with a value of one of
    ``kinds`` (``True`` is not an integer here). where: the entry, e.g. ``entry 3`` or ``annotations[3]``."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is a JSON {json_type(entry)}, not an object; {FIX}")
    if key not in entry:
        fields = sorted(map(str, entry))
        shown = ", ".join(fields[:12]) + (", ..." if len(fields) > 12 else "")
        raise AnnotationError(f"{path}: {where} has no {key!r} field (it has: {shown or 'none'}); {FIX}")
    value = entry[key]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join(JSON_TYPES[k] for k in kinds)
        raise AnnotationError(f"{path}: {where}: {key!r} is a JSON {json_type(value)}, expected a JSON {expected}; "
                              f"{FIX}")
    return value


def unique_ids(ids: Iterable[Hashable], path: str | os.PathLike, key: str) -> None:
    """Refuse a repeated id: every evaluated item is scored once, and a repeat would silently weigh it twice (or,
    looked up by id, replace its twin)."""
    first: dict = {}
    for index, value in enumerate(ids):
        if value in first:
            raise AnnotationError(f"{path}: {key} {value!r} appears more than once (entries {first[value]} and "
                                  f"{index}); each must be unique: remove the repeat or re-download the file")
        first[value] = index


def path_inside(root: str | os.PathLike, name: str | os.PathLike) -> str | None:
    """``root/name`` as an absolute path when it stays inside ``root``, else None: ``..`` steps and absolute names
    that lead elsewhere are refused by the path alone, before anything is opened. Lexical: a symlinked folder inside
    ``root`` is fine (datasets are often assembled from links)."""
    base = os.path.abspath(root)
    full = os.path.abspath(os.path.join(base, name))
    return full if os.path.commonpath([base, full]) == base else None


def image_inside(root: str | os.PathLike, name: str, path: str | os.PathLike, where: str) -> Path:
    """``root / name`` for an entry's image, refused (AnnotationError naming the entry) when it leaves ``root``."""
    if path_inside(root, name) is None:
        raise AnnotationError(f"{path}: {where}: image {name!r} leaves the image folder {os.path.abspath(root)}; "
                              "image paths must be relative to it and stay inside it")
    return Path(root) / name
