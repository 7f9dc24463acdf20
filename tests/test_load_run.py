"""A run directory of scripts/train.py is a model: blip.load / --model rebuild it from the run's own config.yaml and
load the newest checkpoint by name (BLIP pretraining, BLIP-2 stage 1 and stage 2)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import blip
from blip.checkpoints import CheckpointError
from blip.cli import main
from blip.train.run import quote_stage_override, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train(tmp: Path, name: str, overrides: list[str]) -> Path:
    """A one-step run on a small synthetic set (no evaluation); returns its run directory."""
    run_dir = tmp / "outputs" / name
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=quote_stage_override(
            [f"run_dir={run_dir}", f"output_root={tmp}/outputs", f"data.synthetic.cache_dir={tmp}/cache",
             "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.shard_size=16",
             "trainer.batch_size=8", "trainer.max_steps=1", "trainer.progress_bar=false", "trainer.threads=null",
             "trainer.tensorboard=false", "eval.enabled=false", "model.vision_init=null", *overrides]))
    run(cfg)
    return run_dir


def checkpoint_state(run_dir: Path) -> dict:
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    return torch.load(ckpt / "state.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {"blip": train(tmp, "blip", ["stage=1", "model=blip_tiny", "model.image_size=48", "model.objective.queue_size=16"]),
            "qformer": train(tmp, "qformer", ["stage=1", "model=blip2_tiny_qformer"]),
            "llm": train(tmp, "llm", ["stage=2", "trainer.llm_warmup_steps=1", "init_from=null"])}


def test_blip_pretraining_run_loads_into_each_task(runs, fixtures, capsys, one_thread):
    state = checkpoint_state(runs["blip"])
    caption = blip.load(runs["blip"])                      # default: the captioner
    assert type(caption).__name__ == "BlipCaption" and caption.cfg.image_size == 48   # the run's config.yaml
    for name, tensor in caption.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    retrieval = blip.load(runs["blip"], task="retrieval")
    assert torch.equal(retrieval.itm_head.weight, state["itm_head.weight"])
    # a checkpoint directory of the run works too, and so does the CLI (the subcommand picks the head)
    ckpt = sorted((runs["blip"] / "checkpoints").iterdir())[-1]
    assert type(blip.load(ckpt, task="vqa")).__name__ == "BlipVQA"
    cat = fixtures / "images" / "cat.jpg"
    assert main(["match", str(cat), "a red circle", "--model", str(runs["blip"])]) == 0
    assert capsys.readouterr().out.strip().endswith("a red circle")
    with pytest.raises(CheckpointError, match="not 'stage2'"):
        blip.load(runs["blip"], task="stage2")


def test_blip2_stage1_and_stage2_runs(runs, fixtures, capsys, one_thread):
    qformer = blip.load(runs["qformer"])
    state = checkpoint_state(runs["qformer"])
    assert type(qformer).__name__ == "Blip2Qformer"
    assert all(torch.equal(t, state[f"model.{k}"]) for k, t in qformer.state_dict().items())

    lm = blip.load(runs["llm"])
    state = checkpoint_state(runs["llm"])
    assert type(lm).__name__ == "Blip2LanguageModel"
    assert all(torch.equal(t, state[f"model.{k}"]) for k, t in lm.state_dict().items())  # the warmed-up LLM too
    cat = fixtures / "images" / "cat.jpg"
    assert main(["caption", str(cat), "--model", str(runs["llm"]), "--max-new-tokens", "4", "--json"]) == 0
    assert '"caption"' in capsys.readouterr().out   # the run's own (synthetic-caption) tokenizer decodes


def test_a_run_whose_weights_do_not_fit_its_config_is_refused(runs, tmp_path):
    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text((runs["qformer"] / "config.yaml").read_text())
    ckpt = sorted((runs["llm"] / "checkpoints").iterdir())[-1]
    (broken / "checkpoints" / ckpt.name).symlink_to(ckpt)
    with pytest.raises(CheckpointError, match="does not fit"):
        blip.load(broken)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        blip.load(tmp_path / "empty")
