"""scripts/evaluate.py as users run it: missing data reported before model work, torchrun (2 gloo ranks) == 1
process, and a killed evaluation resumed to the same files with every item exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import blip
from eval_fixtures import REPO, run_task, tiny_blip, write_retrieval, write_vqa


def run_script(args: list[str], torchrun: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + ["scripts/evaluate.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_data_is_listed_before_the_model_loads(tmp_path):
    proc = run_script(["task=caption_coco", f"data.root={tmp_path / 'empty'}", f"checkpoint={tmp_path / 'nope.pth'}",
                       f"output_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "Traceback" not in err and "nope.pth" not in err  # the data check comes first
    for path in ("annotations/coco_karpathy_test.json", "annotations/coco_karpathy_test_gt.json", "val2014"):
        assert str(tmp_path / "empty" / path) in err
    assert "coco_karpathy_{val,test}_gt.json" in err and "val2014.zip" in err and "docs/data.md" in err
    assert not (tmp_path / "out" / "partial").exists()


def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path, fixtures, one_thread):
    from safetensors.torch import load_file

    from blip.convert.blip import save_safetensors
    root = tmp_path / "data"
    write_retrieval(fixtures, root, "annotations/coco_karpathy_test.json", "val2014")
    model = tiny_blip("retrieval", seed=2)
    save_safetensors(model, tmp_path / "retrieval.safetensors")
    settings = ["task=retrieval_coco", "split=test", f"data.root={root}", "device=cpu", "batch_size=2",
                "num_workers=0", "progress_bar=false", "task.protocol.blip.k=7"]
    proc = run_script([*settings, f"checkpoint={tmp_path / 'retrieval.safetensors'}", f"output_dir={tmp_path / 'two'}"],
                      torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("retrieval_coco test:") for line in proc.stdout.splitlines()) == 1
    # one process evaluates the same file (loaded weights are the file's memory-mapped tensors, whose last-bit
    # rounding in CPU kernels can differ from the in-memory model's)
    one_process = blip.load(tmp_path / "retrieval.safetensors")
    run_task(one_process, "retrieval_coco", "test", root, tmp_path / "one", ("task.protocol.blip.k=7",))
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((one / "predictions.json").read_text()) == json.loads((two / "predictions.json").read_text())
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert {k: v for k, v in m1.items() if k != "checkpoint"} == {k: v for k, v in m2.items() if k != "checkpoint"}
    s1, s2 = load_file(str(one / "scores.safetensors")), load_file(str(two / "scores.safetensors"))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


class Killed(Exception):
    """Stands in for the process dying mid-evaluation."""


def test_killed_evaluation_resumes_to_the_same_files(tmp_path, fixtures, one_thread):
    root = tmp_path / "data"
    write_vqa(fixtures, root, "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
              "annotations/v2_mscoco_val2014_annotations.json", "annotations/answer_list.json", n_images=5)
    model = tiny_blip("vqa", seed=4)
    clean = run_task(model, "vqa_v2", "val", root, tmp_path / "clean")  # 10 questions in 5 chunks of 2

    calls, kill_at = [], [3]
    answer = model.answer

    def killed_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at[0]:
            raise Killed
        return answer(*args, **kwargs)

    model.answer = killed_on_third_chunk
    with pytest.raises(Killed):
        run_task(model, "vqa_v2", "val", root, tmp_path / "resumed")
    partial = tmp_path / "resumed" / "partial" / "answer"
    assert sorted(p.name for p in partial.glob("*.json")) == ["0.json", "1.json"]
    assert not (tmp_path / "resumed" / "predictions.json").exists()
    (partial / ".2.json.999.tmp").write_text('[{"question_id": 1')  # a write cut short by the kill: ignored
    calls.clear()
    kill_at[0] = None
    resumed = run_task(model, "vqa_v2", "val", root, tmp_path / "resumed")
    assert len(calls) == 3  # only the three chunks not on disk
    assert resumed == clean
    for name in ("predictions.json", "metrics.json"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "clean" / name).read_text()
    ids = [p["question_id"] for p in json.loads((tmp_path / "resumed" / "predictions.json").read_text())]
    assert len(ids) == len(set(ids)) == 10
    with pytest.raises(RuntimeError, match="another evaluation"):  # other settings never mix with these chunks
        run_task(model, "vqa_v2", "val", root, tmp_path / "resumed", ("batch_size=3",))


def test_fine_tuning_run_ends_with_its_benchmark_evaluation(tmp_path, fixtures):
    from test_train_run import config

    from blip.train.run import run
    root = tmp_path / "benchmark"
    write_retrieval(fixtures, root, "annotations/coco_karpathy_test.json", "val2014")
    out = run(config(tmp_path, "ft", ["stage=1", "task=retrieval_coco", "model=blip_tiny", "data=synthetic",
                                      "model.image_size=48", "trainer.max_steps=2", "trainer.batch_size=8",
                                      "~model.freeze", "model.objective.queue_size=32", f"+data.root={root}",
                                      "eval.batch_size=2", "eval_task.protocol.blip.k=6"]))
    run_dir = tmp_path / "outputs" / "test" / "ft"
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert out["eval"]["txt_r1"] == metrics["txt_r1"] and metrics["task"] == "retrieval_coco"
    assert len(json.loads((run_dir / "eval" / "predictions.json").read_text())["i2t"]) == 5
    # the run directory as a checkpoint: the same model, the same evaluation
    from blip.api import load_for_evaluation
    model = load_for_evaluation(str(run_dir), {"task": None}, torch.device("cpu"))
    run_task(model, "retrieval_coco", "test", root, tmp_path / "again", ("task.protocol.blip.k=6",))
    for name in ("predictions.json", "scores.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (run_dir / "eval" / name).read_bytes()


def test_the_answer_list_is_needed_only_for_ranking(tmp_path, fixtures, one_thread):
    from blip.data.eval_datasets import MissingDataError
    root = tmp_path / "data"
    write_vqa(fixtures, root, "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
              "annotations/v2_mscoco_val2014_annotations.json", "annotations/answer_list.json", n_images=1)
    (root / "annotations/answer_list.json").unlink()
    model = tiny_blip("vqa")
    with pytest.raises(MissingDataError, match="answer_list.json"):
        run_task(model, "vqa_v2", "val", root, tmp_path / "rank")
    assert not (tmp_path / "rank" / "partial" / "answer").exists()  # refused before decoding
    assert "overall" in run_task(model, "vqa_v2", "val", root, tmp_path / "generate",
                                 ("task.protocol.blip.method=generate",))
