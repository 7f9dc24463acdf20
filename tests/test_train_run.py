"""scripts/train.py's run(): outputs of a run, resume=latest, and the real tiny models wired in (few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from blip import registry
from blip.train.run import quote_stage_override, run
from test_train_helpers import build_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DATA = ["data.synthetic.num_train=256", "data.synthetic.num_val=32", "data.synthetic.shard_size=64",
             "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.threads=null", "eval.batch_size=16",
             "model.vision_init=null"]   # a random frozen ViT (allowed for the tiny models): no encoder training


def config(tmp_path: Path, run_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=quote_stage_override(
            [f"run_dir={tmp_path}/outputs/test/{run_name}", f"output_root={tmp_path}/outputs", "name=test",
             f"data.synthetic.cache_dir={tmp_path}/cache"] + TINY_DATA + overrides))


def test_run_writes_its_outputs_and_resume_latest_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.OBJECTIVES, ("blip_tiny", "pretrain"), build_tiny)   # the tiny stand-in model
    stand_in = ["stage=1", "model=blip_tiny", "trainer.epochs=1", "trainer.checkpoint_every=5"]
    first = run(config(tmp_path / "a", "r1", stand_in))
    assert first["steps"] == 16 and first["samples"] == 256
    d = tmp_path / "a" / "outputs" / "test" / "r1"
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.json", "loss_curve.svg", "results.json"):
        assert (d / name).exists(), name
    assert list((d / "tensorboard").iterdir())
    assert [p.name for p in sorted((d / "checkpoints").iterdir())] == ["step_00000015", "step_00000016"]
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/grad_norm"} <= records[-1].keys()
    ev = json.loads((d / "results.json").read_text())["eval"]
    assert ev["num_images"] == 32 and 0 <= ev["i2t_r1"] <= 100

    # a longer run of the same name continues where the newest earlier run stopped, in that run's directory
    more = run(config(tmp_path / "a", "r2", stand_in[:2] + ["trainer.epochs=2", "resume=latest"]))
    assert more["steps"] == 32 and more["samples"] == 512
    assert not (tmp_path / "a/outputs/test/r2").exists()
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 32 and 16 in steps  # one curve, no repeated steps
    assert [p.name for p in sorted((d / "checkpoints").iterdir())] == ["step_00000016", "step_00000032"]


def test_real_blip_pretraining_model_runs(tmp_path):
    out = run(config(tmp_path, "blip", ["stage=1", "model=blip_tiny", "trainer.max_steps=2",
                                        "model.objective.queue_size=64", "trainer.activation_checkpointing=true"]))
    assert out["steps"] == 2 and "i2t_r1" in out["eval"]


def test_real_blip2_stage2_model_runs(tmp_path):
    out = run(config(tmp_path, "blip2", ["stage=2", "trainer.max_steps=2", "trainer.llm_warmup_steps=2",
                                         "eval.max_new_tokens=4", "init_from=null"]))
    assert out["steps"] == 2 and out["eval"]["num_images"] == 32 and "acc_color" in out["eval"]


def test_blip2_stage1_then_stage2_from_its_qformer(tmp_path):
    one = run(config(tmp_path, "s1", ["stage=1", "model=blip2_tiny_qformer", "trainer.max_steps=2",
                                      "eval.enabled=false"]))
    assert one["steps"] == 2
    import torch

    s1 = torch.load(sorted((tmp_path / "outputs/test/s1/checkpoints").iterdir())[-1] / "state.pt",
                    weights_only=True)["model"]
    two = run(config(tmp_path, "s2", ["stage=2", "trainer.max_steps=1", "trainer.llm_warmup_steps=1",
                                      f"init_from={tmp_path}/outputs/test/s1", "eval.enabled=false"]))
    assert two["steps"] == 1
    s2 = torch.load(sorted((tmp_path / "outputs/test/s2/checkpoints").iterdir())[-1] / "state.pt",
                    weights_only=True)["model"]
    frozen = [k for k in s2 if k.startswith("model.image_encoder.visual_encoder.")]
    assert frozen and all(torch.equal(s1[k], s2[k]) for k in frozen)  # the stage-1 frozen ViT carried over
    shared = [k for k in s2 if k.startswith("model.qformer.") and k in s1]
    assert len(shared) > 20


@pytest.mark.parametrize("task", ["caption_coco", "retrieval_coco"])
def test_fine_tuning_tasks_train_the_real_objectives(tmp_path, task):
    settings = ["model.objective.queue_size=32"] if task.startswith("retrieval") else ["~model.objective"]
    out = run(config(tmp_path, task, ["stage=1", f"task={task}", "model=blip_tiny", "data=synthetic",
                                      "model.image_size=48", "trainer.max_steps=2", "trainer.batch_size=8",
                                      "~model.freeze", *settings]))
    assert out["steps"] == 2 and "eval" not in out
