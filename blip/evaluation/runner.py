"""One benchmark evaluation: check the data, load the model, run the task sharded and resumable, write the results.

Used by ``scripts/evaluate.py`` (config: ``configs/evaluate/``) and at the end of every fine-tuning run. Outputs in
``output_dir``: ``predictions.json`` (the format the task's evaluation server takes), ``metrics.json``, for retrieval
``scores.safetensors`` (each query's top-k scores), and ``partial/`` (finished chunks: a re-run skips them).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data.eval_datasets import read_task_data
from ..models.family import Family, family_of
from .sharding import EvalContext, check_manifest, write_json_atomic

log = logging.getLogger("blip.evaluate")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def evaluate(model: nn.Module, task: Mapping, split: str, data_root: str | Path, output_dir: str | Path,
             ctx_settings: Mapping[str, Any], data=None, label: Mapping[str, Any] | None = None) -> dict:
    """Collective over the ranks in ``ctx_settings``: run ``task`` on ``split`` and write the outputs (rank 0).

    ctx_settings: EvalContext fields (device, rank, world_size, batch_size, num_workers, progress_bar,
    autocast_dtype). label: extra fields recorded in the manifest and metrics (checkpoint, zero_shot).
    Returns the metrics (empty for splits without public ground truth)."""
    from .caption import run_captioning
    from .nlvr2 import run_nlvr
    from .retrieval import run_retrieval
    from .vqa import run_vqa
    started = time.perf_counter()
    data = data if data is not None else read_task_data(task, split, data_root)
    output_dir = Path(output_dir)
    ctx = EvalContext(work_dir=output_dir / "partial", **ctx_settings)
    label = dict(label or {})
    protocol = OmegaConf.to_container(task["protocol"]) if isinstance(task, DictConfig) else task["protocol"]
    check_manifest(ctx, {"task": task["name"], "split": split, "batch_size": ctx.batch_size,
                         "family": family_of(model), "protocol": protocol, **label})
    model.eval()
    extra = {}
    if task["kind"] == "caption":
        predictions, metrics = run_captioning(model, data, task, ctx)
    elif task["kind"] == "vqa":
        predictions, metrics = run_vqa(model, data, task, ctx)
    elif task["kind"] == "nlvr":
        predictions, metrics = run_nlvr(model, data, task, ctx)
    else:
        predictions, metrics, extra = run_retrieval(model, data, task, ctx)
    if ctx.is_main:
        write_json_atomic(output_dir / "predictions.json", predictions)
        if extra:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in extra.items()}, str(output_dir / "scores.safetensors"))
        n = len(data.images)
        record = {**metrics, "task": task["name"], "split": split, "num_items": n, **label}
        (output_dir / "metrics.json").write_text(json.dumps(record, indent=1))
        print(summary_line(task["name"], split, metrics, n, time.perf_counter() - started,
                           output_dir), flush=True)
    return metrics


def own_prompt_protocol(task: Mapping, model: nn.Module) -> Mapping:
    """The task with a BLIP-2 LLM model's own prompt (the one it was trained with, which its run records) in place of
    the protocol's: a training run is evaluated as it captions and answers everywhere else (``caption-dir``,
    ``serve``), not with LAVIS's "a photo of" when it never saw that prompt. A question template (a protocol prompt
    with "{}": VQA, OK-VQA, GQA) is replaced only by the template a VQA run recorded (``config.question_prompt``),
    never by a caption prompt. Released checkpoints keep the protocol."""
    if family_of(model) is not Family.BLIP2_LLM or "blip2_llm" not in task.get("protocol", {}):
        return task
    question = "{}" in str(task["protocol"]["blip2_llm"].get("prompt") or "")
    own = model.config.question_prompt if question else model.config.prompt
    if own is None:
        return task
    task = OmegaConf.create(OmegaConf.to_container(task) if isinstance(task, DictConfig) else dict(task))
    task.protocol.blip2_llm.prompt = own
    return task


def summary_line(name: str, split: str, metrics: Mapping, n: int, seconds: float, output_dir: Path) -> str:
    """One line: caption metrics ×100 (as papers print them), accuracies and recalls in percent."""
    parts = []
    for key in ("Bleu_4", "METEOR", "CIDEr", "SPICE"):
        if isinstance(metrics.get(key), float):
            parts.append(f"{key} {100 * metrics[key]:.1f}")
    for key in ("overall", "accuracy", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        if isinstance(metrics.get(key), float):
            parts.append(f"{'accuracy' if key in ('overall', 'accuracy') else key} {metrics[key]:.2f}")
    shown = ", ".join(parts) if parts else "no public ground truth: submit predictions.json"
    return f"{name} {split}: {shown} ({n} items, {seconds:.0f} s) -> {output_dir}"


def context_settings(cfg: Mapping, info) -> dict:
    """EvalContext fields from an evaluate config (batch_size, num_workers, progress_bar, precision) + DistInfo."""
    precision = cfg.get("precision", "fp32")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    return {"device": info.device, "rank": info.rank, "world_size": info.world_size,
            "batch_size": int(cfg.get("batch_size", 32)), "num_workers": int(cfg.get("num_workers", 0)),
            "progress_bar": bool(cfg.get("progress_bar", True)), "autocast_dtype": DTYPES[precision]}


# ---- end of a fine-tuning run -----------------------------------------------------------------------------------
def benchmark_data(cfg: DictConfig):
    """At the start of a fine-tuning run: the benchmark data of ``cfg.eval_task`` (a configs/evaluate/task entry
    the recipe includes) on ``cfg.data.root``, or None with one warning naming what is missing (the run trains
    anyway; its end-of-run evaluation is skipped)."""
    from ..data.eval_datasets import MissingDataError
    if not cfg.get("eval_task") or not cfg.eval.enabled:
        return None
    try:
        return read_task_data(cfg.eval_task, cfg.eval.split, cfg.data.get("root") or "data")
    except MissingDataError as e:
        log.warning("the end-of-run %s evaluation will be skipped (eval.enabled=false silences this): %s",
                    cfg.eval_task.name, e)
        return None


def evaluate_after_training(model: nn.Module | None, cfg: DictConfig, data, run_dir: Path, info, step: int) -> dict:
    """Collective: the task's benchmark evaluation of the model trained for ``step`` steps into ``run_dir/eval`` (as
    scripts/evaluate.py would write it). ``model`` None on ranks without the full weights (FSDP: rank 0 evaluates
    an unsharded copy alone)."""
    if data is None or model is None:
        return {}
    alone = info.distributed and cfg.trainer.distributed.strategy == "fsdp"
    settings = {"batch_size": cfg.eval.batch_size, "num_workers": min(int(cfg.data.get("num_workers", 0)), 4),
                "progress_bar": cfg.trainer.get("progress_bar", True),
                "precision": cfg.eval.get("precision", "fp32")}
    ctx = context_settings(settings, info)
    if alone:
        ctx.update(rank=0, world_size=1)
    model = getattr(model, "model", model)
    return evaluate(model, own_prompt_protocol(cfg.eval_task, model), cfg.eval.split, cfg.data.get("root") or "data",
                    Path(run_dir) / "eval", ctx, data=data, label={"checkpoint": f"{run_dir} (step {step})"})
