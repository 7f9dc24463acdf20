"""Evaluation metrics against hand-computed values."""
import pytest
import torch

from blip.metrics.retrieval import recall_at_k, rerank_with_itm
from blip.metrics.vqa import answer_accuracy, normalize_answer, vqa_accuracy


def test_recall_hand_computed():
    # 2 images; image 0 has caption 0, image 1 has captions 1 and 2
    s = torch.tensor([[0.9, 0.1, 0.5],
                      [0.2, 0.8, 0.95]])
    r = recall_at_k(s, [[0], [1, 2]], ks=(1, 2))
    assert r["i2t_r1"] == 100.0                     # image 0 -> caption 0 first; image 1 -> caption 2 first
    # text->image: caption 0 ranks image 0 first; caption 1: image 1 (0.8) first; caption 2: image 1 (0.95) first
    assert r["t2i_r1"] == 100.0
    s2 = torch.tensor([[0.1, 0.9, 0.5],
                       [0.2, 0.8, 0.95]])
    r2 = recall_at_k(s2, [[0], [1, 2]], ks=(1, 2, 3))
    assert r2["i2t_r1"] == 50.0 and r2["i2t_r2"] == 50.0 and r2["i2t_r3"] == 100.0
    # caption 0 prefers image 1 (0.2 > 0.1), caption 1 prefers image 0 (0.9 > 0.8): only caption 2 is right
    assert r2["t2i_r1"] == pytest.approx(100 / 3)
    assert r2["t2i_r2"] == 100.0


def test_rerank_keeps_topk_and_adds_itm():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    itm = lambda i, t: (10.0 * (i == t)).float()  # ITM says image i matches caption i
    i2t, t2i = rerank_with_itm(sim, itm, k=2)
    assert i2t[0, 1] == -100 and i2t[0, 0] == pytest.approx(10.9) and i2t[0, 2] == pytest.approx(0.5)
    assert i2t[1, 1] == pytest.approx(10.8) and i2t[1, 0] == -100
    assert t2i.shape == (3, 2) and t2i[2, 0] == pytest.approx(0.5) and t2i[2, 1] == pytest.approx(0.7)


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the cat") == "cat"
    assert normalize_answer("dont") == "don’t"
    assert answer_accuracy("yes", ["yes"] * 10) == 1.0
    assert answer_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)   # (3 * 2/3 + 7 * 1) / 10
    assert answer_accuracy("no", ["yes"] * 10) == 0.0
    acc = vqa_accuracy({1: "yes", 2: "no"}, {1: ["yes"] * 10, 2: ["yes"] * 10})
    assert acc["overall"] == 50.0
    with pytest.raises(KeyError):
        vqa_accuracy({3: "x"}, {1: ["y"]})


def test_caption_metrics_perfect_and_imperfect(java):
    from blip.metrics.captioning import caption_metrics
    refs = {1: ["a dog sitting on a bench"], 2: ["two red cars parked near the street"], 3: ["a cup of coffee"]}
    perfect = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    assert perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE_L"] == pytest.approx(1.0)
    worse = caption_metrics({1: "a cat on a chair", 2: "two red cars", 3: "a cup of tea"}, refs)
    assert worse["CIDEr"] < perfect["CIDEr"] and worse["Bleu_1"] < 1.0
