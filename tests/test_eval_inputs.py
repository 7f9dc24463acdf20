"""Evaluation inputs that make no sense are refused before any model work, naming the file and the entry: repeated
ids, empty splits, missing or mistyped fields, image paths that leave their folder (refused by path, never opened);
and no error echoes a file's content. The tiny benchmark layouts are eval_fixtures' official formats."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import (task_config, write_coco_karpathy, write_gqa, write_nlvr2, write_retrieval,
                           write_vqa)

from blip.data.annotations import AnnotationError
from blip.data.eval_datasets import EmptySplitError, read_task_data
from blip.data.images import ImageDecodeError, load_image
from blip.metrics.vqa import answers_by_id, exact_match_accuracy, vqa_accuracy

REPO = Path(__file__).resolve().parents[1]
VQA_QUESTIONS = "annotations/v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS = "annotations/v2_mscoco_val2014_annotations.json"
KARPATHY = "annotations/coco_karpathy_test.json"


def read(task: str, split: str, root: Path):
    return read_task_data(task_config(task).task, split, root)


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.fixture
def vqa_root(tmp_path, fixtures) -> Path:
    root = tmp_path / "data"
    write_vqa(fixtures, root, VQA_QUESTIONS, VQA_ANNOTATIONS, "annotations/answer_list.json")
    read("vqa_v2", "val", root)   # the layout as written is valid
    return root


# ---- repeated ids --------------------------------------------------------------------------------------------------
def test_a_repeated_question_id_is_refused_in_the_questions(vqa_root):
    def repeat(obj):
        obj["questions"][3]["question_id"] = obj["questions"][1]["question_id"]
    edit_json(vqa_root / VQA_QUESTIONS, repeat)
    with pytest.raises(AnnotationError) as e:
        read("vqa_v2", "val", vqa_root)
    assert str(e.value).startswith(f"{vqa_root / VQA_QUESTIONS}: question_id 7001 appears more than once "
                                   "(entries 1 and 3)")


def test_a_repeated_question_id_is_refused_in_the_annotations(vqa_root):
    def repeat(obj):
        obj["annotations"].append(dict(obj["annotations"][2]))
    edit_json(vqa_root / VQA_ANNOTATIONS, repeat)
    with pytest.raises(AnnotationError, match=r"v2_mscoco_val2014_annotations.json: question_id 12000 appears more "
                                              r"than once \(entries 2 and 8\)"):
        read("vqa_v2", "val", vqa_root)


def test_a_repeated_key_is_refused_in_a_gqa_file(tmp_path, fixtures):
    root = tmp_path / "data"
    write_gqa(fixtures, root)
    path = root / "annotations/testdev_balanced_questions.json"
    text = path.read_text()
    first = text[1:text.index("}") + 1]      # '"2000000": {...}': the first question, given twice
    path.write_text("{" + first + ", " + text[1:])
    with pytest.raises(AnnotationError, match=r"testdev_balanced_questions.json: a JSON object repeats the key "
                                              r"'2000000'"):
        read("gqa", "test", root)


def test_a_repeated_id_in_a_prediction_set_is_refused():
    """As a mapping, a repeated id would keep one of its two answers: the set below would score 100 on one question
    instead of refusing."""
    records = [{"question_id": 1, "answer": "no"}, {"question_id": 2, "answer": "yes"},
               {"question_id": 1, "answer": "yes"}]
    with pytest.raises(AnnotationError, match=r"^the predictions: question_id 1 appears more than once \(entries 0 "
                                              r"and 2\)"):
        answers_by_id(records, "the predictions")
    assert answers_by_id(records[:2], "p") == {1: "no", 2: "yes"}


# ---- empty splits --------------------------------------------------------------------------------------------------
def test_empty_predictions_have_no_accuracy():
    with pytest.raises(ValueError, match="no predictions to score"):
        vqa_accuracy({}, {1: ["yes"]})
    with pytest.raises(ValueError, match="no predictions to score"):
        exact_match_accuracy({}, {1: ["yes"]})


def empty_vqa(root: Path) -> Path:
    edit_json(root / VQA_QUESTIONS, lambda obj: obj.update(questions=[]))
    return root / VQA_QUESTIONS


def empty_list(path: Path) -> Path:
    path.write_text("[]")
    return path


EMPTY = {   # task, split, writes the layout and empties its file -> the file
    "vqa_v2": ("val", lambda f, r: (write_vqa(f, r, VQA_QUESTIONS, VQA_ANNOTATIONS, "annotations/answer_list.json"),
                                    empty_vqa(r))[1]),
    "gqa": ("test", lambda f, r: (write_gqa(f, r), (r / "annotations/testdev_balanced_questions.json").write_text(
        "{}"), r / "annotations/testdev_balanced_questions.json")[2]),
    "caption_coco": ("test", lambda f, r: (write_coco_karpathy(f, r), empty_list(r / KARPATHY))[1]),
    "retrieval_flickr": ("test", lambda f, r: (write_retrieval(f, r, "annotations/flickr30k_test.json",
                                                               "flickr30k-images"),
                                               empty_list(r / "annotations/flickr30k_test.json"))[1]),
    "nlvr2": ("val", lambda f, r: (write_nlvr2(f, r), (r / "nlvr2/data/dev.json").write_text(""),
                                   r / "nlvr2/data/dev.json")[2]),
}


@pytest.mark.parametrize("task", sorted(EMPTY))
def test_an_empty_split_is_refused(tmp_path, fixtures, task):
    split, write = EMPTY[task]
    path = write(fixtures, tmp_path)
    with pytest.raises(EmptySplitError) as e:
        read(task, split, tmp_path)
    assert str(e.value).startswith(f"{path}: no entries")


def test_the_script_refuses_an_empty_split_in_one_line(tmp_path, fixtures):
    """Before: "accuracy 0.00" and exit 0. The data is read before the model loads, so no checkpoint is needed."""
    root = tmp_path / "data"
    write_vqa(fixtures, root, VQA_QUESTIONS, VQA_ANNOTATIONS, "annotations/answer_list.json")
    path = empty_vqa(root)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "task=vqa_v2", "split=val",
                          f"data.root={root}", "checkpoint=unused", f"output_dir={tmp_path / 'out'}",
                          f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}: no entries under 'questions'")
    assert "Traceback" not in out.stderr and "accuracy" not in out.stdout


# ---- missing and mistyped fields -----------------------------------------------------------------------------------
def test_a_missing_field_names_the_file_the_entry_and_the_key(tmp_path, fixtures):
    write_coco_karpathy(fixtures, tmp_path)
    edit_json(tmp_path / KARPATHY, lambda entries: entries[2].pop("image"))
    with pytest.raises(AnnotationError) as e:
        read("caption_coco", "test", tmp_path)
    assert str(e.value).startswith(f"{tmp_path / KARPATHY}: entry 2 has no 'image' field (it has: caption); ")


@pytest.mark.parametrize("field,value,message", [
    ("question_id", None, r"questions\[5\] has no 'question_id' field \(it has: image_id, question\)"),
    ("image_id", "7", r"questions\[5\]: 'image_id' is a JSON string, expected a JSON integer"),
    ("question", ["what?"], r"questions\[5\]: 'question' is a JSON list, expected a JSON string"),
    ("question_id", True, r"questions\[5\]: 'question_id' is a JSON true/false, expected a JSON integer or string"),
])
def test_a_mistyped_question_names_the_file_the_entry_and_the_key(vqa_root, field, value, message):
    def change(obj):
        if value is None:
            del obj["questions"][5][field]
        else:
            obj["questions"][5][field] = value
    edit_json(vqa_root / VQA_QUESTIONS, change)
    with pytest.raises(AnnotationError, match=f"^{vqa_root / VQA_QUESTIONS}: {message}"):
        read("vqa_v2", "val", vqa_root)


def test_a_mistyped_annotation_names_the_nested_entry(vqa_root):
    edit_json(vqa_root / VQA_ANNOTATIONS, lambda obj: obj["annotations"][4]["answers"][3].update(answer=2))
    with pytest.raises(AnnotationError, match=r"annotations\[4\]\.answers\[3\]: 'answer' is a JSON integer, "
                                              r"expected a JSON string"):
        read("vqa_v2", "val", vqa_root)


def test_a_question_without_annotation_is_refused(vqa_root):
    edit_json(vqa_root / VQA_ANNOTATIONS, lambda obj: obj["annotations"].pop(6))
    with pytest.raises(AnnotationError, match=r"1 question\(s\) of .* have no annotation, e.g. question_id 22000"):
        read("vqa_v2", "val", vqa_root)


def test_a_retrieval_caption_of_the_wrong_type_is_named(tmp_path, fixtures):
    write_retrieval(fixtures, tmp_path, "annotations/flickr30k_test.json", "flickr30k-images")
    edit_json(tmp_path / "annotations/flickr30k_test.json", lambda entries: entries[1]["caption"].__setitem__(2, 5))
    with pytest.raises(AnnotationError, match=r"flickr30k_test.json: entry 1: 'caption'\[2\] is a JSON integer"):
        read("retrieval_flickr", "test", tmp_path)


# ---- image paths that leave their folder ---------------------------------------------------------------------------
@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the data root whose content must never reach an error message."""
    path = tmp_path / "private" / "secret.jpg"
    path.parent.mkdir()
    path.write_text("root:x:0:0:SECRET-CONTENT\n")
    return path


@pytest.mark.parametrize("name", ["../private/secret.jpg", "val2014/../../private/secret.jpg", "ABSOLUTE"])
def test_a_karpathy_image_outside_the_data_root_is_refused_by_path(tmp_path, fixtures, secret, name, monkeypatch):
    root = tmp_path / "data"
    write_coco_karpathy(fixtures, root)
    name = str(secret) if name == "ABSOLUTE" else name
    edit_json(root / KARPATHY, lambda entries: entries[3].update(image=name))
    monkeypatch.setattr("blip.data.images.load_image", lambda *a, **k: pytest.fail("an image was opened"))
    with pytest.raises(AnnotationError) as e:
        read("caption_coco", "test", root)
    assert str(e.value).startswith(f"{root / KARPATHY}: entry 3: image {name!r} leaves the image folder {root}")
    assert "SECRET" not in str(e.value)


def test_an_absolute_image_path_inside_the_root_is_accepted(tmp_path, fixtures):
    write_retrieval(fixtures, tmp_path, "annotations/flickr30k_test.json", "flickr30k-images")
    inside = str(tmp_path / "flickr30k-images" / "1000.jpg")
    edit_json(tmp_path / "annotations/flickr30k_test.json", lambda entries: entries[0].update(image=inside))
    assert read("retrieval_flickr", "test", tmp_path).images[0] == Path(inside)


def test_retrieval_gqa_and_nlvr2_images_outside_their_folder_are_refused(tmp_path, fixtures):
    write_retrieval(fixtures, tmp_path, "annotations/flickr30k_test.json", "flickr30k-images")
    edit_json(tmp_path / "annotations/flickr30k_test.json", lambda entries: entries[4].update(image="/etc/passwd"))
    with pytest.raises(AnnotationError, match=r"flickr30k_test.json: entry 4: image '/etc/passwd' leaves"):
        read("retrieval_flickr", "test", tmp_path)
    write_gqa(fixtures, tmp_path)
    gqa = tmp_path / "annotations/testdev_balanced_questions.json"
    edit_json(gqa, lambda questions: questions["2000001"].update(imageId="../../../etc/passwd"))
    with pytest.raises(AnnotationError, match=r"question '2000001': image '../../../etc/passwd.jpg' leaves the image "
                                              r"folder .*gqa/images"):
        read("gqa", "test", tmp_path)
    blip_list = tmp_path / "nlvr2/data/dev.json"
    write_nlvr2(fixtures, tmp_path)
    blip_list.write_text(json.dumps([{"images": ["dev-850-0-img0.png", "../../../etc/passwd"], "sentence": "x",
                                      "label": "True"}]))
    with pytest.raises(AnnotationError, match=r"dev.json: entry 0: image '../../../etc/passwd' leaves"):
        read("nlvr2", "val", tmp_path)


@pytest.mark.parametrize("content,kind", [(b"root:x:0:0:SECRET-CONTENT\n", "it holds text, not image data"),
                                          (b"<!DOCTYPE html><title>SECRET-CONTENT</title>", "HTML error page"),
                                          (b"\x00\x01SECRET-CONTENT\x02", "binary data of an unknown format")])
def test_an_undecodable_file_is_described_never_echoed(tmp_path, content, kind):
    path = tmp_path / "image.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as e:
        load_image(path)
    assert kind in str(e.value) and "not a recognised image format" in str(e.value)
    assert "SECRET" not in str(e.value) and "root:x" not in str(e.value)
