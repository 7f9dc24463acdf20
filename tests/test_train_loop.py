"""Trainer mechanics: accumulation, exact resume, layer decay, weight-decay groups, schedules, precision."""

from __future__ import annotations

import math

import pytest
import torch
from test_train_helpers import FixedBatches, TinyModel, random_batches, split_batch

from blip.data.datasets import ImageTextStream, TrainData
from blip.data.synthetic import ensure_synthetic_shards
from blip.data.transforms import image_transform
from blip.data.webdataset import WebDatasetSource
from blip.run_layout import list_checkpoints
from blip.train.loop import StopTraining, Trainer
from blip.train.optim import build_optimizer, param_groups
from blip.train.precision import PrecisionPolicy, frozen_towers
from blip.train.schedule import IterationSchedule


def make_trainer(model, *, steps_per_epoch, epochs=1, lr=1e-2, grad_accum=1, schedule="cosine", **kw):
    opt = build_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=kw.pop("layer_decay", None))
    total = epochs * steps_per_epoch
    sched = IterationSchedule(opt, name=schedule, lr=lr, total_steps=total, steps_per_epoch=steps_per_epoch,
                              warmup_steps=2, warmup_lr=1e-4, min_lr=1e-4)
    return Trainer(model, opt, sched, grad_accum=grad_accum, epochs=epochs, log_every=1, **kw)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_accumulating_k_micro_batches_equals_one_k_times_batch():
    big = random_batches(3, 8)
    torch.manual_seed(0)
    ref = TinyModel()
    torch.manual_seed(0)
    acc = TinyModel()
    h_ref = make_trainer(ref, steps_per_epoch=3, grad_clip=1.0).fit(FixedBatches(big))
    micro = [m for b in big for m in split_batch(b, 4)]
    h_acc = make_trainer(acc, steps_per_epoch=3, grad_accum=4, grad_clip=1.0).fit(FixedBatches(micro))
    assert [h["step"] for h in h_acc] == [1, 2, 3]
    for r, a in zip(h_ref, h_acc):
        assert r["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert_same_weights(weights(ref), weights(acc))
    assert ref.steps_hook_calls == acc.steps_hook_calls == 3  # after_optimizer_step once per optimizer step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_synthetic_shards(tmp_path_factory.mktemp("cache"), num_train=160, num_val=16, shard_size=40,
                                   image_size=32)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_kill_and_resume_equals_an_uninterrupted_run(shards, tmp_path, num_workers):
    def data():
        s = ImageTextStream([WebDatasetSource(shards.train_urls, num_samples=160)],
                            image_transform(32, train=True, kind="blip2"), batch_size=8, batches_per_epoch=4,
                            seed=11, shuffle_buffer=20)
        return TrainData(s, num_workers=num_workers)

    def trainer(ckpt_dir, on_step=None):
        torch.manual_seed(0)
        model = TinyModel(dropout=0.2)
        return make_trainer(model, steps_per_epoch=4, epochs=3, grad_clip=0.5, checkpoint_dir=ckpt_dir,
                            checkpoint_every=3, keep_last=2, on_step=on_step), model

    full, full_model = trainer(tmp_path / "full")
    torch.manual_seed(123)  # the state after model init is what a checkpoint must restore
    expected = full.fit(data())
    assert [h["step"] for h in expected] == list(range(1, 13))

    def kill_at_7(state, _):
        if state.step == 7:
            raise StopTraining

    killed, _ = trainer(tmp_path / "run", kill_at_7)
    torch.manual_seed(123)
    with pytest.raises(StopTraining):
        killed.fit(data())
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003", "step_00000006"]

    resumed, resumed_model = trainer(tmp_path / "run")
    torch.manual_seed(999)  # whatever the fresh process's RNG is, the checkpoint's RNG state wins
    assert resumed.resume()
    assert (resumed.state.step, resumed.state.epoch, resumed.state.batch) == (6, 1, 2)
    got = resumed.fit(data())
    assert [h["step"] for h in got] == list(range(7, 13))
    for want, have in zip(expected[6:], got):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
        assert have["lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert_same_weights(weights(full_model), weights(resumed_model), atol=1e-7)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000009", "step_00000012"]


def test_layer_decay_gives_each_vit_layer_its_lr():
    model = TinyModel(depth=3)
    decay, lr = 0.5, 1e-3
    opt = build_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=decay)
    sched = IterationSchedule(opt, name="constant", lr=lr, total_steps=10, steps_per_epoch=10)
    by_name = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_name[next(n for n, q in model.named_parameters() if q is p)] = group["lr"]
    # 3 blocks: embeddings = layer 0, block i = layer i + 1, the rest = layer 4 (scale 1)
    assert by_name["visual_encoder.pos_embed"] == pytest.approx(lr * decay ** 4)
    assert by_name["visual_encoder.patch_embed.weight"] == pytest.approx(lr * decay ** 4)
    for i in range(3):
        assert by_name[f"visual_encoder.blocks.{i}.1.weight"] == pytest.approx(lr * decay ** (3 - i))
    assert by_name["text_proj.weight"] == pytest.approx(lr)
    assert len({round(v, 12) for v in by_name.values()}) == 5
    # the schedule keeps the ratios at every step, and the optimizer really steps with them
    sched.step()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model.visual_encoder.blocks[0][1].bias.detach().clone()
    head_before = model.text_proj.bias.detach().clone()
    opt.step()
    moved_block = (before - model.visual_encoder.blocks[0][1].bias).abs().mean()
    moved_head = (head_before - model.text_proj.bias).abs().mean()
    assert (moved_block / moved_head).item() == pytest.approx(decay ** 3, rel=1e-3)  # Adam: step size ∝ lr


def test_weight_decay_groups_and_frozen_parameters():
    model = TinyModel()
    model.visual_encoder.blocks[2].requires_grad_(False)
    groups = param_groups(model, lr=1.0, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "visual_encoder.blocks.0.1.weight" in decayed and "text_proj.weight" in decayed
    for n in ("visual_encoder.blocks.0.1.bias", "visual_encoder.blocks.0.0.weight", "visual_encoder.norm.weight",
              "visual_encoder.pos_embed", "visual_encoder.cls_token", "word_embeddings.weight"):
        assert n in plain, n
    assert not any(n.startswith("visual_encoder.blocks.2.") for n in decayed | plain)
    assert [n for n, _ in frozen_towers(model)] == ["visual_encoder.blocks.2"]


def test_schedules_per_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cos = IterationSchedule(opt, name="cosine", lr=1e-4, total_steps=1000, steps_per_epoch=100, warmup_steps=100,
                            warmup_lr=1e-6, min_lr=1e-5)
    assert cos.lr_at(0) == pytest.approx(1e-6)
    assert cos.lr_at(50) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert cos.lr_at(100) == pytest.approx(1e-4)
    assert cos.lr_at(550) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))  # halfway through the decay
    assert cos.lr_at(101) != cos.lr_at(102)  # changes every iteration, not every epoch
    assert cos.lr_at(1000) == pytest.approx(1e-5)
    step = IterationSchedule(opt, name="step", lr=3e-4, total_steps=10_000, steps_per_epoch=1000, warmup_steps=300,
                             warmup_lr=1e-6, min_lr=1e-6, decay_rate=0.9)
    assert step.lr_at(150) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert step.lr_at(999) == pytest.approx(3e-4)
    assert step.lr_at(2500) == pytest.approx(3e-4 * 0.81)
    assert step.lr_at(10**6) == pytest.approx(1e-6)
    for _ in range(50):
        cos.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cos.lr_at(50))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_and_casts_frozen_towers(precision):
    torch.manual_seed(0)
    model = TinyModel()
    model.visual_encoder.blocks[2].requires_grad_(False)
    model.text_proj_m = torch.nn.Linear(2, 2).requires_grad_(False)  # an EMA copy: must stay fp32
    policy = PrecisionPolicy(precision, frozen_dtype=precision, device_type="cpu")
    assert policy.cast_frozen(model) == ["visual_encoder.blocks.2"]
    dtype = policy.compute_dtype
    assert model.visual_encoder.blocks[2][1].weight.dtype == dtype
    assert model.visual_encoder.blocks[2][0].weight.dtype == torch.float32  # norms stay fp32
    assert model.visual_encoder.blocks[1][1].weight.dtype == torch.float32  # trainable: fp32 master weights
    assert model.text_proj_m.weight.dtype == torch.float32
    assert PrecisionPolicy(precision, device_type="cpu").cast_frozen(TinyModel()) == []  # only when asked
    before = weights(model)
    trainer = make_trainer(model, steps_per_epoch=2, precision=policy, grad_clip=1.0)
    assert (trainer.scaler is not None) == (precision == "fp16")
    history = trainer.fit(FixedBatches(random_batches(2, 4)))
    assert all(math.isfinite(h["loss"]) for h in history)
    after = weights(model)
    assert not torch.equal(before["text_proj.weight"], after["text_proj.weight"])
    assert torch.equal(before["visual_encoder.blocks.2.1.weight"], after["visual_encoder.blocks.2.1.weight"])
