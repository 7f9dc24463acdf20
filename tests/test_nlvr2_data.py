"""NLVR2 annotations (official JSON lines and BLIP's lists), pair samples in the training stream with BLIP's
left/right swap, and a short NLVR2 fine-tuning run on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip.data.datasets import ImageTextStream
from blip.data.nlvr2 import NLVR2Source, read_nlvr2, swap_left_right

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SENTENCES = ["the left image shows more dogs than the right image", "both images contain exactly two cars",
             "one bird is on the right", "there is a boat in the left image"]


def write_images(folder: Path, stems: list[str]) -> None:
    """Left images red, right images blue: a swapped pair is visible in the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / f"{stem}-img0.png")
        Image.new("RGB", (30, 40), (0, 0, 255)).save(folder / f"{stem}-img1.png")


def official_split(root: Path, split: str = "train") -> Path:
    """Official layout: JSON lines; train images in numbered subdirectories given by "directory"."""
    lines = []
    for i, sentence in enumerate(SENTENCES):
        entry = {"identifier": f"{split}-{100 + i}-{i % 4}-0", "sentence": sentence, "label": ["True", "False"][i % 2],
                 "left_url": "http://example.invalid/l.jpg", "synset": "dog"}
        if split == "train":
            entry["directory"] = i % 2
        lines.append(json.dumps(entry))
        write_images(root / split / (str(i % 2) if split == "train" else ""), [f"{split}-{100 + i}-{i % 4}"])
    (root / f"{split}.json").write_text("\n".join(lines) + "\n")
    return root / f"{split}.json"


def test_official_json_lines_and_blip_lists(tmp_path):
    ann = official_split(tmp_path)
    examples = read_nlvr2(ann, tmp_path / "train")
    assert [e.identifier for e in examples][:2] == ["train-100-0-0", "train-101-1-0"]
    assert examples[1].left == tmp_path / "train" / "1" / "train-101-1-img0.png"
    assert examples[1].right == tmp_path / "train" / "1" / "train-101-1-img1.png"
    assert [e.label for e in examples] == [True, False, True, False]
    assert all(e.left.is_file() and e.right.is_file() for e in examples)
    dev = read_nlvr2(official_split(tmp_path, "dev"), tmp_path / "dev")
    assert dev[2].left == tmp_path / "dev" / "dev-102-2-img0.png"   # dev/ and test1/ are flat

    blip_list = tmp_path / "nlvr_dev.json"
    blip_list.write_text(json.dumps([{"images": ["dev/dev-102-2-img0.png", "dev/dev-102-2-img1.png"],
                                      "sentence": SENTENCES[2], "label": "False"}]))
    (e,) = read_nlvr2(blip_list, tmp_path)
    assert (e.identifier, e.left, e.right, e.sentence, e.label) == (
        "dev-102-2#0", dev[2].left, dev[2].right, SENTENCES[2], False)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nlvr2/data/train.json.*lil-lab"):
        read_nlvr2(tmp_path / "nlvr2" / "data" / "train.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="bad.json: entry 0"):
        read_nlvr2(bad)
    bad.write_text(json.dumps({"identifier": "test2-1-0-0", "sentence": "x"}) + "\n")   # hidden test: no labels
    assert read_nlvr2(bad)[0].label is None
    with pytest.raises(ValueError, match="without a label"):
        NLVR2Source(bad)


def test_swap_left_right_is_word_level():
    assert swap_left_right("the left dog is right of the leftover cake") == "the right dog is left of the leftover cake"
    assert swap_left_right(swap_left_right(SENTENCES[0])) == SENTENCES[0]


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def test_pairs_in_the_stream_swap_images_with_their_words(tmp_path):
    source = NLVR2Source(official_split(tmp_path), tmp_path / "train")
    stream = ImageTextStream([source], _to_tensor, batch_size=4, batches_per_epoch=8, seed=3, shuffle_buffer=0)
    swapped = kept = 0
    for batch in stream:
        assert batch["pixel_values"].shape == (4, 2, 3, 8, 8)
        for pair, text, key, label in zip(batch["pixel_values"], batch["text"], batch["key"], batch["label"]):
            original = next(e for e in source.examples if e.identifier == key)
            assert label == int(original.label)
            red_left = bool(pair[0, 0].mean() > 0.9 and pair[1, 2].mean() > 0.9)
            blue_left = bool(pair[0, 2].mean() > 0.9 and pair[1, 0].mean() > 0.9)
            assert red_left != blue_left
            assert text == (original.sentence if red_left else swap_left_right(original.sentence))
            swapped, kept = swapped + blue_left, kept + red_left
    assert swapped > 4 and kept > 4      # 32 samples, each pair swapped with probability 0.5
    plain = ImageTextStream([NLVR2Source(source.annotation, source.image_root, random_swap=False)], _to_tensor,
                            batch_size=4, batches_per_epoch=2, seed=3, shuffle_buffer=0)
    assert all(bool((b["pixel_values"][:, 0, 0] > 0.9).all()) for b in plain)


def test_nlvr2_recipe_trains_a_tiny_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from blip.train.run import quote_stage_override, run

    ann = official_split(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("train", overrides=quote_stage_override([
            "stage=1", "task=nlvr2", "model=blip_tiny", "model.image_size=32", f"run_dir={tmp_path}/run",
            f"output_root={tmp_path}/outputs", "name=test", f"data.datasets.0.annotation={ann}",
            f"data.datasets.0.image_root={tmp_path}/train", "data.num_workers=0", "trainer.batch_size=2",
            "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.threads=null", "~model.freeze",
            "~model.objective"]))
    out = run(cfg)
    assert out["steps"] == 2 and out["samples"] == 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2


def test_init_from_a_single_image_run_starts_both_branches(tmp_path):
    import blip
    from blip.objectives.blip_finetune import wrap_objective
    from blip.train.init import init_from_checkpoint

    source = blip.create_model("blip_tiny", "retrieval")
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt" / "state.pt")
    nlvr = wrap_objective("nlvr", blip.create_model("blip_tiny", "nlvr"))
    init_from_checkpoint(nlvr, tmp_path / "ckpt")
    for i, layer in enumerate(nlvr.text_encoder.layers):
        single = source.text_encoder.layers[i].cross_attn
        for branch in (layer.cross_attn.image0, layer.cross_attn.image1):
            assert torch.equal(branch.kv.weight, single.kv.weight) and torch.equal(branch.out.bias, single.out.bias)
        assert torch.equal(layer.cross_attn.norm.weight, single.norm.weight)
