"""BlipPretrain: weight sharing, momentum copies, queue, token conventions, hand-off, and a 2-process gloo run."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import blip.objectives.momentum as bp
from blip.data.tokenizer import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID
from blip.losses import FeatureQueue
from blip import create_model as create
from blip.models.blip import ARCHS
from blip.objectives.blip_pretrain import BlipPretrain
from blip.objectives.momentum import momentum_itc, ramped_alpha
from test_train_helpers import end_gloo_worker

CFG = ARCHS["blip_tiny"].with_overrides(image_size=32)
TEXTS = ["a dog on the grass", "a red car", "two cats sleeping on a sofa", "a bowl of soup"]


def make(queue_size=8, **kw):
    torch.manual_seed(0)
    return BlipPretrain(CFG, queue_size=queue_size, **kw)


def batch(n=4, ids=None, progress=0.0):
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "text": (TEXTS * 4)[:n],
            "image_ids": torch.tensor(ids if ids is not None else list(range(n))), "progress": progress}


def test_decoder_shares_every_parameter_but_self_attention():
    m = make()
    enc, dec = m.text_encoder, m.text_decoder.transformer
    assert dec.embeddings is enc.embeddings
    for el, dl in zip(enc.layers, dec.layers):
        for a, b in zip(el.cross_attn.parameters(), dl.cross_attn.parameters()):
            assert a is b
        for a, b in zip(el.ffn.parameters(), dl.ffn.parameters()):
            assert a is b
        for a, b in zip(el.self_attn.parameters(), dl.self_attn.parameters()):
            assert a is not b and a.data_ptr() != b.data_ptr()
    assert m.text_decoder.lm_head.weight is enc.embeddings.word.weight
    enc_ids = {id(p) for p in enc.parameters()}
    dec_own = [n for n, p in m.text_decoder.named_parameters() if id(p) not in enc_ids]
    assert dec_own and all(".self_attn." in n or n.startswith("lm_head.") for n in dec_own)


def test_forward_terms_and_gradients_absent_from_momentum_copies():
    m = make()
    out = m(batch(ids=[0, 0, 1, 2]))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert out["loss"].item() == pytest.approx((out["loss_itc"] + out["loss_itm"] + out["loss_lm"]).item())
    # an untrained ITM head on balanced-ish pairs: about log 2; LM over a 30524 vocab: about log V
    assert abs(out["loss_itm"].item() - math.log(2)) < 0.3
    assert abs(out["loss_lm"].item() - math.log(30524)) < 1.5
    out["loss"].backward()
    for shadow in ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
        for p in getattr(m, shadow).parameters():
            assert not p.requires_grad and p.grad is None
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []      # every online parameter takes part (DDP needs no find_unused_parameters)


def test_token_conventions():
    m = make()
    seen = {"dec": [], "enc": []}
    m.text_decoder.transformer.register_forward_pre_hook(lambda mod, args: seen["dec"].append(args[0]))
    m.text_encoder.register_forward_pre_hook(lambda mod, args: seen["enc"].append(args[0]))
    m(batch())
    assert len(seen["dec"]) == 1 and (seen["dec"][0][:, 0] == DEC_TOKEN_ID).all()
    assert seen["dec"][0].shape[1] == 30                           # padded to max_txt_len as BLIP
    firsts = [ids[:, 0].unique().tolist() for ids in seen["enc"]]
    assert firsts[0] == [101]                                      # unimodal ITC encoder keeps [CLS]
    assert firsts[1:] == [[ENC_TOKEN_ID], [ENC_TOKEN_ID]]          # ITM positives, then negatives
    assert seen["enc"][2].shape[0] == 8                            # B (image, neg text) + B (neg image, text)


def test_hard_negatives_skip_duplicate_image_ids(monkeypatch):
    calls = []
    real = bp.sample_hard_negatives

    def spy(sim, positive, **kw):
        out = real(sim, positive, **kw)
        calls.append((positive, out))
        return out

    monkeypatch.setattr(bp, "sample_hard_negatives", spy)
    m = make()
    ids = [5, 5, 5, 9]
    for _ in range(8):
        m(batch(ids=ids))
    ids_t = torch.tensor(ids)
    for positive, picks in calls:
        assert torch.equal(positive, ids_t[:, None] == ids_t[None, :])
        assert not positive[torch.arange(4), picks].any()
    # rows 0-2 (image 5) can only pick column 3; row 3 picks among 0-2
    assert all((picks[:3] == 3).all() for _, picks in calls)


def test_momentum_itc_by_hand():
    # 2 local pairs, queue of 2, temp 1: candidates = [batch momentum feats, queue]
    q = FeatureQueue(2, 2)
    q.image_queue.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    q.text_queue.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    img_m, txt_m = torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    temp = torch.tensor(1.0)
    alpha = 0.4
    loss, s_i2t, s_t2i = momentum_itc(img, txt, img_m, txt_m, q, temp, alpha)
    txt_all = [[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]   # columns: txt_m rows, then queue columns
    img_all = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def direction(online, moment, cands):
        total = 0.0
        for i in range(2):
            s = [dot(online[i], c) for c in cands]
            sm = [dot(moment[i], c) for c in cands]
            pm = [math.exp(v) / sum(math.exp(u) for u in sm) for v in sm]
            target = [alpha * pm[j] + (1 - alpha) * (j == i) for j in range(4)]
            lse = math.log(sum(math.exp(v) for v in s))
            total += -sum(t * (v - lse) for t, v in zip(target, s))
        return total / 2

    want = (direction(img.tolist(), img_m.tolist(), txt_all) + direction(txt.tolist(), txt_m.tolist(), img_all)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert s_i2t.shape == (2, 4) and s_i2t[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])


def test_ramped_alpha():
    assert ramped_alpha(0.4, 0.0, 2.0) == 0.0
    assert ramped_alpha(0.4, 0.5, 2.0) == pytest.approx(0.1)
    assert ramped_alpha(0.4, 7.0, 2.0) == pytest.approx(0.4)
    assert ramped_alpha(0.4, 0.3, 0.0) == pytest.approx(0.4)


def test_queue_and_after_optimizer_step():
    m = make(queue_size=6)
    b = batch()
    m(b)
    assert m.queue.queue_ptr.item() == 4
    with torch.no_grad():
        feats = torch.nn.functional.normalize(m.vision_proj_m(m.visual_encoder_m(b["pixel_values"])[:, 0]), dim=-1)
    assert torch.allclose(m.queue.image_queue[:, :4].T, feats, atol=1e-6)
    assert m.queue.idx_queue.tolist() == [[-100] * 6]    # ids are not queued in pretraining
    m(b)
    assert m.queue.queue_ptr.item() == 2                     # wrapped around
    # EMA: momentum <- 0.995 momentum + 0.005 online
    before = m.itm_head.weight.clone(), m.vision_proj_m.weight.clone()
    with torch.no_grad():
        m.vision_proj.weight.add_(1.0)
        m.temp.fill_(3.0)
    m.after_optimizer_step()
    assert torch.allclose(m.vision_proj_m.weight, 0.995 * before[1] + 0.005 * m.vision_proj.weight, atol=1e-6)
    assert m.temp.item() == 0.5
    with torch.no_grad():
        m.temp.fill_(-1.0)
    m.after_optimizer_step()
    assert m.temp.item() == pytest.approx(0.001)
    assert m.no_weight_decay() == {"temp"}


def test_export_to_task_models():
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pix = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[DEC_TOKEN_ID, 2003, 1037, 102], [DEC_TOKEN_ID, 4937, 102, PAD_TOKEN_ID]])
    mask = (ids != PAD_TOKEN_ID).long()
    cap = create("blip_tiny", "caption", image_size=32)
    report = m.export_to(cap)
    assert not report.expected_missing
    with torch.no_grad():
        want = m.text_decoder(ids, mask, encoder_hidden_states=m.visual_encoder(pix))
        assert torch.allclose(cap(pix, ids, mask).logits, want, atol=1e-5)
    ret = create("blip_tiny", "retrieval", image_size=32)
    m.export_to(ret)
    enc = ids.clone()
    enc[:, 0] = ENC_TOKEN_ID
    with torch.no_grad():
        assert torch.allclose(ret.itm_logits(pix, enc, mask), m.itm_logits(pix, enc, mask), atol=1e-5)
        cls = ids.clone()
        cls[:, 0] = 101
        assert torch.allclose(ret.itc_similarity(pix, cls, mask), m.itc_similarity(pix, cls, mask), atol=1e-5)
    assert type(create("blip_tiny", "pretrain")).__name__ == "BlipPretrain"


# ---------------------------------------------------------------------------------------------------------------
# 2 processes (gloo) on halves of a batch == 1 process on the whole batch (ITC and ITM, losses and gradients).
# Sampling is made deterministic (argmax of the sampling weights) in both runs so the same negatives are drawn.
def _argmax_sampler(sim, positive, generator=None, eps=0.0):
    from blip.losses import hard_negative_weights
    return hard_negative_weights(sim, positive, eps).argmax(dim=1)


IDS = [0, 0, 1, 2, 3, 3, 4, 5]


def _itc_itm(m, b):
    bp.sample_hard_negatives = _argmax_sampler
    out = m(b)
    loss = out["loss_itc"] + out["loss_itm"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out["loss_itc"].detach(), out["loss_itm"].detach(), grads


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = make(queue_size=16)
    full = batch(8, IDS, progress=1.0)
    sl = slice(rank * 4, rank * 4 + 4)
    part = {"pixel_values": full["pixel_values"][sl], "text": full["text"][sl], "image_ids": full["image_ids"][sl],
            "progress": 1.0}
    itc, itm, grads = _itc_itm(m, part)
    for g in grads.values():            # what DDP does: average the gradients over ranks
        dist.all_reduce(g)
        g /= world
    torch.save({"itc": itc, "itm": itm, "grads": grads, "queue": m.queue.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    end_gloo_worker()


@pytest.mark.timeout(180)
def test_two_process_gloo_matches_single_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    real = bp.sample_hard_negatives
    try:
        m = make(queue_size=16)
        itc, itm, grads = _itc_itm(m, batch(8, IDS, progress=1.0))
    finally:
        bp.sample_hard_negatives = real
    assert ((res[0]["itc"] + res[1]["itc"]) / 2).item() == pytest.approx(itc.item(), abs=1e-5)
    assert ((res[0]["itm"] + res[1]["itm"]) / 2).item() == pytest.approx(itm.item(), abs=1e-5)
    assert set(res[0]["grads"]) == set(grads)
    for name, g in grads.items():
        assert torch.allclose(res[0]["grads"][name], g, atol=1e-5, rtol=1e-4), name
    for k, v in m.queue.state_dict().items():
        assert torch.allclose(res[1]["queue"][k].float(), v.float(), atol=1e-6), k


def _queue_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = make(queue_size=16, world_batch=False)
    full = batch(8, IDS, progress=1.0)
    sl = slice(rank * 4, rank * 4 + 4)
    with torch.no_grad():
        m({"pixel_values": full["pixel_values"][sl], "text": full["text"][sl], "image_ids": full["image_ids"][sl],
           "progress": 1.0})
    torch.save(m.queue.state_dict(), os.path.join(out_dir, f"queue{rank}.pt"))
    end_gloo_worker()


@pytest.mark.timeout(180)
def test_world_batch_false_still_fills_the_queue_from_every_rank():
    """BLIP's ``_dequeue_and_enqueue`` all-gathers (``concat_all_gather``) whatever the in-batch candidates: with
    ``world_batch=False`` the queue of each of 2 ranks holds both halves' momentum features, as 1 process would."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_queue_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        queues = [torch.load(os.path.join(d, f"queue{r}.pt"), weights_only=True) for r in range(2)]
    m = make(queue_size=16, world_batch=False)
    with torch.no_grad():
        m(batch(8, IDS, progress=1.0))
    for k, v in m.queue.state_dict().items():
        for q in queues:
            assert torch.allclose(q[k].float(), v.float(), atol=1e-5), k
