"""Users' own image–text data for fine-tuning and held-out evaluation: one reader for every format.

``read_custom(path)`` reads any of these into the same :class:`CustomRow` list (the same content gives the same rows
in every format; only ``where`` and, for shards, ``image`` differ):

- a JSONL file, a JSON list or a CSV file (header row); each row names its ``image`` (relative to the file's folder,
  or to ``image_root``) and carries one kind of text, read from its fields:
  ``caption`` (a string or a list; in CSV a string) -> caption; ``question`` + ``answer`` (string or list) -> vqa;
  ``instruction`` + ``response`` (optional ``context``) -> instruction;
  LLaVA's ``conversations`` ([{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]) -> one
  instruction row per human / gpt pair, the ``<image>`` token removed, the earlier turns (one per line) its context;
- an HF ``imagefolder`` directory: ``metadata.jsonl`` or ``metadata.csv`` beside the images, which rows name in
  ``file_name`` (HF's convention) or ``image``;
- webdataset shards (a ``.tar``, a brace pattern ``shards-{000..003}.tar`` or a directory of ``.tar`` files): each
  sample's ``.json`` carries the same fields (a ``.txt`` member is its caption where the json has none) and the image
  is its jpg / png / webp member.

A file whose rows mix kinds is read as "instruction" (a caption becomes the instruction "A short image caption:"
with the caption as response; a question becomes the instruction, its most common answer the response).
Bad rows (no kind, an empty or non-string text, a missing image, an image path leaving the image root) raise
:class:`CustomDataError` naming the file, the row and the fix; with ``strict=False`` they are skipped and counted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blip.data.annotations import path_inside
from blip.data.skips import DatasetError, SkipCounter
from blip.data.text import answer_weights, text_cleaner
from blip.data.webdataset import IMAGE_EXTENSIONS, expand_urls, iter_tar_samples, stable_id

log = logging.getLogger("blip.data")

KINDS = ("caption", "vqa", "instruction")
CAPTION_INSTRUCTION = "A short image caption:"   # a caption row's instruction in a file of mixed kinds
METADATA_FILES = ("metadata.jsonl", "metadata.csv")   # HF imagefolder
IMAGE_FIELDS = ("image", "file_name")
_KIND_FIELDS = {"caption": ("caption",), "vqa": ("question", "answer"), "instruction": ("instruction", "response")}
_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")
_FIX = ("fix the row or remove it (or read the file with strict=False / data.strict=false to skip such rows and "
        "count them)")


class CustomDataError(DatasetError):
    """A custom data file that cannot be used as given; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class CustomRow:
    """One example. image: what decode() opens (an absolute path; for webdataset rows ``"<shard>#<key>.<ext>"``,
    which :func:`iter_row_images` and :class:`CustomSource` read from the shard); where: ``"<file>:<row>"`` (1-based
    line for JSONL / CSV, 0-based index for a JSON list, the sample key for shards), for messages."""

    image: str
    kind: str
    where: str
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()
    instruction: str | None = None
    context: str | None = None
    response: str | None = None


@dataclass
class CustomData:
    """The rows of one file (or shard set). kind: the rows' kind (mixed files are read as "instruction");
    skipped: reason -> rows skipped (strict=False); shards: the webdataset shards the rows come from (else empty)."""

    path: Path
    rows: list[CustomRow]
    kind: str
    skipped: dict[str, int]
    shards: list[str] = field(default_factory=list)


class _BadRow(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Skips:
    """strict: a bad row raises; else it is counted by reason and its `where` kept for one log line."""

    def __init__(self, strict: bool) -> None:
        self.strict, self.counts, self.wheres = strict, Counter(), []

    def bad(self, bad: _BadRow, where: str) -> None:
        if self.strict:
            raise CustomDataError(str(bad)) from None
        self.counts[bad.reason] += 1
        self.wheres.append(where)


# ---- reading -------------------------------------------------------------------------------------------------------
def read_custom(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                strict: bool = True) -> CustomData:
    """The rows of a custom data file, HF imagefolder directory or webdataset shard set (see the module docstring).

    image_root: the folder image paths are relative to (default: the file's folder; an imagefolder's directory);
    paths leaving it are refused. strict=False: bad rows are skipped, counted in ``skipped`` and logged once."""
    skips = _Skips(strict)
    text = str(path)
    shards = _shard_list(text)
    if shards:
        rows = _read_shards(shards, skips)
    else:
        path = Path(path)
        if path.is_dir():
            path = next((path / m for m in METADATA_FILES if (path / m).is_file()), path)
            if path.is_dir():
                raise CustomDataError(f"{path}: a directory without {' or '.join(METADATA_FILES)} (HF imagefolder) "
                                      "or .tar shards; point data.train / data.val at a .jsonl, .json or .csv file, "
                                      "an imagefolder directory or webdataset shards")
        root = Path(image_root) if image_root is not None else path.parent
        rows = [row for where, record in _records(path, skips)
                for row in _checked(record, where, skips, lambda rec, w: _image_path(rec, w, root))]
    if skips.counts:
        log.warning("%s: skipped %d bad rows %s; first: %s", text, sum(skips.counts.values()), dict(skips.counts),
                    ", ".join(skips.wheres[:5]))
    if not rows:
        more = f" ({sum(skips.counts.values())} bad rows skipped: {dict(skips.counts)})" if skips.counts else ""
        raise CustomDataError(f"{text}: no rows{more}; the file needs at least one row with an image and a caption, "
                              "question + answer or instruction + response")
    kinds = sorted({row.kind for row in rows}, key=KINDS.index)
    kind = kinds[0] if len(kinds) == 1 else "instruction"
    if len(kinds) > 1:
        counts = Counter(row.kind for row in rows)
        log.info("%s mixes kinds (%s): read as instruction rows (captions: instruction %r; questions: their most "
                 "common answer)", text, dict(counts), CAPTION_INSTRUCTION)
        rows = [r for row in rows for r in as_instructions(row)]
    return CustomData(Path(text), rows, kind, dict(skips.counts), shards)


def as_instructions(row: CustomRow) -> list[CustomRow]:
    """A row as instruction rows: one per caption (instruction :data:`CAPTION_INSTRUCTION`), a question with its
    most common answer (the first of equally common ones)."""
    if row.kind == "caption":
        return [CustomRow(row.image, "instruction", row.where, instruction=CAPTION_INSTRUCTION, response=c)
                for c in row.captions]
    if row.kind == "vqa":
        return [CustomRow(row.image, "instruction", row.where, instruction=row.question,
                          response=most_common(row.answers))]
    return [row]


def most_common(answers: tuple[str, ...] | list[str]) -> str:
    """The most frequent answer; among equally frequent ones the first given."""
    return Counter(answers).most_common(1)[0][0]


def _checked(record: object, where: str, skips: _Skips, image_of: Callable[[dict, str], str]) -> list[CustomRow]:
    try:
        if not isinstance(record, dict):
            raise _BadRow("not_an_object", f"{where}: the row is a JSON {type(record).__name__}, not an object "
                                           "with an image and its text; " + _FIX)
        return rows_of(record, where, image_of(record, where))
    except _BadRow as bad:
        skips.bad(bad, where)
        return []


def _records(path: Path, skips: _Skips) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSONL / JSON / CSV file. CSV cells that are empty count as missing fields."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CustomDataError(f"{path}: cannot read the file ({e}); check data.train / data.val") from e
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CustomDataError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from e
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path, content, skips)
        return
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise CustomDataError(f"{path}: unknown format {path.suffix!r}; use .jsonl, .json (a list), .csv (with a "
                              "header row), an HF imagefolder directory or webdataset .tar shards")
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):   # else JSON lines
        try:
            entries = json.loads(content)
        except json.JSONDecodeError as e:
            raise CustomDataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix the "
                                  "file (a JSON list of objects, or one object per line as .jsonl)") from e
        yield from ((f"{path}:{i}", entry) for i, entry in enumerate(entries))
        return
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skips.bad(_BadRow("bad_json", f"{path}:{number}: invalid JSON on line {number} ({e.msg}, column "
                                          f"{e.colno}); {_FIX}"), f"{path}:{number}")
            continue
        yield f"{path}:{number}", record


def _csv_records(path: Path, content: str, skips: _Skips) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(content, newline=""))
    header = next(reader, [])
    if not any(f in header for f in IMAGE_FIELDS):
        raise CustomDataError(f"{path}: the CSV header {header} has no 'image' (or 'file_name') column; the first "
                              "row must name the columns: image and caption, question + answer or instruction + "
                              "response")
    end = reader.line_num   # the last line read; a row's line is the first of its (possibly multi-line) cells
    for cells in reader:
        where, end = f"{path}:{end + 1}", reader.line_num
        if not cells:
            continue
        if len(cells) > len(header):
            skips.bad(_BadRow("bad_csv_row", f"{where}: {len(cells)} cells for the header's {len(header)} columns; "
                                             "quote cells that contain commas"), where)
            continue
        yield where, {k: v for k, v in zip(header, cells) if v != ""}


def _image_path(record: dict, where: str, root: Path) -> str:
    """The row's image as an absolute path under ``root`` (lexically: symlinked folders inside it are fine)."""
    name = next((record[f] for f in IMAGE_FIELDS if f in record), None)
    if not isinstance(name, str) or not name.strip():
        raise _BadRow("no_image", f"{where}: no image: the row needs 'image' (or 'file_name'), a path relative to "
                                  f"{root}, found {name!r}; " + _FIX)
    full = path_inside(root, name)
    if full is None:
        raise _BadRow("image_outside_root", f"{where}: image {name!r} leaves the image root {os.path.abspath(root)}; "
                                            "images must lie under the file's folder (or data.image_root): move them "
                                            "there or set data.image_root to a folder that holds them")
    if not os.path.isfile(full):
        raise _BadRow("missing_image", f"{where}: image {name!r} not found ({full}); check the path, or set "
                                       "data.image_root to the folder the paths are relative to")
    return full


def rows_of(record: dict, where: str, image: str) -> list[CustomRow]:
    """The rows of one record (LLaVA conversations give several); raises _BadRow naming what is wrong."""
    if "conversations" in record:
        return _conversation_rows(record["conversations"], where, image)
    kinds = [k for k, names in _KIND_FIELDS.items() if all(n in record for n in names)]
    if not kinds:
        raise _BadRow("no_kind", f"{where}: fits no kind: it has fields {sorted(record)}; a row needs 'image' and "
                                 "'caption', 'question' + 'answer', 'instruction' + 'response' (+ 'context') or "
                                 "LLaVA 'conversations'; " + _FIX)
    if len(kinds) > 1:
        raise _BadRow("several_kinds", f"{where}: has the fields of {' and '.join(kinds)} ({sorted(record)}); one "
                                       "row carries one kind: split it into one row per kind")
    kind = kinds[0]
    if kind == "caption":
        return [CustomRow(image, kind, where, captions=_texts(record, "caption", where))]
    if kind == "vqa":
        return [CustomRow(image, kind, where, question=_text(record, "question", where),
                          answers=_texts(record, "answer", where))]
    context = _text(record, "context", where) if record.get("context") not in (None, "") else None
    return [CustomRow(image, kind, where, instruction=_text(record, "instruction", where), context=context,
                      response=_text(record, "response", where))]


def _text(record: dict, name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise _BadRow("bad_text", f"{where}: {name!r} is {value!r}; it must be a non-empty string; " + _FIX)
    return value


def _texts(record: dict, name: str, where: str) -> tuple[str, ...]:
    values = record[name] if isinstance(record[name], list) else [record[name]]
    if not values:
        raise _BadRow("bad_text", f"{where}: {name!r} is an empty list; give at least one; " + _FIX)
    return tuple(_text({name: v}, name, where) for v in values)


def _conversation_rows(turns: object, where: str, image: str) -> list[CustomRow]:
    """LLaVA: one instruction row per (human, gpt) pair; the earlier turns, one per line, are its context."""
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise _BadRow("bad_conversation", f"{where}: 'conversations' must be a non-empty list of human / gpt turn "
                                          f"pairs, found {turns!r:.120}; " + _FIX)
    texts = []
    for i, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        expected = _HUMAN if i % 2 == 0 else _GPT
        if role not in expected:
            raise _BadRow("bad_conversation", f"{where}: conversation turn {i} is from {role!r}, expected "
                                              f"{expected[0]!r} (turns alternate human, gpt); " + _FIX)
        value = _text(turn, "value", f"{where} turn {i}")
        texts.append(re.sub(r"[ \t]*<image>[ \t]*\n?", "", value).strip() if i % 2 == 0 else value)
        if not texts[-1]:
            raise _BadRow("bad_text", f"{where}: conversation turn {i} is empty once <image> is removed; " + _FIX)
    return [CustomRow(image, "instruction", where, instruction=texts[i], response=texts[i + 1],
                      context="\n".join(texts[:i]) or None) for i in range(0, len(texts), 2)]


# ---- webdataset shards ---------------------------------------------------------------------------------------------
def _shard_list(text: str) -> list[str]:
    """The shards ``text`` names (a .tar, a brace pattern, "a.tar::b.tar", a directory of .tar files), else []."""
    if os.path.isdir(text):
        if any(os.path.isfile(os.path.join(text, m)) for m in METADATA_FILES):
            return []
        return sorted(str(p) for p in Path(text).glob("*.tar"))
    if not (text.endswith(".tar") or ("{" in text and ".tar" in text) or "::" in text):
        return []
    shards = expand_urls(text)
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.isfile(s)]
    if missing:
        raise CustomDataError(f"{text}: {len(missing)} of {len(shards)} shards not found, e.g. {missing[:3]}; check "
                              "the path or brace pattern")
    return shards


def _shard_images(shard: str, skips: SkipCounter) -> Iterator[tuple[str, dict, bytes | None, str]]:
    """(key, sample, image bytes or None, image reference) of every sample of one shard."""
    for sample in iter_tar_samples(shard, skips):
        key = sample.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        yield key, sample, sample.get(ext) if ext else None, f"{shard}#{key}.{ext}"


def _read_shards(shards: list[str], skips: _Skips) -> list[CustomRow]:
    counter = SkipCounter()
    rows: list[CustomRow] = []
    for shard in shards:
        for key, sample, image, ref in _shard_images(shard, counter):
            where = f"{shard}:{key}"
            try:
                if image is None:
                    raise _BadRow("missing_image", f"{where}: no image member (.{', .'.join(IMAGE_EXTENSIONS)}); the "
                                                   f"sample has {sorted(k for k in sample if not k.startswith('__'))}")
                record = _sample_record(sample, where)
            except _BadRow as bad:
                skips.bad(bad, where)
                continue
            rows += _checked(record, where, skips, lambda rec, w: ref)
    for reason, count in counter.counts.items():   # broken / truncated shards
        if skips.strict:
            raise CustomDataError(f"{' '.join(shards[:3])}: {reason} ({count}); see the warning above for the shard; "
                                  "rewrite or remove the shard")
        skips.counts[reason] += count
    return rows


def _sample_record(sample: dict, where: str) -> dict:
    record: object = {}
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise _BadRow("bad_json", f"{where}: its .json member is not valid JSON ({e}); " + _FIX) from None
    if isinstance(record, dict) and "txt" in sample and not any(f in record for f in (*_KIND_FIELDS, "question",
                                                                                       "conversations")):
        try:
            record = {**record, "caption": sample["txt"].decode("utf-8")}
        except UnicodeDecodeError as e:
            raise _BadRow("bad_text", f"{where}: its .txt caption is not UTF-8 ({e}); " + _FIX) from None
    return record


def iter_row_images(data: CustomData, rows: list[CustomRow] | None = None
                    ) -> Iterator[tuple[CustomRow, str | bytes]]:
    """(row, its image: a path, or the bytes read from its shard) for ``rows`` (default: every row), in order for
    files and shard by shard for webdataset rows (each shard read once)."""
    rows = data.rows if rows is None else rows
    if not data.shards:
        yield from ((row, row.image) for row in rows)
        return
    by_ref: dict[str, list[CustomRow]] = {}
    for row in rows:
        by_ref.setdefault(row.image, []).append(row)
    skips = SkipCounter()
    for shard in dict.fromkeys(ref.rpartition("#")[0] for ref in by_ref):
        for _, _, image, ref in _shard_images(shard, skips):
            for row in by_ref.get(ref, ()):
                yield row, image


# ---- text and training samples -------------------------------------------------------------------------------------
def custom_text_cleaner(kind: str, max_words: int | None) -> Callable[[str], str]:
    """The cleaning of a kind's model input text: caption -> BLIP's pre_caption, vqa -> pre_question (both to
    ``max_words`` words, their defaults when None), instruction -> whitespace normalisation only (spaces collapsed
    and trimmed per line, empty lines dropped; ``max_words`` unused: the tokenizer truncates)."""
    if kind == "caption":
        return text_cleaner("caption", max_words)
    if kind == "vqa":
        return text_cleaner("question", max_words)
    if kind == "instruction":
        return normalize_whitespace
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def normalize_whitespace(text: str) -> str:
    """Runs of spaces / tabs -> one space, each line trimmed, empty lines dropped."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def input_text(row: CustomRow) -> str | None:
    """The model's text input of a row: the question (vqa), the instruction after its context on the line before
    (instruction), None for captions (the caption is the target)."""
    if row.kind == "vqa":
        return row.question
    if row.kind == "instruction":
        return f"{row.context}\n{row.instruction}" if row.context else row.instruction
    return None


def training_samples(row: CustomRow) -> list[tuple[str, dict]]:
    """(text, extra) of the training samples of a row: one per caption; a question with its unique answers, their
    weights (BLIP's VQAv2 rule) and its most common answer as "text_output"; an instruction with its response."""
    if row.kind == "caption":
        return [(c, {}) for c in row.captions]
    if row.kind == "vqa":
        answers, weights = answer_weights(list(row.answers))
        return [(row.question, {"answers": answers, "weights": weights, "text_output": most_common(row.answers)})]
    return [(input_text(row), {"text_output": row.response})]


class CustomSource:
    """Training source (the :class:`blip.data.mixing.Source` protocol) over a :class:`CustomData`: raw samples
    ``{"key", "image", "text", "image_id", "extra"}`` for :func:`blip.data.datasets.decode` (see
    :func:`training_samples`). Units: chunks of ``unit_size`` samples, or one webdataset shard each."""

    def __init__(self, data: CustomData, unit_size: int = 256) -> None:
        self.data, self.unit_size = data, unit_size
        self.samples = [(row, text, extra) for row in data.rows for text, extra in training_samples(row)]
        self.by_shard: dict[str, dict[str, list[int]]] = {shard: {} for shard in data.shards}
        for i, (row, _, _) in enumerate(self.samples):
            if data.shards:
                self.by_shard[row.image.rpartition("#")[0]].setdefault(row.image, []).append(i)

    @property
    def name(self) -> str:
        return f"{self.data.path} ({self.data.kind})"

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_units(self) -> int:
        return len(self.data.shards) if self.data.shards else -(-len(self.samples) // self.unit_size)

    def _raw(self, index: int, image: str | bytes) -> dict:
        row, text, extra = self.samples[index]
        return {"key": row.where, "image": image, "text": text, "image_id": stable_id(row.image), "extra": extra}

    def iter_unit(self, index: int, skips: SkipCounter) -> Iterator[dict]:
        if not self.data.shards:
            for i in range(index * self.unit_size, min((index + 1) * self.unit_size, len(self.samples))):
                yield self._raw(i, self.samples[i][0].image)
            return
        shard = self.data.shards[index]
        wanted = self.by_shard[shard]
        for _, _, image, ref in _shard_images(shard, skips):
            for i in wanted.get(ref, ()):
                yield self._raw(i, image)
