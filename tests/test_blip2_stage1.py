"""BLIP-2 stage-1 objective: LAVIS losses, hard negatives, gradients, ITC across 2 gloo ranks."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import blip
from blip import create_model as create
from conftest import FIXTURES
from test_train_helpers import end_gloo_worker

FIX = FIXTURES / "lavis"
DIR = FIX / "blip2_qformer"


@pytest.mark.parametrize("which", ["full", "trainable_only+eva"])
def test_lavis_losses(which):
    inputs = torch.load(DIR / "inputs.pt", weights_only=True)
    out = torch.load(DIR / "outputs.pt", weights_only=True)
    if which == "full":
        objective = blip.load(DIR / "checkpoint.pth", task="stage1")
    else:
        objective = blip.load(DIR / "checkpoint_trainable_only.pth", task="stage1",
                              vision_weights=FIX / "eva_vit_tiny.pth")
    ids, mask = objective.tokenize(inputs["text_input"])
    assert torch.equal(ids, out["fwd_text_input_ids"]) and torch.equal(mask, out["fwd_text_attention_mask"])
    batch = {"pixel_values": inputs["image"], "text": inputs["text_input"],
             "itm_negatives": (out["itm_neg_image_idx"], out["itm_neg_text_idx"])}  # LAVIS's recorded draws
    with torch.no_grad():
        losses = objective(batch)
    for name in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert abs(losses[name].item() - out[name].item()) <= 1e-4, (name, losses[name].item(), out[name].item())
    # the ITM batch the objective builds gives LAVIS's logits
    m = objective.model
    neg_img, neg_txt = out["itm_neg_image_idx"], out["itm_neg_text_idx"]
    vit = m.image_features(inputs["image"])
    with torch.no_grad():
        logits = m.itm_logits_from_features(torch.cat([vit, vit[neg_img], vit]), torch.cat([ids, ids, ids[neg_txt]]),
                                            torch.cat([mask, mask, mask[neg_txt]]))
    assert (logits - out["fwd_itm_logits"]).abs().max() <= 1e-4


def test_hard_negatives_are_never_positives():
    objective = create("blip2_tiny_qformer", "stage1")
    torch.manual_seed(0)
    sim = 0.3 * torch.randn(6, 6) + 30 * torch.eye(6)   # positives dominate the softmax
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])      # rows 0/1 and 3/4 show the same image
    same = image_ids[:, None] == image_ids[None, :]
    seen = torch.zeros(6, 6, dtype=torch.bool)
    for _ in range(200):
        neg_image, neg_text = objective.hard_negatives(sim, sim.t().contiguous(), image_ids)
        for neg in (neg_image, neg_text):
            assert not same[torch.arange(6), neg].any()
            seen[torch.arange(6), neg] = True
    assert torch.equal(seen, ~same)   # every other candidate does get drawn
    neg_image, _ = objective.hard_negatives(sim, sim.t().contiguous())
    assert not torch.any(neg_image == torch.arange(6))


def test_uniform_negatives_warm_up_then_mined_negatives():
    """uniform_negative_epochs: while the batch's progress is below it, every non-positive is an equally likely ITM
    negative (not the hardest); from then on the negatives are mined from the similarity again."""
    objective = create("blip2_tiny_qformer", "stage1", objective={"uniform_negative_epochs": 0.5, "negative_eps": 0})
    sim = 30 * torch.eye(6) + 20 * torch.eye(6).roll(1, dims=1)   # text i + 1 is image i's obvious hard negative
    hardest = ((torch.arange(6) - 1) % 6, (torch.arange(6) + 1) % 6)   # (image per text, text per image)
    image_ids = torch.arange(6)
    torch.manual_seed(0)
    counts = torch.zeros(6, 6)
    for _ in range(500):
        for neg in objective.hard_negatives(sim, sim.t().contiguous(), image_ids, uniform=True):
            counts[torch.arange(6), neg] += 1
    assert counts.diagonal().sum() == 0                            # never the positive
    off = counts[~torch.eye(6, dtype=torch.bool)].view(6, 5) / 1000   # each of the 5 others: 1/5 of the draws
    assert (off - 0.2).abs().max() < 0.06, off
    for _ in range(20):
        mined = objective.hard_negatives(sim, sim.t().contiguous(), image_ids)
        assert all(torch.equal(neg, hard) for neg, hard in zip(mined, hardest))

    flags = []
    objective.losses = lambda *args, **kwargs: flags.append(kwargs["uniform_negatives"])
    for progress in (0.0, 0.49, 0.5, 0.9):
        objective({"pixel_values": torch.zeros(2, 3, 8, 8), "text": ["a", "b"], "progress": progress})
    objective({"pixel_values": torch.zeros(2, 3, 8, 8), "text": ["a", "b"]})   # no progress: step 0
    assert flags == [True, True, False, False, True]
    flags.clear()
    default = create("blip2_tiny_qformer", "stage1")
    default.losses = lambda *args, **kwargs: flags.append(kwargs["uniform_negatives"])
    default({"pixel_values": torch.zeros(2, 3, 8, 8), "text": ["a", "b"], "progress": 0.0})
    assert flags == [False]


def test_image_id_targets_switch_restores_lavis_itc_for_batches_with_ids():
    """LAVIS's branch for batches with image ids, written out from its formula: pos = (ids == ids_all) / row sum,
    targets = 0.9 * pos + 0.1 / N (label smoothing 0.1), loss = mean over rows of -sum(log_softmax(sim) * targets),
    the two directions averaged."""
    torch.manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(5, 5) * 3, torch.randn(5, 5) * 3
    ids = torch.tensor([7, 7, 1, 4, 7])
    pos = (ids[:, None] == ids[None, :]).float()
    pos = pos / pos.sum(1, keepdim=True)
    want = sum(-(torch.log_softmax(s, dim=1) * (0.9 * pos + 0.1 / 5)).sum(1).mean() for s in (sim_i2t, sim_t2i)) / 2
    by_ce = sum(torch.nn.functional.cross_entropy(s, pos, label_smoothing=0.1) for s in (sim_i2t, sim_t2i)) / 2
    assert torch.allclose(by_ce, want, atol=1e-6)   # the same thing: soft targets with label_smoothing=0.1
    lavis = create("blip2_tiny_qformer", "stage1", objective={"image_id_targets": True})
    assert torch.allclose(lavis.contrastive_loss(sim_i2t, sim_t2i, ids), want, atol=1e-6)
    smoothed = sum(torch.nn.functional.cross_entropy(s, torch.arange(5), label_smoothing=0.1)
                   for s in (sim_i2t, sim_t2i)) / 2       # the default: the diagonal with smoothing 0.1, ids or not
    default = create("blip2_tiny_qformer", "stage1")
    assert torch.allclose(default.contrastive_loss(sim_i2t, sim_t2i, ids), smoothed, atol=1e-6)
    assert torch.allclose(lavis.contrastive_loss(sim_i2t, sim_t2i, None), smoothed, atol=1e-6)  # no ids: as LAVIS


def test_gradients_reach_qformer_never_the_frozen_vit():
    torch.manual_seed(0)
    objective = create("blip2_tiny_qformer", "stage1").train()
    assert not objective.model.image_encoder.visual_encoder.training
    batch = {"pixel_values": torch.randn(3, 3, 56, 56), "image_ids": torch.arange(3),
             "text": ["a dog on a bench", "two red cars", "a bird over water"]}
    losses = objective(batch)
    assert set(losses) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    losses["loss"].backward()
    m = objective.model
    assert all(p.grad is None for p in m.image_encoder.visual_encoder.parameters())
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert not [n for n, p in trainable.items() if p.grad is None]
    assert not [n for n, p in trainable.items() if ".position." not in n and p.grad.abs().sum() == 0]
    assert m.temp.grad.abs() > 0 and m.qformer.query_tokens.grad.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(5)
    texts = ["a dog on a bench", "two red cars", "a bird over water", "a man riding a horse"]
    return torch.randn(4, 3, 56, 56, generator=g), texts


def _objective():
    torch.manual_seed(7)
    objective = create("blip2_tiny_qformer", "stage1").eval()
    with torch.no_grad():
        for p in objective.model.qformer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return objective


def _rank_worker(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        px, texts = _batch()
        objective = _objective()
        part = slice(2 * rank, 2 * rank + 2)
        with torch.no_grad():
            losses = objective({"pixel_values": px[part], "text": texts[part], "image_ids": torch.arange(4)[part]})
        itc = losses["loss_itc"].clone()
        dist.all_reduce(itc)
        if rank == 0:
            torch.save({"itc": itc / 2, "loss": losses["loss"]}, os.path.join(result_dir, "ddp.pt"))
    finally:
        end_gloo_worker()


def test_itc_on_two_gloo_ranks_equals_itc_on_the_whole_batch(tmp_path):
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    px, texts = _batch()
    with torch.no_grad():
        single = _objective()({"pixel_values": px, "text": texts, "image_ids": torch.arange(4)})
    assert torch.isfinite(ddp["loss"])
    assert abs(ddp["itc"].item() - single["loss_itc"].item()) <= 1e-5, (ddp["itc"].item(), single["loss_itc"].item())


def test_heldout_retrieval_uses_max_over_queries():
    from blip.train.heldout import retrieval_eval
    objective = _objective()
    px, texts = _batch()
    ids, mask = objective.tokenize(texts)
    with torch.no_grad():
        sim = objective.retrieval_similarity(objective.encode_image(px), objective.encode_text(ids, mask))
        torch.testing.assert_close(sim, objective.model.itc_similarity(px, ids, mask))
    result = retrieval_eval(objective, [{"pixel_values": px, "text": texts}], torch.device("cpu"))
    assert result["num_images"] == 4 and 0 <= result["i2t_r1"] <= 100


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    objective = create("blip2_tiny_qformer", "stage1").train()
    px, texts = _batch()
    batch = {"pixel_values": px, "text": texts, "image_ids": torch.arange(4)}

    def grads(enable):
        objective.zero_grad()
        objective.set_grad_checkpointing(enable)
        torch.manual_seed(1)  # dropout and negative sampling
        objective(batch)["loss"].backward()
        return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
