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


class MissingDataError(FileNotFoundError):
    """Evaluation data is not where the config says; the message lists every missing path and its source."""


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
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-download it") from e


def coco_references(gt_file: Path) -> dict[int, list[str]]:
    """COCO-format caption file -> image id -> reference captions (every image listed, in file order)."""
    gt = _read_json(gt_file)
    refs: dict[int, list[str]] = {int(img["id"]): [] for img in gt.get("images", [])}
    for ann in gt["annotations"]:
        refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
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
        entries = _read_json(paths["annotation"])
        ids = [coco_image_id(e["image"]) for e in entries]
        images = [Path(root) / e["image"] for e in entries]
        gt = paths.get("gt")
        return CaptionData(ids, images, coco_references(gt) if gt else None, gt)
    if task["format"] == "nocaps":
        gt = _read_json(paths["gt"])
        ids = [int(img["id"]) for img in gt["images"]]
        images = [images_root / img["file_name"] for img in gt["images"]]
        domains = {int(img["id"]): img["domain"] for img in gt["images"]}
        refs = coco_references(paths["gt"]) if gt.get("annotations") else None
        return CaptionData(ids, images, refs, paths["gt"] if refs else None, domains)
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
    if task["format"] == "gqa":
        questions = _read_json(paths["questions"])
        qids = list(questions)
        images = [paths["images"] / f"{questions[q]['imageId']}.jpg" for q in qids]
        texts = [pre_question(questions[q]["question"], max_words) for q in qids]
        answers = {q: [questions[q]["answer"]] for q in qids if "answer" in questions[q]} or None
        return VQAData(qids, images, texts, answers, None, answer_list, missing)
    if task["format"] != "vqa":
        raise ValueError(f"unknown VQA format {task['format']!r} (vqa | gqa)")
    questions = _read_json(paths["questions"])["questions"]
    pattern = task["splits"][split]["image_pattern"]
    qids = [q["question_id"] for q in questions]
    images = [Path(root) / (pattern % q["image_id"]) for q in questions]
    texts = [pre_question(q["question"], max_words) for q in questions]
    answers = types = None
    if "annotations" in paths:
        anns = _read_json(paths["annotations"])["annotations"]
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
        types = {a["question_id"]: a["answer_type"] for a in anns}
    return VQAData(qids, images, texts, answers, types, answer_list, missing)


def read_retrieval_data(task: Mapping, split: str, root: str | Path, max_words: int = 30) -> RetrievalData:
    """One image per entry; its captions, BLIP-cleaned to ``max_words`` words, numbered in file order."""
    from .text import pre_caption
    files = required_files(task, split, root)
    check_files(files, f"{task['name']} ({split})")
    entries = _read_json(files["annotation"][0])
    data = RetrievalData([], [])
    for entry in entries:
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        data.images.append(Path(root) / entry["image"])
        data.img2txt.append(list(range(len(data.texts), len(data.texts) + len(captions))))
        data.texts += [pre_caption(c, max_words) for c in captions]
    return data


def read_nlvr_data(task: Mapping, split: str, root: str | Path, max_words: int = 40) -> NLVRData:
    from .nlvr2 import read_nlvr2
    from .text import pre_caption
    files = required_files(task, split, root)
    check_files(files, f"{task['name']} ({split})")
    examples = read_nlvr2(files["annotation"][0], files["images"][0])
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
