"""Training under real faults: a process killed with SIGKILL inside a checkpoint write, a full disk, a diverging loss,
a failing metrics sink, a data error on one rank of two, same-name runs started together, a changed batch layout."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from blip.train.distributed import DistInfo

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# ---- helpers -------------------------------------------------------------------------------------------------
class MeanModel(nn.Module):
    """loss = mean((w * mean pixel - 1)^2): a tiny trainable model whose loss follows its input (NaN in, NaN out)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, batch: dict) -> dict:
        x = batch["pixel_values"].mean(dim=(1, 2, 3))
        loss = ((self.w[None] * x[:, None] - 1) ** 2).mean()
        return {"loss": loss}


class Batches:
    """TrainData-like: `n` batches of 2 samples; batch `nan_at` holds NaN pixels, batch `fail_at` raises `error`."""

    def __init__(self, n: int, nan_at: int | None = None, fail_at: int | None = None, error: Exception | None = None):
        self.n, self.nan_at, self.fail_at, self.error = n, nan_at, fail_at, error

    @property
    def batches_per_epoch(self) -> int:
        return self.n

    def iterate(self, epoch: int, start_batch: int = 0):
        for i in range(start_batch, self.n):
            if i == self.fail_at:
                raise self.error
            px = torch.full((2, 3, 4, 4), float("nan") if i == self.nan_at else 0.1 * (i + 1))
            yield {"pixel_values": px, "text": ["a", "b"]}


def trainer(model, *, info=DistInfo(), **kw):
    from blip.train.loop import Trainer
    from blip.train.schedule import IterationSchedule

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = IterationSchedule(opt, name="cosine", lr=0.1, total_steps=8, steps_per_epoch=8, warmup_steps=0)
    return Trainer(model, opt, sched, info=info, log_every=1, **kw)


# ---- the loop --------------------------------------------------------------------------------------------------
def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from blip.run_layout import list_checkpoints
    from blip.train.loop import NonFiniteLossError

    model = MeanModel()
    t = trainer(model, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*step_00000002"):
        t.fit(Batches(8, nan_at=2))
    assert t.state.step == 2 and torch.isfinite(model.w).all()  # the NaN gradients never reached the weights
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_a_failing_metrics_sink_is_reported_and_no_step_is_lost(tmp_path, caplog):
    from blip.train.metrics_log import MetricLogger

    class FullDisk:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

    logger = MetricLogger(tmp_path, tensorboard=False, progress_bar=False)
    t = trainer(MeanModel(), logger=logger)
    good, logger.jsonl = logger.jsonl, FullDisk()
    t.on_step = lambda state, _: setattr(logger, "jsonl", good) if state.step == 3 else None
    history = t.fit(Batches(5))
    logger.close()
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # steps 4 and 5, after the sink recovered
    errors = [r.getMessage() for r in caplog.records if "metrics sink" in r.getMessage()]
    assert len(errors) == 2 and "No space left on device" in errors[0] and "works again at step 4" in errors[1]


def test_resume_with_another_batch_layout_refuses_and_says_what_changed(tmp_path):
    saved = trainer(MeanModel(), checkpoint_dir=tmp_path, layout={"batch_size": 8})
    saved.fit(Batches(2))
    with pytest.raises(ValueError, match=r"batch_size 8 -> 4.*init_from"):
        trainer(MeanModel(), checkpoint_dir=tmp_path, layout={"batch_size": 4}).resume()
    with pytest.raises(ValueError, match=r"grad_accum 1 -> 2"):
        trainer(MeanModel(), checkpoint_dir=tmp_path, layout={"batch_size": 8}, grad_accum=2).resume()
    assert trainer(MeanModel(), checkpoint_dir=tmp_path, layout={"batch_size": 8}).resume()


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from blip.data.skips import DatasetError
    from blip.train.distributed import init_distributed
    from test_train_helpers import end_gloo_worker

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = init_distributed("cpu")
    from torch.nn.parallel import DistributedDataParallel

    model = MeanModel()
    bad = DatasetError("dataset shards-{0..9}.tar: no sample decoded in a full pass") if rank == 1 else None
    try:
        trainer(DistributedDataParallel(model), info=info).fit(Batches(6, fail_at=3 if rank == 1 else None, error=bad))
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 - the outcome is the test's subject
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    end_gloo_worker()


def test_a_data_error_on_one_rank_stops_every_rank(tmp_path):
    sys.path.insert(0, str(TESTS))  # spawned workers import this module
    ctx = mp.start_processes(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in ctx.processes), "a rank hung or crashed"
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[1].startswith("DatasetError: dataset shards")
    assert outcomes[0].startswith("PeerFailed: rank 1 stopped the job: DatasetError: dataset shards")


# ---- run directories -------------------------------------------------------------------------------------------
def test_same_name_runs_started_together_get_their_own_directories(tmp_path):
    from omegaconf import OmegaConf

    from blip.train.run import claim_run_dir

    cfg = OmegaConf.create({"run_dir": str(tmp_path / "test" / "2026-01-01_00-00-00"), "x": 1})
    got, start = [], threading.Barrier(3)

    def claim():
        start.wait()
        got.append(claim_run_dir(cfg, None))

    threads = [threading.Thread(target=claim) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert sorted(p.name for p in got) == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-1", "2026-01-01_00-00-00-2"]


# ---- checkpoints under a killed process and a full disk --------------------------------------------------------
KILL_INSIDE_SAVE = """
import io, os, runpy, signal, sys, torch
sys.path.insert(0, "tests")
from test_train_helpers import build_tiny
from blip import registry
registry.OBJECTIVES["blip_tiny", "pretrain"] = build_tiny   # the tiny stand-in model
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if getattr(f, "name", "").endswith(os.path.join(".step_00000006.tmp", "state.pt")):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: buf.tell() // 2])  # half of the file is on disk ...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)        # ... when the process dies
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = [os.path.join("scripts", "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def overrides(tmp_path: Path, run: str, *extra: str, keep_last: int = 5) -> list[str]:
    return ["stage=1", "model=blip_tiny", f"run_dir={tmp_path}/out/test/{run}",
            f"output_root={tmp_path}/out", "name=test", f"data.synthetic.cache_dir={tmp_path.parent}/cache",
            "data.synthetic.num_train=64", "data.synthetic.num_val=16", "data.synthetic.shard_size=32",
            "trainer.batch_size=8", "trainer.epochs=1", "trainer.checkpoint_every=3", f"trainer.keep_last={keep_last}",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.threads=1", "eval.enabled=false",
            *extra]


def run_in_process(args: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from blip import registry
    from blip.train.run import quote_stage_override, run
    from test_train_helpers import build_tiny

    with pytest.MonkeyPatch.context() as patch, initialize_config_dir(config_dir=str(ROOT / "configs"),
                                                                      version_base=None):
        patch.setitem(registry.OBJECTIVES, ("blip_tiny", "pretrain"), build_tiny)   # the tiny stand-in model
        return run(compose("train", overrides=quote_stage_override(args)))


def final_model(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return torch.load(last / "state.pt", weights_only=True)["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_inside_a_checkpoint_write_resumes_bit_identically(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, *overrides(tmp_path, "killed")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = tmp_path / "out/test/killed/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_00000006.tmp", "step_00000003"]

    resumed = run_in_process(overrides(tmp_path, "second", "resume=latest"))
    assert resumed["steps"] == 8
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000006", "step_00000008"]
    assert not (tmp_path / "out/test/second/checkpoints").exists()  # continued in its own directory
    run_in_process(overrides(tmp_path, "reference"))
    assert_bit_identical(final_model(tmp_path / "out/test/killed"), final_model(tmp_path / "out/test/reference"))


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(directory, make_room): a 20 MB tmpfs when we may mount one (root), else a directory whose checkpoint writes
    fail with ENOSPC past 20 MB (torch.save replaced by a size-limited writer). A checkpoint of the stand-in model
    is ~12 MB, so the first fits and the second hits the full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    limit = 20 << 20
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(disk)], capture_output=True).returncode == 0
    if mounted:
        yield disk, lambda: subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)
        return
    real_save, written = torch.save, [0]

    def limited_save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        room = limit - written[0]
        f.write(data[:max(room, 0)])
        written[0] += len(data)
        if written[0] > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", limited_save)
    yield disk, lambda: monkeypatch.setattr(torch, "save", real_save)


def test_a_full_disk_names_the_path_leaves_no_tmp_and_resumes_from_the_last_good_checkpoint(tmp_path, small_disk):
    from blip.train.checkpoint import CheckpointSaveError

    disk, make_room = small_disk
    args = overrides(tmp_path, "r", keep_last=1)
    args = [a.replace(f"{tmp_path}/out", str(disk)) for a in args]
    with pytest.raises(CheckpointSaveError) as err:
        run_in_process(args)
    assert err.value.errno == errno.ENOSPC
    assert "[Errno 28]" in str(err.value) and ".step_00000006.tmp" in str(err.value)
    ckpts = disk / "test/r/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003"]  # no .tmp left behind

    make_room()
    resumed = run_in_process([a.replace("/test/r", "/test/r2") for a in args] + ["resume=latest"])
    assert resumed["steps"] == 8 and sorted(p.name for p in ckpts.iterdir()) == ["step_00000008"]


# ---- a job whose data has nothing readable ends with a named error ---------------------------------------------
@pytest.mark.parametrize("kind", ["json_wrong_image_root", "shard_of_html_pages"])
def test_a_job_with_no_readable_sample_ends_with_a_named_error(tmp_path, kind):
    from blip.data.skips import DatasetError
    from test_data_guards import jpeg, write_tar

    if kind == "json_wrong_image_root":
        (tmp_path / "annotations").mkdir()
        (tmp_path / "annotations" / "coco_karpathy_train.json").write_text(json.dumps(
            [{"image": f"val2014/{i}.jpg", "caption": f"a photo number {i}", "image_id": i} for i in range(64)]))
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "0.jpg").write_bytes(jpeg())  # the images exist, the configured root is wrong
        data = ["data=coco_karpathy", f"data.root={tmp_path}", "data.datasets.0.image_root=/no/such/root"]
        named = ["coco_karpathy_train.json", "/no/such/root", "bad_image"]
    else:
        html = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
        write_tar(tmp_path / "shard-0.tar", [{"__key__": f"{i:04d}", "jpg": html, "txt": b"a cat"} for i in range(64)])
        data = ["data=webdataset", f"data.datasets.0.urls={tmp_path}/shard-0.tar", "data.datasets.0.num_samples=64"]
        named = ["shard-0.tar", "HTML error page"]
    args = ["stage=1", "model=blip_tiny", f"run_dir={tmp_path}/out/test/r", f"output_root={tmp_path}/out",
            "name=test", *data,
            "data.num_workers=0", "data.shuffle_buffer=0", "trainer.batch_size=8", "trainer.progress_bar=false",
            "trainer.tensorboard=false", "trainer.threads=1", "eval.enabled=false"]
    with pytest.raises(DatasetError) as err:
        run_in_process(args)
    assert all(part in str(err.value) for part in named), str(err.value)


# ---- damaged checkpoints, two resumes of one run ---------------------------------------------------------------
def saved_run(tmp_path: Path, steps: int) -> Path:
    """A run directory: config.yaml and checkpoints/step_1..steps of the stand-in trainer (each with its manifest)."""
    run = tmp_path / "out" / "test" / "r"
    trainer(MeanModel(), checkpoint_dir=run / "checkpoints", checkpoint_every=1, keep_last=None).fit(Batches(steps))
    (run / "config.yaml").write_text("model: {}\n")
    return run


def flip_a_weight_bit(ckpt: Path) -> None:
    """Change one bit of the model weight ``w`` inside a checkpoint's state.pt (found by its bytes): the size stays,
    torch.load still reads the file, and a weight differs."""
    state = ckpt / "state.pt"
    data, weight = bytearray(state.read_bytes()), torch.load(state, weights_only=True)["model"]["w"]
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x01
    state.write_bytes(bytes(data))
    assert not torch.equal(torch.load(state, weights_only=True)["model"]["w"], weight)


def resume_cfg(tmp_path: Path, resume: str):
    from omegaconf import OmegaConf
    return OmegaConf.create({"resume": resume, "output_root": str(tmp_path / "out"), "name": "test",
                             "run_dir": str(tmp_path / "out" / "test" / "new")})


def test_every_checkpoint_carries_the_size_and_sha256_of_its_files(tmp_path):
    import hashlib

    from blip.run_layout import list_checkpoints
    run = saved_run(tmp_path, 2)
    for ckpt in list_checkpoints(run / "checkpoints"):
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        assert sorted(files) == ["rng_rank0.pt", "state.pt"]
        for name, entry in files.items():
            data = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_resume_skips_damaged_checkpoints_for_the_newest_intact_one(tmp_path, caplog):
    from blip.run_layout import list_checkpoints
    from blip.train.run import claim_run_dir, find_resume
    run = saved_run(tmp_path, 4)
    ckpts = run / "checkpoints"
    step = {i: ckpts / f"step_{i:08d}" for i in range(1, 5)}
    flip_a_weight_bit(step[4])                                              # a weight changed, the size not
    (step[3] / "state.pt").write_bytes(b"")                                 # emptied
    (step[2] / "manifest.json").unlink()                                    # from before manifests, and cut short
    (step[2] / "state.pt").write_bytes((step[2] / "state.pt").read_bytes()[:1000])
    (step[1] / "manifest.json").unlink()                                    # from before manifests, whole
    caplog.set_level("WARNING", logger="blip.train")
    cfg = resume_cfg(tmp_path, "latest")
    assert find_resume(cfg, Path(cfg.run_dir)) == step[1]
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipping checkpoint {step[4]}: {step[4] / 'state.pt'}: its sha256 differs" in said, said
    assert f"skipping checkpoint {step[3]}: {step[3] / 'state.pt'}: 0 bytes" in said, said
    assert f"skipping checkpoint {step[2]}: {step[2] / 'state.pt'}: truncated" in said, said
    assert f"{step[1]} has no manifest.json" in said and "unverified" in said, said

    assert claim_run_dir(cfg, step[1]) == run   # the damaged later checkpoints are set aside, not deleted
    assert list_checkpoints(ckpts) == [step[1]]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002.corrupt",
                                                       "step_00000003.corrupt", "step_00000004.corrupt"]
    resumed = trainer(MeanModel(), checkpoint_dir=ckpts)
    assert resumed.resume(find_resume(cfg, Path(cfg.run_dir))) and resumed.state.step == 1


def test_a_run_without_an_intact_checkpoint_is_not_resumed(tmp_path):
    from blip.checkpoints import CheckpointError
    from blip.train.run import find_resume
    run = saved_run(tmp_path, 2)
    for state in (run / "checkpoints").glob("step_*/state.pt"):
        state.write_bytes(state.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints up to step_00000002"):
        find_resume(resume_cfg(tmp_path, str(run)), tmp_path / "new")


def test_blip_load_refuses_a_damaged_newest_checkpoint_and_names_the_intact_one(tmp_path):
    from blip.checkpoints import CheckpointError
    from blip.run_layout import read_run_weights
    run = saved_run(tmp_path, 2)
    newest, older = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000001"
    flip_a_weight_bit(newest)   # torch.load reads it without complaint
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest} is damaged: .*the newest intact one is {older}"):
        read_run_weights(run)   # what blip.load / init_from read a run's weights with
    assert read_run_weights(older)[0] == older


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from blip.train.run import claim_run_dir
claim_run_dir(OmegaConf.create({"run_dir": sys.argv[2]}), Path(sys.argv[1]))
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_second_resume_of_a_running_run_is_refused_until_it_ends(tmp_path):
    from blip.file_lock import LockHeldError
    from blip.train.run import claim_run_dir
    run = saved_run(tmp_path, 1)
    ckpt = run / "checkpoints" / "step_00000001"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, str(ckpt), str(tmp_path / "other")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "claimed\n", first.stderr.read()
        cfg = resume_cfg(tmp_path, str(run))
        with pytest.raises(LockHeldError, match=rf"run directory {run} is in use by process {first.pid}"):
            claim_run_dir(cfg, ckpt)
    finally:
        first.kill()   # SIGKILL: no clean-up runs, the kernel drops the lock
        first.communicate(timeout=30)
    assert claim_run_dir(cfg, ckpt) == run
