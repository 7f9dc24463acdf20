"""Held-out metrics of a custom split (blip.evaluation.custom): the metrics against hand computation and
pycocoevalcap called directly, every kind on tiny BLIP / BLIP-2 models, and scripts/evaluate.py task=custom."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from eval_fixtures import PHOTOS, tiny_blip
from test_evaluate_sharding import run_script

from blip.data.custom import CustomData, CustomDataError, read_custom
from blip.evaluation.custom import (evaluate_custom, exact_match_percent, predict_custom, score_custom,
                                    vqa_accuracy_percent)

GENERATION = {"num_beams": 1, "max_new_tokens": 4}


def pycocoevalcap_direct(generated: dict, references: dict) -> dict:
    """BLEU-4 and CIDEr as pycocoevalcap's own classes compute them (PTB tokenizer, Bleu(4), Cider)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": v}] for k, v in generated.items()})
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100 * bleu[3], "cider": 100 * cider}


def test_vqa_accuracy_by_hand():
    # 10 answers, 2 of them "2": the leave-one-out subsets without a "2" see 2 matches (2/3), those without one of
    # them see 1 (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    ten = ["2", "2", "3", "3", "3", "4", "4", "4", "4", "5"]
    assert vqa_accuracy_percent([("2", ten)]) == pytest.approx(60.0)
    assert vqa_accuracy_percent([("two", ten)]) == pytest.approx(60.0)   # official normalisation: two -> 2
    # one reference: as if every annotator gave it; articles and case normalised on both sides
    assert vqa_accuracy_percent([("A Dog", ["dog"]), ("cat", ["the dog"])]) == pytest.approx(50.0)
    # two equal references: each leave-one-out subset holds one match: 1/3
    assert vqa_accuracy_percent([("yes", ["Yes", "yes"])]) == pytest.approx(100 / 3)


def test_exact_match_by_hand():
    assert exact_match_percent([("A  Cat\n", "a cat"), ("dog", "a dog"), ("Blue.", "blue.")]) == pytest.approx(
        200 / 3)


def test_caption_and_instruction_scores_are_pycocoevalcap_x100(java):
    refs = {0: ["a cat sits on the red mat", "a cat on a mat"], 1: ["two dogs play in the green park"],
            2: ["a cup of coffee on a saucer", "coffee"]}
    generated = {0: "a cat sits on a mat", 1: "two dogs play in a park", 2: "a cup of coffee on a table"}
    predictions = [{"generated": generated[i], "references": refs[i]} for i in range(3)]
    metrics = score_custom("caption", predictions)
    direct = pycocoevalcap_direct(generated, refs)
    assert metrics == pytest.approx(direct, rel=1e-12)
    assert 0 < metrics["bleu4"] < 100 and metrics["cider"] > 0
    same = [{"generated": r[0], "references": [r[0]]} for r in refs.values()]
    assert score_custom("caption", same)["bleu4"] == pytest.approx(100.0, rel=1e-6)   # identical strings
    inst = score_custom("instruction", [{"generated": "The sky is BLUE", "references": ["the sky is blue"]},
                                        {"generated": "no", "references": ["yes it is"]}])
    assert inst["exact_match"] == pytest.approx(50.0)
    assert inst["bleu4"] == pytest.approx(pycocoevalcap_direct({0: "The sky is BLUE", 1: "no"},
                                                               {0: ["the sky is blue"], 1: ["yes it is"]})["bleu4"])


def write_split(root: Path, fixtures: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copy(fixtures / "images" / name, root / name)
    path = root / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CAPTIONS = [{"image": "cat.jpg", "caption": "a tabby cat"}, {"image": "coffee.jpg", "caption": "a cup of coffee"},
            {"image": "cat.jpg", "caption": ["a cat looking up", "the cat"]},
            {"image": "rocket.jpg", "caption": "a launch"}]
QUESTIONS = [{"image": "cat.jpg", "question": "What animal is it?", "answer": ["cat", "cat", "dog"]},
             {"image": "coffee.jpg", "question": "What drink?", "answer": "coffee"},
             {"image": "rocket.jpg", "question": "Is it night?", "answer": ["yes", "no"]}]
INSTRUCTIONS = [{"image": "cat.jpg", "instruction": "Describe  the image.", "response": "A cat."},
                {"image": "rocket.jpg", "instruction": "What  happens?", "response": "A launch.",
                 "context": "Describe the image.\nA rocket."}]


def test_blip_caption_split_scores_each_image_against_all_its_references(tmp_path, fixtures, java, one_thread):
    data = read_custom(write_split(tmp_path, fixtures, CAPTIONS))
    model = tiny_blip("caption")
    metrics = evaluate_custom(model, data, batch_size=2, generation=GENERATION, max_shown=2)
    assert set(metrics) == {"kind", "num_items", "bleu4", "cider", "samples"} and metrics["kind"] == "caption"
    assert metrics["num_items"] == 3   # cat.jpg's rows are one item
    direct = model.caption([str(tmp_path / n) for n in ("cat.jpg", "coffee.jpg", "rocket.jpg")], **GENERATION)
    refs = {0: ["a tabby cat", "a cat looking up", "the cat"], 1: ["a cup of coffee"], 2: ["a launch"]}
    expected = pycocoevalcap_direct(dict(enumerate(direct)), refs)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert [s["generated"] for s in metrics["samples"]] == direct[:2]
    assert metrics["samples"][0] == {"image": str(tmp_path / "cat.jpg"), "input": None, "generated": direct[0],
                                     "reference": "a tabby cat | a cat looking up | the cat"}
    prompted = predict_custom(model, data, generation=GENERATION, prompt="a photo of ")
    assert [p["generated"] for p in prompted] == model.caption(
        [str(tmp_path / n) for n in ("cat.jpg", "coffee.jpg", "rocket.jpg")], prompt="a photo of ", **GENERATION)


def test_blip_vqa_split(tmp_path, fixtures, one_thread):
    data = read_custom(write_split(tmp_path, fixtures, QUESTIONS))
    model = tiny_blip("vqa", seed=3)
    predictions = predict_custom(model, data, generation={"num_beams": 1})   # one batch: BLIP pads questions
    direct = model.answer([str(tmp_path / q["image"]) for q in QUESTIONS], [q["question"] for q in QUESTIONS],
                          num_beams=1)
    assert [p["generated"] for p in predictions] == direct
    metrics = evaluate_custom(model, data, generation={"num_beams": 1})
    expected = vqa_accuracy_percent([(a, q["answer"] if isinstance(q["answer"], list) else [q["answer"]])
                                     for a, q in zip(direct, QUESTIONS)])
    assert metrics["vqa_accuracy"] == pytest.approx(expected) and metrics["num_items"] == 3
    assert metrics["samples"][0]["input"] == "What animal is it?"
    with pytest.raises(ValueError, match="model.task=vqa"):
        evaluate_custom(tiny_blip("caption"), data)


def tiny_blip2_opt(fixtures):
    from blip import create_model
    torch.manual_seed(0)
    return create_model("blip2_tiny_opt", "stage2", tokenizer=fixtures / "lavis/blip2_opt/opt_llm").eval()


def test_blip2_caption_and_instruction_splits(tmp_path, fixtures, java, one_thread):
    model = tiny_blip2_opt(fixtures)
    captions = read_custom(write_split(tmp_path / "c", fixtures, CAPTIONS))
    metrics = evaluate_custom(model, captions, generation=GENERATION)
    direct = model.caption([str(tmp_path / "c" / n) for n in ("cat.jpg", "coffee.jpg", "rocket.jpg")], **GENERATION)
    assert [s["generated"] for s in metrics["samples"]] == direct   # the model's own prompt ("a photo of")
    assert {"bleu4", "cider"} <= set(metrics)

    instructions = read_custom(write_split(tmp_path / "i", fixtures, INSTRUCTIONS))
    metrics = evaluate_custom(model, instructions, generation=GENERATION)
    assert set(metrics) == {"kind", "num_items", "exact_match", "bleu4", "samples"} and metrics["num_items"] == 2
    prompts = ["Describe the image.", "Describe the image.\nA rocket.\nWhat happens?"]   # whitespace normalised
    assert [s["generated"] for s in metrics["samples"]] == model.complete(
        [str(tmp_path / "i" / n) for n in ("cat.jpg", "rocket.jpg")], prompts, num_beams=1, max_new_tokens=4,
        min_new_tokens=1)
    assert metrics["exact_match"] == 0.0

    questions = read_custom(write_split(tmp_path / "q", fixtures, QUESTIONS))
    predictions = predict_custom(model, questions, generation={"num_beams": 1}, prompt="Q: {} A:")
    assert [p["generated"] for p in predictions] == model.answer(
        [str(tmp_path / "q" / q["image"]) for q in QUESTIONS], [q["question"] for q in QUESTIONS],
        prompt="Q: {} A:", num_beams=1)


def test_an_empty_split_names_its_file(tmp_path):
    with pytest.raises(CustomDataError, match=r"empty\.jsonl: no rows to evaluate"):
        evaluate_custom(tiny_blip("caption"), CustomData(tmp_path / "empty.jsonl", [], "caption", {}))


def test_scripts_evaluate_task_custom(tmp_path, fixtures, java):
    from blip.convert.blip import save_safetensors
    split = write_split(tmp_path / "data", fixtures, [dict(r, image=f"photos/{r['image']}") for r in CAPTIONS])
    (tmp_path / "photos").mkdir()
    for name in PHOTOS:
        shutil.move(tmp_path / "data" / name, tmp_path / "photos" / name)
    save_safetensors(tiny_blip("caption"), tmp_path / "caption.safetensors")
    out = tmp_path / "out"
    proc = run_script(["task=custom", f"data.val={split}", f"data.image_root={tmp_path}", "device=cpu",
                       f"checkpoint={tmp_path / 'caption.safetensors'}", f"output_dir={out}", "batch_size=2",
                       "+task.generation.num_beams=1", "+task.generation.max_new_tokens=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("custom caption: bleu4 ")]
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert metrics["num_items"] == len(predictions) == 3 and metrics["data"] == str(split)
    refs = {i: p["references"] for i, p in enumerate(predictions)}
    expected = pycocoevalcap_direct({i: p["generated"] for i, p in enumerate(predictions)}, refs)
    assert metrics["bleu4"] == pytest.approx(expected["bleu4"]) and metrics["cider"] == pytest.approx(expected["cider"])

    proc = run_script(["task=custom", f"data.val={split}", f"checkpoint={tmp_path / 'nope.pth'}",
                       f"output_dir={tmp_path / 'out2'}"])
    assert proc.returncode == 2 and "val.jsonl:1: image 'photos/cat.jpg' not found" in proc.stderr
    assert "Traceback" not in proc.stderr
