"""NLVR2 (sentences about pairs of photographs, true or false) in the two layouts its owners publish.

- Official (github.com/lil-lab/nlvr, ``nlvr2/data/{train,dev,test1}.json``): JSON lines
  ``{"identifier": "<split>-<set>-<pair>-<sentence>", "sentence", "label": "True" | "False", "directory" (train)}``;
  images ``<image_root>/[<directory>/]<split>-<set>-<pair>-img{0,1}.png`` as the direct download unpacks them
  (``train/`` has numbered subdirectories, ``dev/`` and ``test1/`` are flat).
- BLIP / LAVIS (``nlvr_{train,dev,test}.json`` from salesforce's bucket): one JSON list
  ``[{"images": [left, right] (relative to image_root), "sentence", "label": "True" | "False"}]``. LAVIS's dataset
  config downloads ``nlvr_dev.json`` for its test split as well; BLIP's ``nlvr_test.json`` is test-P.

:class:`NLVR2Source` feeds the training stream: one sample per sentence with both images, the label, and BLIP's
train-time augmentation (the pair swapped with probability 0.5, "left"/"right" swapped in the sentence with it).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blip.data.annotations import AnnotationError, entry_field, image_inside
from blip.data.skips import SkipCounter
from blip.data.webdataset import stable_id

SOURCES = "official: https://github.com/lil-lab/nlvr (nlvr2/data, images by request); BLIP/LAVIS lists: " \
          "https://storage.googleapis.com/sfr-vision-language-research/datasets/nlvr_{train,dev,test}.json"


@dataclass(frozen=True)
class NLVR2Example:
    """identifier: the official one (BLIP lists: ``"<split>-<set>-<pair>#<index>"``); sentence as annotated (BLIP
    cleans it with ``pre_caption(sentence, 40)``); label: True / False, None when the file has none."""
    identifier: str
    left: Path
    right: Path
    sentence: str
    label: bool | None


def read_nlvr2(annotation: str | Path, image_root: str | Path = "") -> list[NLVR2Example]:
    """Every example of an official (JSON lines) or BLIP/LAVIS (JSON list) NLVR2 annotation file."""
    path, root = Path(annotation), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NLVR2 annotation file not found ({SOURCES})")
    text = path.read_text()
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: neither a JSON list nor JSON lines ({e}); re-download it ({SOURCES})") from e
    return [_example(entry, i, root, path) for i, entry in enumerate(entries)]


def _example(entry: dict, index: int, root: Path, path: Path) -> NLVR2Example:
    """One entry; its images must lie inside ``root`` (refused by path, before anything is opened)."""
    where = f"entry {index}"
    try:
        sentence = entry_field(entry, "sentence", (str,), path, where)
        if "images" in entry:   # BLIP / LAVIS list
            left, right = entry["images"]
            pair = Path(left).name.rsplit("-img", 1)[0]
            return NLVR2Example(f"{pair}#{index}", image_inside(root, left, path, where),
                                image_inside(root, right, path, where), sentence, _label(entry.get("label")))
        identifier = entry_field(entry, "identifier", (str,), path, where)
        pair = identifier.rsplit("-", 1)[0]
        folder = str(entry["directory"]) if "directory" in entry else ""
        return NLVR2Example(identifier, image_inside(root, os.path.join(folder, f"{pair}-img0.png"), path, where),
                            image_inside(root, os.path.join(folder, f"{pair}-img1.png"), path, where), sentence,
                            _label(entry.get("label")))
    except AnnotationError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: {where} is not an NLVR2 example ({type(e).__name__}: {e}); expected "
                              "official fields identifier/sentence/label or BLIP's images/sentence/label") from e


def _label(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"label {value!r} is neither True nor False")


def swap_left_right(sentence: str) -> str:
    """The sentence for the swapped pair: the words "left" and "right" exchanged (BLIP's word-level rule)."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in sentence.split(" "))


@dataclass
class NLVR2Source:
    """Training source (the ``Source`` protocol of :mod:`blip.data.mixing`): raw samples with both image paths,
    the sentence, ``extra={"label": 0 | 1}`` and ``random_swap`` (BLIP's augmentation, applied when decoded)."""

    annotation: str | Path
    image_root: str | Path = ""
    random_swap: bool = True
    unit_size: int = 256
    examples: list[NLVR2Example] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.examples = read_nlvr2(self.annotation, self.image_root)
        unlabeled = [e.identifier for e in self.examples if e.label is None]
        if unlabeled:
            raise ValueError(f"{self.annotation}: {len(unlabeled)} examples without a label (e.g. {unlabeled[0]}); "
                             "training needs labels")

    @property
    def num_samples(self) -> int:
        return len(self.examples)

    @property
    def num_units(self) -> int:
        return -(-len(self.examples) // self.unit_size)

    def iter_unit(self, index: int, skips: SkipCounter) -> Iterator[dict]:
        for e in self.examples[index * self.unit_size:(index + 1) * self.unit_size]:
            yield {"key": e.identifier, "image": (e.left, e.right), "text": e.sentence,
                   "image_id": stable_id(e.identifier), "extra": {"label": int(e.label)},
                   "random_swap": self.random_swap}
