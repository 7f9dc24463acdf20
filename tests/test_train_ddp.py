"""Data parallelism on CPU (gloo): 2 processes with half batches each == 1 process with the whole batch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train_helpers import FixedBatches, TinyModel, end_gloo_worker, random_batches, split_batch

from blip.train.distributed import DistInfo, init_distributed, wrap_model
from blip.train.loop import Trainer
from blip.train.optim import build_optimizer
from blip.train.schedule import IterationSchedule

STEPS, GLOBAL_BATCH, ACCUM = 3, 8, 2


def train(model, data, info, strategy, grad_accum):
    wrapped = wrap_model(model, info, strategy)
    opt = build_optimizer(model, lr=5e-3, weight_decay=0.05)
    sched = IterationSchedule(opt, name="cosine", lr=5e-3, total_steps=STEPS, steps_per_epoch=STEPS, warmup_steps=1,
                              warmup_lr=1e-4)
    trainer = Trainer(wrapped, opt, sched, info=info, grad_accum=grad_accum, grad_clip=1.0, log_every=1,
                      fsdp=strategy == "fsdp")
    return trainer.fit(data), trainer


def worker(rank: int, world: int, init_file: str, out: str, strategy: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = TinyModel()
    # each optimizer step: ACCUM micro-batches per rank; rank r takes its slice of every global batch
    batches = [m for b in random_batches(STEPS, GLOBAL_BATCH) for m in split_batch(split_batch(b, world)[rank], ACCUM)]
    history, trainer = train(model, FixedBatches(batches), info, strategy, ACCUM)
    state = trainer.state_dict()["model"]  # full (unsharded) weights, also under FSDP
    if rank == 0:
        torch.save({"history": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
                    "model": {k: v.detach().cpu() for k, v in state.items()}}, out)
    end_gloo_worker()


def run_world(tmp_path: Path, strategy: str) -> dict:
    out = tmp_path / f"{strategy}.pt"
    mp.start_processes(worker, args=(2, str(tmp_path / f"init_{strategy}"), str(out), strategy), nprocs=2,
                       join=True, start_method="spawn")
    return torch.load(out, weights_only=True)


def single_process() -> tuple[list[float], list[float], dict]:
    torch.manual_seed(0)
    model = TinyModel()
    history, _ = train(model, FixedBatches(random_batches(STEPS, GLOBAL_BATCH)), DistInfo(), "auto", 1)
    return [h["loss"] for h in history], [h["grad_norm"] for h in history], model.state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_equals_one_process_with_the_same_global_batch(tmp_path, strategy):
    if strategy == "fsdp" and not hasattr(torch.distributed, "fsdp"):
        pytest.fail("torch.distributed.fsdp is missing")
    sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import test_train_helpers
    got = run_world(tmp_path, strategy)
    losses, norms, weights = single_process()
    assert got["history"] == pytest.approx(losses, rel=1e-5)
    assert got["grad_norm"] == pytest.approx(norms, rel=1e-4)
    for k, v in weights.items():
        torch.testing.assert_close(got["model"][k], v, atol=2e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("args", [
    ["stage=1", "model=blip_tiny", "trainer.grad_accum=2"],                         # DDP, real BLIP objective
    ["stage=2", "trainer.distributed.strategy=fsdp", "trainer.llm_warmup_steps=2", "init_from=null"],  # FSDP2
])
def test_the_script_under_torchrun_with_the_real_tiny_models(tmp_path, args):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "scripts" / "train.py"), *args, "trainer.max_steps=3", "trainer.checkpoint_every=2",
           "trainer.threads=1", "trainer.batch_size=8", "model.objective.queue_size=64" if args[0] == "stage=1" else
           "eval.max_new_tokens=3", f"output_root={tmp_path}/out", "data.synthetic.num_train=256",
           "data.synthetic.num_val=16", "data.synthetic.shard_size=64", f"data.synthetic.cache_dir={tmp_path}/cache",
           "trainer.progress_bar=false", "model.vision_init=null"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "trained 3 steps" in out.stdout and "held-out" in out.stdout
    ckpts = sorted((tmp_path / "out").glob("*/*/checkpoints/step_*"))
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000003"]
    assert {p.name for p in ckpts[-1].iterdir()} == {"state.pt", "rng_rank0.pt", "rng_rank1.pt", "manifest.json"}
    # the manifest is written after every rank's files: it lists both ranks' RNG states
    files = json.loads((ckpts[-1] / "manifest.json").read_text())["files"]
    assert sorted(files) == ["rng_rank0.pt", "rng_rank1.pt", "state.pt"]
