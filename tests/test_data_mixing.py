"""Dataset mixing in proportion to size (BLIP concatenates its datasets), per-dataset text cleaning, VQA answer
weights from the data config into the loss."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blip.data.datasets import ImageTextStream
from blip.data.mixing import mixed
from blip.data.transforms import image_transform
from blip.models.blip import create
from blip.objectives.blip_finetune import VQAObjective
from blip.train.run import build_sources, dataset_text_cleaners


def write_list(path, n, field="caption", text="A man's dog, running.", **extra):
    path.write_text(json.dumps([{"image": "x.png", field: text, "image_id": i, **extra} for i in range(n)]))
    return str(path)


def endless(tag):
    while True:
        yield tag


def shares(weights, draws=20_000, seed=0):
    gen = mixed([endless(i) for i in range(len(weights))], weights, np.random.default_rng(seed))
    counts = Counter(next(gen) for _ in range(draws))
    return [counts[i] / draws for i in range(len(weights))]


def data_cfg(tmp_path, weights=(None, None, None)):
    sizes = (300, 1200, 2500)
    entries = [{"type": "json", "annotation": write_list(tmp_path / f"s{i}.json", n)} for i, n in enumerate(sizes)]
    for e, w in zip(entries, weights):
        if w is not None:
            e["weight"] = w
    return OmegaConf.create({"datasets": entries, "eval": None, "max_words": 30}), sizes


def test_default_mix_is_proportional_to_size(tmp_path, caplog):
    cfg, sizes = data_cfg(tmp_path)
    with caplog.at_level("INFO"):
        sources, weights, _ = build_sources(cfg)
    assert [s.num_samples for s in sources] == list(sizes)
    got = shares(weights)
    for share, size in zip(got, sizes):
        assert abs(share - size / sum(sizes)) < 0.01 * size / sum(sizes)   # within 1% of the size share
    assert "proportional to size" in caplog.text and "s2 62.50% (2,500 samples)" in caplog.text


def test_explicit_weights_and_their_validation(tmp_path):
    cfg, _ = data_cfg(tmp_path, weights=(1.0, 1.0, 2.0))
    _, weights, _ = build_sources(cfg)
    for share, want in zip(shares(weights, seed=3), (0.25, 0.25, 0.5)):
        assert abs(share - want) < 0.01 * want
    cfg, _ = data_cfg(tmp_path, weights=(1.0, None, 2.0))
    with pytest.raises(ValueError, match=r"not on \['s1'\]"):
        build_sources(cfg)


def test_mixing_order_is_random_but_reproducible():
    a = mixed([endless(0), endless(1)], [1, 1], np.random.default_rng(5))
    b = mixed([endless(0), endless(1)], [1, 1], np.random.default_rng(5))
    first = [next(a) for _ in range(200)]
    assert first == [next(b) for _ in range(200)]
    assert first != [0, 1] * 100 and first[:100].count(0) not in (0, 100)


def test_per_dataset_cleaning_and_vg_answer_weight(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "x.png")
    cfg = OmegaConf.create({"max_words": 30, "eval": None, "datasets": [
        {"type": "json", "annotation": write_list(tmp_path / "cap.json", 4), "image_root": str(tmp_path)},
        {"type": "json", "annotation": write_list(tmp_path / "vqa.json", 4, "question", "What's (in) it?",
                                                  answer=["red", "red", "blue", "red"]),
         "image_root": str(tmp_path), "text_field": "question", "text_cleaning": "question"},
        {"type": "json", "annotation": write_list(tmp_path / "vg.json", 4, "question", "Is it red?", answer="yes"),
         "image_root": str(tmp_path), "text_field": "question", "answer_weight": 0.2},
    ]})
    sources, weights, _ = build_sources(cfg)
    cleaners = dataset_text_cleaners(cfg, len(sources))
    assert cleaners[0]("A man's dog, (running).") == "a man's dog, running"   # captions: pre_caption
    stream = ImageTextStream(sources[1:], image_transform(16), batch_size=8, batches_per_epoch=1, weights=weights[1:],
                             shuffle_buffer=0, text_fn=cleaners[1:])
    batch = next(iter(stream))
    rows = dict(zip(batch["text"], zip(batch["answers"], batch["weights"])))
    assert set(rows) == {"what's in it?", "is it red?"}                # questions: pre_question, both datasets
    assert rows["what's in it?"] == (["red", "blue"], [0.75, 0.25])   # VQAv2: annotator shares
    assert rows["is it red?"] == (["yes"], [0.2])                      # VG-QA: 0.2 (BLIP vqa_dataset.py)
    torch.manual_seed(0)
    obj = VQAObjective(create("blip_tiny", "vqa", image_size=16)).eval()
    vg = [i for i, t in enumerate(batch["text"]) if t == "is it red?"]
    with torch.no_grad():
        loss = obj(batch)["loss"]
        unweighted = obj({**batch, "weights": [[1.0] if i in vg else w
                                               for i, w in enumerate(batch["weights"])]})["loss"]
        one_vg_row = obj({k: v[vg[0]:vg[0] + 1] for k, v in batch.items() if k in ("pixel_values", "text", "answers",
                                                                                   "weights", "image_ids")})["loss"]
    assert vg and torch.allclose(unweighted - loss, 0.8 * len(vg) * (one_vg_row / 0.2) / 8, rtol=1e-4)
