"""Tiny evaluation sets written in the official file formats (real photos), tiny models, and the in-process runner."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from blip.evaluation.runner import context_settings, evaluate
from blip.train.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg", "hubble_deep_field.jpg")
NAMES = ("cat", "cup of coffee", "rocket", "astronaut", "galaxy field")


def coco_file(image_id: int, subset: str = "val2014") -> str:
    return f"{subset}/COCO_{subset}_{image_id:012d}.jpg"


def place_photos(fixtures: Path, root: Path, paths: list[str]) -> None:
    for i, rel in enumerate(paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixtures / "images" / PHOTOS[i % len(PHOTOS)], root / rel)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def captions_of(i: int) -> list[str]:
    name = NAMES[i % len(NAMES)]
    return [f"a photo of a {name}", f"the {name} seen up close", f"a {name} in the picture",
            f"there is a {name} here", f"an image showing one {name}"]


def write_coco_karpathy(fixtures: Path, root: Path, split: str = "test", n: int = 5) -> list[int]:
    """coco_karpathy_{split}.json (BLIP) + coco_karpathy_{split}_gt.json (COCO format); image ids 101, 102, ..."""
    ids = [101 + i for i in range(n)]
    place_photos(fixtures, root, [coco_file(i) for i in ids])
    dump(root / f"annotations/coco_karpathy_{split}.json",
         [{"image": coco_file(image_id), "caption": captions_of(i)} for i, image_id in enumerate(ids)])
    anns = [{"image_id": image_id, "caption": c, "id": 1000 * image_id + k}
            for i, image_id in enumerate(ids) for k, c in enumerate(captions_of(i))]
    dump(root / f"annotations/coco_karpathy_{split}_gt.json",
         {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in ids], "annotations": anns})
    return ids


def write_nocaps(fixtures: Path, root: Path, n: int = 6) -> None:
    domains = ["in-domain", "near-domain", "out-domain"]
    images = [{"id": i, "file_name": f"{i:04x}abcd.jpg", "domain": domains[i % 3]} for i in range(n)]
    place_photos(fixtures, root, [f"nocaps/val/{im['file_name']}" for im in images])
    anns = [{"image_id": im["id"], "caption": c, "id": 10 * im["id"] + k}
            for im in images for k, c in enumerate(captions_of(im["id"]))]
    dump(root / "annotations/nocaps_val_4500_captions.json", {"licenses": [], "info": {}, "images": images,
                                                               "annotations": anns})


ANSWER_LIST = ["yes", "no", "2", "cat", "red", "blue", "coffee"]
TYPES = ["yes/no", "number", "other"]


def vqa_answers(q: int) -> list[str]:
    """10 human answers with disagreement, so accuracies take the fractional values of the official formula."""
    a, b = ANSWER_LIST[q % len(ANSWER_LIST)], ANSWER_LIST[(q * 3 + 1) % len(ANSWER_LIST)]
    return [a] * (q % 5 + 2) + [b] * (8 - q % 5)


def write_vqa(fixtures: Path, root: Path, questions_file: str, annotations_file: str | None, answer_list: str,
              n_images: int = 4, per_image: int = 2, subset: str = "val2014") -> None:
    """The official VQA question / annotation JSON (VQAv2 and OK-VQA share it) + an answer list."""
    image_ids = [7 + 5 * i for i in range(n_images)]
    place_photos(fixtures, root, [coco_file(i, subset) for i in image_ids])
    texts = ["what is in the picture?", "how many objects are there?", "is it red?"]
    qs = [{"image_id": img, "question": texts[(i * per_image + k) % 3], "question_id": img * 1000 + k}
          for i, img in enumerate(image_ids) for k in range(per_image)]
    dump(root / questions_file, {"task_type": "Open-Ended", "data_type": "mscoco", "questions": qs})
    if annotations_file:
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": TYPES[i % 3],
                 "question_type": "what", "multiple_choice_answer": vqa_answers(i)[0],
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                             for k, a in enumerate(vqa_answers(i))]} for i, q in enumerate(qs)]
        dump(root / annotations_file, {"annotations": anns})
    dump(root / answer_list, ANSWER_LIST)


def write_gqa(fixtures: Path, root: Path, n: int = 5) -> None:
    place_photos(fixtures, root, [f"gqa/images/n{1000 + i}.jpg" for i in range(n)])
    questions = {f"20{i:05d}": {"imageId": f"n{1000 + i}", "question": "What is this?", "answer": ANSWER_LIST[i],
                                "fullAnswer": "It is."} for i in range(n)}
    dump(root / "annotations/testdev_balanced_questions.json", questions)


def write_retrieval(fixtures: Path, root: Path, annotation: str, image_dir: str, n: int = 5) -> list[str]:
    """BLIP's Karpathy retrieval list [{"image", "caption": [...]}] (COCO and Flickr30k share the format)."""
    paths = [f"{image_dir}/{1000 + i}.jpg" for i in range(n)]
    place_photos(fixtures, root, paths)
    dump(root / annotation, [{"image": p, "caption": captions_of(i)} for i, p in enumerate(paths)])
    return paths


def task_config(task: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "evaluate"), version_base=None):
        return compose("evaluate", overrides=[f"task={task}", "checkpoint=unused", "output_dir=unused",
                                              "progress_bar=false", "num_workers=0", "batch_size=2", *overrides])


def run_task(model, task: str, split: str, root: Path, out: Path, overrides: tuple[str, ...] = (),
             info: DistInfo | None = None) -> dict:
    cfg = task_config(task, overrides)
    return evaluate(model, cfg.task, split, root, out, context_settings(cfg, info or DistInfo()),
                    label={"checkpoint": "test", "zero_shot": False})


def tiny_blip(task: str, seed: int = 0, **overrides):
    import blip
    torch.manual_seed(seed)
    return blip.create_model("blip_tiny", task, **overrides).eval()


def write_nlvr2(fixtures: Path, root: Path, n: int = 5) -> list[dict]:
    """The official NLVR2 JSON lines (dev.json) and its flat image folder (<pair>-img0.png, <pair>-img1.png)."""
    entries = []
    for i in range(n):
        pair = f"dev-{850 + i}-0"
        place_photos(fixtures, root, [f"nlvr2/images/dev/{pair}-img0.png"])
        (root / f"nlvr2/images/dev/{pair}-img1.png").write_bytes(
            (fixtures / "images" / PHOTOS[(i + 2) % len(PHOTOS)]).read_bytes())
        entries.append({"identifier": f"{pair}-{i % 2}", "sentence": f"The left image shows a {NAMES[i]}.",
                        "label": "True" if i % 2 else "False", "synset": "x", "query": "y"})
    path = root / "nlvr2/data/dev.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return entries
