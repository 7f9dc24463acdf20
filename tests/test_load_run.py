"""A run directory of scripts/train.py is a model: blip.load / --model rebuild it from the run's own config.yaml and
load the newest checkpoint by name (BLIP pretraining, BLIP-2 stage 1 and stage 2)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import blip
from blip.checkpoints import CheckpointError
from blip.cli import main
from blip.run_layout import find_run
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
    return {"blip": train(tmp, "blip", ["stage=1", "model=blip_tiny", "model.image_size=48",
                                        "model.objective.queue_size=16"]),
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


def test_the_directory_of_a_names_runs_is_its_newest_run(runs, fixtures, tmp_path, capsys, one_thread):
    by_name = tmp_path / "outputs" / "stage1_blip_tiny_synthetic"   # as scripts/train.py lays out runs of a name
    by_name.mkdir(parents=True)
    (by_name / "2026-01-01_09-00-00").symlink_to(runs["blip"])
    (by_name / "2026-01-01_10-00-00").mkdir()                       # newer, no checkpoint yet
    (by_name / "2026-01-01_10-00-00" / "config.yaml").write_text((runs["qformer"] / "config.yaml").read_text())
    state = checkpoint_state(runs["blip"])
    caption = blip.load(by_name)
    assert type(caption).__name__ == "BlipCaption"
    assert all(torch.equal(t, state[k]) for k, t in caption.state_dict().items())
    # the CLI tells the task from the chosen run's config.yaml: a BLIP pretraining run matches with its ITM head
    cat = fixtures / "images" / "cat.jpg"
    assert main(["match", str(cat), "a red circle", "--model", str(by_name)]) == 0
    assert capsys.readouterr().out.strip().endswith("a red circle")

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


def fake_run(run_dir: Path, steps: list[int], partial: bool = False) -> Path:
    """A run directory as scripts/train.py lays it out: config.yaml and checkpoints/step_*/state.pt (empty here)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {}\n")
    for step in steps:
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir()
        (run_dir / "checkpoints" / f"step_{step:08d}" / "state.pt").touch()
    if partial:   # a save that never completed: not a checkpoint
        (run_dir / "checkpoints" / ".step_00000200.tmp").mkdir()
    return run_dir


def test_a_directory_of_runs_stands_for_its_newest_run_with_a_checkpoint(tmp_path):
    name = tmp_path / "outputs" / "stage1_x"
    fake_run(name / "2026-01-01_09-00-00", [100, 200])
    newest = fake_run(name / "2026-01-02_08-00-00", [50, 100])   # later by its name, though created after the next
    fake_run(name / "2026-01-02_09-30-00", [], partial=True)      # newer, but killed before its first checkpoint
    (name / "notes").mkdir()                                      # not a run: ignored
    assert find_run(name) == (newest / "config.yaml", newest / "checkpoints" / "step_00000100")
    fake_run(name / "2026-01-02_09-30-00-1", [10])                # a second run started in the same second
    assert find_run(name)[1] == name / "2026-01-02_09-30-00-1" / "checkpoints" / "step_00000010"
    assert find_run(newest) == (newest / "config.yaml", newest / "checkpoints" / "step_00000100")  # a run: itself
    assert find_run(tmp_path / "outputs") is None                 # runs two levels down are not its runs

    empty = tmp_path / "outputs" / "stage2_y"
    fake_run(empty / "2026-01-01_09-00-00", [])
    fake_run(empty / "2026-01-01_10-00-00", [], partial=True)
    with pytest.raises(CheckpointError, match=r"stage2_y: none of its 2 runs .*has a finished checkpoint"):
        find_run(empty)
    with pytest.raises(CheckpointError, match="none of its 2 runs"):
        blip.load(empty)


def test_blip_load_refuses_a_run_whose_newest_checkpoint_changed_on_disk(tmp_path, one_thread):
    run_dir = train(tmp_path, "blip", ["stage=1", "model=blip_tiny", "model.image_size=48",
                                       "model.objective.queue_size=16", "trainer.max_steps=2",
                                       "trainer.checkpoint_every=1"])
    older, newest = sorted((run_dir / "checkpoints").iterdir())
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:-1] + bytes([state.read_bytes()[-1] ^ 0x01]))   # one bit of its last byte
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest} is damaged: .*sha256 differs"):
        blip.load(run_dir)
    assert type(blip.load(older)).__name__ == "BlipCaption"   # the error names this one to load instead
