"""Readers for the evaluation sets, in the layouts their owners publish (docs/data.md lists URLs and trees).

Every reader first collects the files it needs and raises :class:`MissingDataError` listing *all* missing ones, with
where each comes from, before anything is loaded. Formats:

- ``coco_karpathy``: BLIP/LAVIS ``coco_karpathy_{val,test}.json`` (``[{"image", "caption": [...]}]``) for the image
  list + the COCO-format ``*_gt.json`` references that pycocoevalcap scores against (image id = the number in the
  COCO file name, as BLIP derives it).
- ``nocaps``: the official ``nocaps_val_4500_captions.json`` (COCO format; ``images[i]["domain"]``).
- ``vqa``: the official VQA question / annotation JSON (VQAv2, OK-VQA): ``{"questions": [...]}`` +
  ``{"annotations": [{"question_id", "answers": [{"answer"}...], "answer_type"}]}``; images ``<prefix>%012d.jpg``.
- ``gqa``: ``{split}_balanced_questions.json`` (``{question_id: {"imageId", "question", "answer"}}``).
- ``karpathy_retrieval``: ``{coco_karpathy,flickr30k}_test.json`` (``[{"image", "caption": [5 captions]}]``).
- ``nlvr2``: the official ``dev.json`` / ``test1.json`` JSON lines or BLIP's ``nlvr_{dev,test}.json`` lists
  (:func:`blip.data.nlvr2.read_nlvr2`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .annotations import FIX, JSON_TYPES, AnnotationError, entry_field, image_inside, json_type, unique_ids


class MissingDataError(FileNotFoundError):
    """Evaluation data is not where the config says; the message lists every missing path and its source."""


class EmptySplitError(ValueError):
    """An evaluation split has no entries: its score would be a 0 that means nothing."""


@dataclass
class CaptionData:
    """image_ids[i] / images[i]: the images to caption; references: image id -> captions (None without ground
    truth); gt_file: the COCO-format reference file; domains: image id -> NoCaps domain (None elsewhere)."""
    image_ids: list[int]
    images: list[Path]
    references: dict[int, list[str]] | None
    gt_file: Path | None
    domains: dict[int, str] | None = None


@dataclass
class VQAData:
    """One entry per question (question_ids[i], images[i], questions[i], already BLIP-cleaned); answers: question id
    -> the human answers (None for test splits); answer_types: question id -> "yes/no" | "number" | "other"."""
    question_ids: list[Any]
    images: list[Path]
    questions: list[str]
    answers: dict[Any, list[str]] | None
    answer_types: dict[Any, str] | None
    answer_list: list[str] | None = None
    answer_list_missing: str | None = None  # the missing-file message, raised only by protocols that rank answers


@dataclass
class RetrievalData:
    """images[i]; texts[j] (pre_caption-cleaned); img2txt[i]: the texts describing image i."""
    images: list[Path]
    texts: list[str]
    img2txt: list[list[int]] = field(default_factory=list)


@dataclass
class NLVRData:
    """One entry per sentence: identifiers[i], its image pair (lefts[i], rights[i]), sentences[i] (BLIP-cleaned),
    labels[i] (True / False; None without ground truth)."""
    identifiers: list[str]
    lefts: list[Path]
    rights: list[Path]
    sentences: list[str]
    labels: list[bool | None]

    @property
    def images(self) -> list[tuple[Path, Path]]:
        return list(zip(self.lefts, self.rights))


def check_files(required: Mapping[str, tuple[Path, str]], what: str) -> None:
    """required: name -> (path, where it comes from). Raises one MissingDataError listing every missing path."""
    missing = [(name, path, source) for name, (path, source) in required.items() if not path.exists()]
    if missing:
        lines = [f"  {path}\n      ({name}) from {source}" for name, path, source in missing]
        raise MissingDataError(f"{what}: {len(missing)} required file(s) missing:\n" + "\n".join(lines) +
                               "\nDownload them to those paths (docs/data.md shows the expected tree), or point "
                               "data.root / the task's paths elsewhere.")


def required_files(task: Mapping, split: str, root: str | Path) -> dict[str, tuple[Path, str]]:
    """The files (and image folders) ``task`` needs for ``split``, resolved under ``root``."""
    splits = task["splits"]
    if split not in splits:
        raise ValueError(f"task {task['name']} has no split {split!r}; choose one of {sorted(splits)}")
    root = Path(root)
    out = {}
    for key, rel in splits[split].items():
        if key in task.get("sources", {}) and rel:
            out[key] = (root / rel, task["sources"][key])
    return out


def _read_json(path: Path) -> Any:
    """The file's JSON; an object that repeats a key is refused (json.loads would keep the last one silently: a
    GQA question id given twice would lose a question)."""
    def unique_keys(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            repeated = next(k for i, (k, _) in enumerate(pairs) if any(k == other for other, _ in pairs[:i]))
            raise AnnotationError(f"{path}: a JSON object repeats the key {repeated!r}; keys (ids) must be unique: "
                                  "remove the repeat or re-download the file")
        return obj
    try:
        return json.loads(path.read_text(), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-download it") from e


def _entries(container: Any, key: str | None, path: Path, kind: type = list) -> Any:
    """The file's list (or object) of entries, at top level or under ``key``, refused when empty: an empty split
    would print a score of 0 that means nothing."""
    entries = container if key is None else entry_field(container, key, (kind,), path, "the file")
    if not isinstance(entries, kind):
        raise AnnotationError(f"{path}: the file holds a JSON {json_type(entries)}, expected a JSON "
                              f"{JSON_TYPES[kind]} of entries; {FIX}")
    if not entries:
        raise EmptySplitError(f"{path}: no entries{f' under {key!r}' if key else ''}: an empty split has no "
                              "score; point the task at the right file or re-download it")
    return entries


def coco_references(gt_file: Path) -> dict[int, list[str]]:
    """COCO-format caption file -> image id -> reference captions (every image listed, in file order)."""
    gt = _read_json(gt_file)
    images = _entries(gt, "images", gt_file) if isinstance(gt, dict) and "images" in gt else []
    refs: dict[int, list[str]] = {entry_field(img, "id", (int,), gt_file, f"images[{i}]"): []
                                  for i, img in enumerate(images)}
    for i, ann in enumerate(_entries(gt, "annotations", gt_file)):
        where = f"annotations[{i}]"
        refs.setdefault(entry_field(ann, "image_id", (int,), gt_file, where), []).append(
            entry_field(ann, "caption", (str,), gt_file, where))
    return refs


def coco_image_id(image: str) -> int:
    """BLIP's image id of a Karpathy entry: ``val2014/COCO_val2014_000000391895.jpg`` -> 391895."""
    return int(Path(image).stem.split("_")[-1])


def read_caption_data(task: Mapping, split: str, root: str | Path) -> CaptionData:
    files = required_files(task, split, root)
    check_files(files, f"{task['name']} ({split})")
    paths = {k: p for k, (p, _) in files.items()}
    images_root = paths.get("images", Path(root))
    if task["format"] == "coco_karpathy":
        annotation = paths["annotation"]
        ids, images = [], []
        for i, e in enumerate(_entries(_read_json(annotation), None, annotation)):
            name = entry_field(e, "image", (str,), annotation, f"entry {i}")
            images.append(image_inside(root, name, annotation, f"entry {i}"))
            try:
                ids.append(coco_image_id(name))
            except ValueError:
                raise AnnotationError(f"{annotation}: entry {i}: image {name!r} does not end in a COCO image id "
                                      "(COCO_val2014_000000391895.jpg); " + FIX) from None
        unique_ids(ids, annotation, "image id")
        gt = paths.get("gt")
        return CaptionData(ids, images, coco_references(gt) if gt else None, gt)
    if task["format"] == "nocaps":
        gt_file = paths["gt"]
        gt = _read_json(gt_file)
        ids, images, domains = [], [], {}
        for i, img in enumerate(_entries(gt, "images", gt_file)):
            where = f"images[{i}]"
            ids.append(entry_field(img, "id", (int,), gt_file, where))
            images.append(image_inside(images_root, entry_field(img, "file_name", (str,), gt_file, where), gt_file,
                                       where))
            domains[ids[-1]] = entry_field(img, "domain", (str,), gt_file, where)
        unique_ids(ids, gt_file, "image id")
        refs = coco_references(gt_file) if gt.get("annotations") else None
        return CaptionData(ids, images, refs, gt_file if refs else None, domains)
    raise ValueError(f"unknown caption format {task['format']!r} (coco_karpathy | nocaps)")


def read_vqa_data(task: Mapping, split: str, root: str | Path, max_words: int = 50) -> VQAData:
    """Questions BLIP-cleaned (pre_question); GQA or the official VQA format (see the module docstring)."""
    from .text import pre_question
    files = required_files(task, split, root)
    ranking = {"answer_list": files.pop("answer_list")} if "answer_list" in files else {}  # BLIP's rank protocol only
    check_files(files, f"{task['name']} ({split})")
    paths = {k: p for k, (p, _) in files.items()}
    answer_list = missing = None
    try:
        check_files(ranking, f"{task['name']} ({split}), ranking answers")
        answer_list = _read_json(ranking["answer_list"][0]) if ranking else None
    except MissingDataError as e:
        missing = str(e)
    qfile = paths["questions"]
    if task["format"] == "gqa":   # {question id: question}: the ids are the object's keys, unique by _read_json
        questions = _entries(_read_json(qfile), None, qfile, kind=dict)
        qids = list(questions)
        images, texts, answers = [], [], {}
        for q in qids:
            where = f"question {q!r}"
            name = f"{entry_field(questions[q], 'imageId', (str,), qfile, where)}.jpg"
            images.append(image_inside(paths["images"], name, qfile, where))
            texts.append(pre_question(entry_field(questions[q], "question", (str,), qfile, where), max_words))
            if "answer" in questions[q]:
                answers[q] = [entry_field(questions[q], "answer", (str,), qfile, where)]
        return VQAData(qids, images, texts, answers or None, None, answer_list, missing)
    if task["format"] != "vqa":
        raise ValueError(f"unknown VQA format {task['format']!r} (vqa | gqa)")
    pattern = task["splits"][split]["image_pattern"]
    qids, images, texts = [], [], []
    for i, q in enumerate(_entries(_read_json(qfile), "questions", qfile)):
        where = f"questions[{i}]"
        qids.append(entry_field(q, "question_id", (int, str), qfile, where))
        images.append(image_inside(root, pattern % entry_field(q, "image_id", (int,), qfile, where), qfile, where))
        texts.append(pre_question(entry_field(q, "question", (str,), qfile, where), max_words))
    unique_ids(qids, qfile, "question_id")
    answers = types = None
    if "annotations" in paths:
        answers, types = read_vqa_annotations(paths["annotations"])
        unanswered = [q for q in qids if q not in answers]
        if unanswered:
            raise AnnotationError(f"{paths['annotations']}: {len(unanswered)} question(s) of {qfile} have no "
                                  f"annotation, e.g. question_id {unanswered[0]!r}; use the annotations of the same "
                                  "split, or re-download them")
    return VQAData(qids, images, texts, answers, types, answer_list, missing)


def read_vqa_annotations(path: Path) -> tuple[dict[Any, list[str]], dict[Any, str]]:
    """The official VQA annotation file -> (question id -> the human answers, question id -> answer type)."""
    answers, types = {}, {}
    anns = _entries(_read_json(path), "annotations", path)
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        qid = entry_field(a, "question_id", (int, str), path, where)
        given = entry_field(a, "answers", (list,), path, where)
        if not given:
            raise AnnotationError(f"{path}: {where}: 'answers' is empty; a question needs its human answers; {FIX}")
        answers[qid] = [entry_field(x, "answer", (str,), path, f"{where}.answers[{k}]") for k, x in enumerate(given)]
        types[qid] = entry_field(a, "answer_type", (str,), path, where)
    unique_ids([a["question_id"] for a in anns], path, "question_id")
    return answers, types


def read_retrieval_data(task: Mapping, split: str, root: str | Path, max_words: int = 30) -> RetrievalData:
    """One image per entry; its captions, BLIP-cleaned to ``max_words`` words, numbered in file order."""
    from .text import pre_caption
    files = required_files(task, split, root)
    check_files(files, f"{task['name']} ({split})")
    annotation = files["annotation"][0]
    data = RetrievalData([], [])
    for i, entry in enumerate(_entries(_read_json(annotation), None, annotation)):
        where = f"entry {i}"
        captions = entry_field(entry, "caption", (list, str), annotation, where)
        captions = captions if isinstance(captions, list) else [captions]
        if not captions:
            raise AnnotationError(f"{annotation}: {where}: 'caption' is an empty list; {FIX}")
        bad = next((k for k, c in enumerate(captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise AnnotationError(f"{annotation}: {where}: 'caption'[{bad}] is a JSON {json_type(captions[bad])}, "
                                  f"expected a JSON string; {FIX}")
        data.images.append(image_inside(root, entry_field(entry, "image", (str,), annotation, where), annotation,
                                        where))
        data.img2txt.append(list(range(len(data.texts), len(data.texts) + len(captions))))
        data.texts += [pre_caption(c, max_words) for c in captions]
    return data


def read_nlvr_data(task: Mapping, split: str, root: str | Path, max_words: int = 40) -> NLVRData:
    from .nlvr2 import read_nlvr2
    from .text import pre_caption
    files = required_files(task, split, root)
    check_files(files, f"{task['name']} ({split})")
    examples = read_nlvr2(files["annotation"][0], files["images"][0])
    if not examples:
        raise EmptySplitError(f"{files['annotation'][0]}: no entries: an empty split has no score; point the task at "
                              "the right file or re-download it")
    unique_ids([e.identifier for e in examples], files["annotation"][0], "identifier")
    return NLVRData([e.identifier for e in examples], [e.left for e in examples], [e.right for e in examples],
                    [pre_caption(e.sentence, max_words) for e in examples], [e.label for e in examples])


def read_task_data(task: Mapping, split: str, root: str | Path):
    """The task's dataset; raises MissingDataError listing every missing file before any model work."""
    kind = task["kind"]
    if kind == "caption":
        return read_caption_data(task, split, root)
    if kind == "vqa":
        return read_vqa_data(task, split, root)
    if kind == "retrieval":
        return read_retrieval_data(task, split, root, max_words=task.get("max_words", 30))
    if kind == "nlvr":
        return read_nlvr_data(task, split, root, max_words=task.get("max_words", 40))
    raise ValueError(f"unknown task kind {kind!r} (caption | vqa | retrieval | nlvr)")
