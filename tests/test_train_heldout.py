"""Held-out metrics: recall@K from a similarity matrix and caption attribute accuracy, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from blip.data.synthetic import parse_attributes
from blip.metrics.retrieval import recall_at_k as retrieval_recall
from blip.train.heldout import attribute_accuracy, itm_metrics


def test_recall_by_hand():
    # 3 images, 4 texts; image 0 ↔ texts {0, 1}, image 1 ↔ {2}, image 2 ↔ {3}
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],    # top-1 text 0: hit
                        [0.8, 0.1, 0.7, 0.0],    # top-1 text 0 (wrong), text 2 second: R@1 miss, R@5 hit
                        [0.0, 0.3, 0.2, 0.1]])   # top-1 text 1 (wrong), text 3 third
    out = retrieval_recall(sim, [[0, 1], [2], [3]], ks=(1, 2, 5))
    assert out["i2t_r1"] == pytest.approx(100 / 3)
    assert out["i2t_r2"] == pytest.approx(200 / 3)
    assert out["i2t_r5"] == pytest.approx(100)
    # texts → images: text 0 → image 0 (0.9) hit; text 1 → image 2 (0.3) miss; text 2 → image 1 (0.7) hit;
    # text 3 → image 2 (0.1) hit
    assert out["t2i_r1"] == pytest.approx(75)
    assert out["chance_i2t_r1"] == pytest.approx(100 * (2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert out["chance_t2i_r1"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        retrieval_recall(sim, [[0], [2], [2]])  # text 1 and 3 have no image


def test_recall_with_a_text_shared_by_images():
    sim = torch.tensor([[0.2, 0.9], [0.1, 0.8], [0.7, 0.3]])  # images 0 and 1 show what text 1 says
    out = retrieval_recall(sim, [[1], [1], [0]], ks=(1,))
    assert out["i2t_r1"] == 100 and out["chance_i2t_r1"] == 50
    assert out["t2i_r1"] == 100  # text 1's best image (0) is one of its images


def test_attribute_accuracy_by_hand():
    refs = ["a small red circle in the top left", "a large blue square in the center"]
    gens = ["a small red circle in the top right", "a large blue square in the center"]
    out = attribute_accuracy(gens, refs, parse_attributes)
    assert out == {"acc_size": 100.0, "acc_color": 100.0, "acc_shape": 100.0, "acc_position": 50.0,
                   "acc_all_attributes": 50.0}
    assert attribute_accuracy(["", "blue"], refs, parse_attributes)["acc_color"] == 50.0  # "" names no colour


def test_itm_metrics_by_hand():
    # 3 images, 3 texts; image i ↔ text i, except image 2 ↔ text 1 as well
    prob = torch.tensor([[0.9, 0.2, 0.6],     # text 0 first: hit; the negative 0.6 says match
                         [0.3, 0.4, 0.7],     # text 2 first: miss; its positive 0.4 says no match
                         [0.1, 0.8, 0.2]])    # text 1 first: a positive, hit
    out = itm_metrics(prob, [[0], [1], [1, 2]])
    assert out["itm_i2t_r1"] == pytest.approx(200 / 3)
    # text 0 → image 0 hit; text 1 → image 2 hit (one of its images); text 2 → image 1 (0.7) miss
    assert out["itm_t2i_r1"] == pytest.approx(200 / 3)
    assert out["itm_pos_acc"] == pytest.approx(50)          # 4 positives: 0.4 and 0.2 say no match
    assert out["itm_neg_acc"] == pytest.approx(60)          # 5 negatives: 0.6 and 0.7 say match
    prior = itm_metrics(torch.full((3, 3), 1 / 3), [[0], [1], [2]])   # a head at its prior
    assert prior["itm_pos_acc"] == 0 and prior["itm_neg_acc"] == 100
