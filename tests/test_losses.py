"""blip/losses.py against hand-computed values (plain `math`, written out), and a 2-process gloo run."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from blip.losses import (FeatureQueue, all_gather_with_grad, concat_all_gather, hard_negative_weights, itc_loss,
                         itm_loss, lm_loss, momentum_soft_targets, positive_targets, sample_hard_negatives)
from blip.objectives.momentum import ema_update
from test_train_helpers import end_gloo_worker


def log_softmax_row(row):
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def softmax_row(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


SIM = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.5, 0.7]]      # images x texts, already / temperature
SIM_M = [[1.0, 0.0, 0.0], [0.2, 0.4, 0.1], [0.9, 0.0, 0.3]]


def test_itc_diagonal_3x3():
    sim = torch.tensor(SIM)
    cols = [list(c) for c in zip(*SIM)]
    i2t = -sum(log_softmax_row(SIM[i])[i] for i in range(3)) / 3
    t2i = -sum(log_softmax_row(cols[i])[i] for i in range(3)) / 3
    got = itc_loss(sim, sim.T)
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # hard index targets equal the diagonal
    assert itc_loss(sim, sim.T, torch.arange(3), torch.arange(3)).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_itc_with_distillation_3x3():
    alpha = 0.4
    sim, sim_m = torch.tensor(SIM), torch.tensor(SIM_M)
    eye = torch.eye(3)
    t_i2t = momentum_soft_targets(sim_m, eye, alpha)
    t_t2i = momentum_soft_targets(sim_m.T, eye, alpha)
    cols, cols_m = [list(c) for c in zip(*SIM)], [list(c) for c in zip(*SIM_M)]

    def direction(rows, rows_m):
        total = 0.0
        for i in range(3):
            p_m = softmax_row(rows_m[i])
            target = [alpha * p_m[j] + (1 - alpha) * (1.0 if i == j else 0.0) for j in range(3)]
            logp = log_softmax_row(rows[i])
            total += -sum(target[j] * logp[j] for j in range(3))
        return total / 3

    want = (direction(SIM, SIM_M) + direction(cols, cols_m)) / 2
    assert t_i2t.sum(1).tolist() == pytest.approx([1.0] * 3)
    assert t_i2t[0].tolist() == pytest.approx([0.4 * math.e / (math.e + 2) + 0.6, 0.4 / (math.e + 2),
                                               0.4 / (math.e + 2)], abs=1e-6)
    assert itc_loss(sim, sim.T, t_i2t, t_t2i).item() == pytest.approx(want, abs=1e-6)
    # alpha = 0 gives back the plain loss
    plain = itc_loss(sim, sim.T)
    assert itc_loss(sim, sim.T, momentum_soft_targets(sim_m, eye, 0.0),
                    momentum_soft_targets(sim_m.T, eye, 0.0)).item() == pytest.approx(plain.item(), abs=1e-6)


def test_itc_label_smoothing():
    sim = torch.tensor(SIM)
    eps = 0.1
    want = 0.0
    for rows in (SIM, [list(c) for c in zip(*SIM)]):
        for i in range(3):
            logp = log_softmax_row(rows[i])
            want += ((1 - eps) * -logp[i] + eps * -sum(logp) / 3) / 6
    assert itc_loss(sim, sim.T, label_smoothing=eps).item() == pytest.approx(want, abs=1e-6)


def test_positive_targets_duplicates():
    t = positive_targets(torch.tensor([7, 7, 3]), torch.tensor([7, 3, 7, 5, -100]))
    assert t.tolist() == [[0.5, 0, 0.5, 0, 0], [0.5, 0, 0.5, 0, 0], [0, 1.0, 0, 0, 0]]


def test_lm_loss_shift_ignore_and_smoothing():
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 2, -100]])   # position 0 is never a target; the last one is padding
    lp0, lp1 = log_softmax_row([1.0, 0.0, 0.0]), log_softmax_row([0.0, 2.0, 0.0])
    want = (-lp0[1] - lp1[2]) / 2
    assert lm_loss(logits, labels).item() == pytest.approx(want, abs=1e-6)
    eps = 0.1
    smooth = [(1 - eps) * -lp[y] + eps * -sum(lp) / 3 for lp, y in ((lp0, 1), (lp1, 2))]
    assert lm_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(sum(smooth) / 2, abs=1e-6)
    per_seq = lm_loss(logits, labels, label_smoothing=eps, reduction="sum_per_sequence")
    assert per_seq.shape == (1,) and per_seq.item() == pytest.approx(sum(smooth), abs=1e-6)
    none = lm_loss(logits, labels, reduction="none")
    assert none.shape == (1, 3) and none[0, 2].item() == 0.0
    with pytest.raises(ValueError):
        lm_loss(logits, labels, reduction="sum")


def test_itm_loss():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    want = (-log_softmax_row([0.0, 1.0])[1] - log_softmax_row([1.0, 0.0])[0] - math.log(0.5)) / 3
    assert itm_loss(logits, 1).item() == pytest.approx(want, abs=1e-6)


def test_hard_negatives_never_positive_with_duplicate_ids():
    # COCO-like: 5 captions per image, so 5 texts share each image id; positives get by far the highest sims
    ids = torch.arange(4).repeat_interleave(5)
    pos = ids[:, None] == ids[None, :]
    sim = torch.randn(20, 20) + 30.0 * pos
    g = torch.Generator().manual_seed(0)
    for eps in (0.0, 1e-4):
        big = sim.repeat(500, 1)
        picks = sample_hard_negatives(big, pos.repeat(500, 1), generator=g, eps=eps)
        assert picks.shape == (10000,) and picks.dtype == torch.long
        assert not pos.repeat(500, 1)[torch.arange(10000), picks].any()
    # the positives take ~all the softmax mass: a masked softmax still gives a proper distribution
    w = hard_negative_weights(torch.tensor([[1000.0, 0.0, 0.0]]), torch.tensor([[True, False, False]]))
    assert w.tolist() == [[0.0, 0.5, 0.5]]


def test_hard_negatives_follow_the_similarity_distribution():
    # negatives with sims log1, log2, log3 -> probabilities 1/6, 2/6, 3/6; the positive (col 3) never drawn
    row = torch.tensor([0.0, math.log(2), math.log(3), 5.0])
    mask = torch.tensor([False, False, False, True])
    g = torch.Generator().manual_seed(1)
    n = 60000
    picks = sample_hard_negatives(row.repeat(n, 1), mask.repeat(n, 1), generator=g)
    freq = torch.bincount(picks, minlength=4).double() / n
    assert freq.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 0.0], abs=0.01)
    # with eps: weights softmax(sim) + eps on the negatives (BLIP pretrain / LAVIS BLIP-2)
    z = 1 + 2 + 3 + math.exp(5.0)
    eps = 0.05
    want = [1 / z + eps, 2 / z + eps, 3 / z + eps]
    want = [v / sum(want) for v in want] + [0.0]
    picks = sample_hard_negatives(row.repeat(n, 1), mask.repeat(n, 1), generator=g, eps=eps)
    freq = torch.bincount(picks, minlength=4).double() / n
    assert freq.tolist() == pytest.approx(want, abs=0.01)


def test_hard_negatives_without_any_negative_fail_loudly():
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_ema_update():
    online, momentum = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), online.bias.fill_(-2.0)
        momentum.weight.fill_(0.0), momentum.bias.fill_(0.0)
    ema_update(online, momentum, 0.9)
    assert momentum.weight[0].tolist() == pytest.approx([0.1, 0.1]) and momentum.bias.item() == pytest.approx(-0.2)
    ema_update(online, momentum, 0.9)
    assert momentum.weight[0].tolist() == pytest.approx([0.19, 0.19])   # 0.9 * 0.1 + 0.1
    assert online.weight.tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError):
        ema_update(online, nn.Linear(2, 1, bias=False), 0.9)


def test_queue_wrap_around():
    q = FeatureQueue(dim=2, size=5)
    assert q.idx_queue.tolist() == [[-100] * 5]
    assert torch.allclose(q.image_queue.norm(dim=0), torch.ones(5))

    def feats(start, n):
        return torch.arange(start, start + n, dtype=torch.float).view(n, 1).repeat(1, 2)

    q.enqueue(feats(0, 3), -feats(0, 3), torch.tensor([10, 11, 12]))
    assert q.queue_ptr.item() == 3
    q.enqueue(feats(3, 3), -feats(3, 3), torch.tensor([13, 14, 15]))   # writes slots 3, 4, then 0
    assert q.queue_ptr.item() == 1
    assert q.image_queue[0].tolist() == [5, 1, 2, 3, 4]
    assert q.text_queue[1].tolist() == [-5, -1, -2, -3, -4]
    assert q.idx_queue.tolist() == [[15, 11, 12, 13, 14]]
    q.enqueue(feats(6, 7), feats(6, 7), torch.arange(20, 27))        # larger than the queue: the last 5 survive
    assert sorted(q.image_queue[0].tolist()) == [8, 9, 10, 11, 12]
    assert q.queue_ptr.item() == (1 + 7) % 5
    assert q.image_queue[0, (q.queue_ptr.item() - 1) % 5].item() == 12  # newest entry just before the pointer


def test_gathers_are_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert concat_all_gather(x) is x
    assert all_gather_with_grad(x) is x


# ---------------------------------------------------------------------------------------------------------------
# 2 processes (gloo): gathered ITC / hard-negative weights / queue == single process on the concatenated batch
def _world_itc(img, txt, temp):
    """Rank-local rows against world-gathered candidates, BLIP-2 style (targets at rank * B + i)."""
    img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)
    b = img.shape[0]
    targets = torch.arange(b) + dist.get_rank() * b if dist.is_initialized() else None
    return itc_loss(img @ txt_all.T / temp, txt @ img_all.T / temp, targets, targets)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    img_full = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    txt_full = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    ids_full = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    sl = slice(rank * 4, rank * 4 + 4)
    img, txt = img_full[sl].clone().requires_grad_(), txt_full[sl].clone().requires_grad_()
    loss = _world_itc(img, txt, 0.07)
    loss.backward()
    # the gather's backward hands each rank d(sum of all rank losses)/d(its features) = world * d(full loss)/d(...);
    # DDP's gradient averaging over ranks then yields the full-batch gradient of shared parameters
    grads = [img.grad / world, txt.grad / world]
    ids_all = concat_all_gather(ids_full[sl])
    weights = hard_negative_weights(img.detach() @ concat_all_gather(txt.detach()).T / 0.07,
                                    ids_full[sl, None] == ids_all[None, :], eps=1e-4)
    q = FeatureQueue(6, 12)
    q.enqueue(img.detach(), txt.detach(), ids_full[sl])
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    torch.save({"losses": torch.stack(losses), "img_grad": grads[0], "txt_grad": grads[1], "weights": weights,
                "queue": q.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    del loss, img, txt   # their autograd state goes with the group, not at interpreter exit
    end_gloo_worker()


@pytest.mark.timeout(120)
def test_two_process_gloo_matches_single_process():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 6), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(8, 6), dim=1).requires_grad_()
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    loss = _world_itc(img, txt, 0.07)
    loss.backward()
    assert res[0]["losses"].mean().item() == pytest.approx(loss.item(), abs=1e-5)
    for r in range(world):
        sl = slice(r * 4, r * 4 + 4)
        assert torch.allclose(res[r]["img_grad"], img.grad[sl], atol=1e-5)
        assert torch.allclose(res[r]["txt_grad"], txt.grad[sl], atol=1e-5)
        w = hard_negative_weights(img.detach() @ txt.detach().T / 0.07, ids[:, None] == ids[None, :], eps=1e-4)
        assert torch.allclose(res[r]["weights"], w[sl], atol=1e-6)
    q = FeatureQueue(6, 12)
    q.enqueue(img.detach(), txt.detach(), ids)
    for r in range(world):
        for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
            if k in ("image_queue", "text_queue"):
                assert torch.allclose(res[r]["queue"][k][:, :8], q.state_dict()[k][:, :8])
            else:
                assert torch.equal(res[r]["queue"][k][..., :8], q.state_dict()[k][..., :8])
