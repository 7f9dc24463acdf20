"""Build a training run from its Hydra config and execute it: model, data, optimizer, trainer, held-out eval."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from blip.convert.blip2_handoff import is_stage1_checkpoint
from blip.convert.formats import read_checkpoint
from blip.data.datasets import ImageTextStream, JsonSource, TrainData, eval_batches
from blip.data.mixing import mixing_weights
from blip.data.text import text_cleaner
from blip.data.webdataset import WebDatasetSource
from blip.evaluation.runner import benchmark_data, evaluate_after_training
from blip.file_lock import hold_until_exit
from blip.registry import BLIP_FINETUNE_TASKS, LLM_TASKS
from blip.run_layout import CONFIG, RUN_LOCK, checkpoint_path, newest_checkpoint, own_run_dir
from blip.runs import build_model
from blip.train.checkpoint import load_checkpoint, remove_stale_tmp, resume_point, set_aside_damaged_after
from blip.train.distributed import DistInfo, barrier, block_lists, init_distributed, unwrap, wrap_model
from blip.train.init import init_from_checkpoint, question_text_init, refuse_random_frozen, unimodal_init
from blip.train.loop import Trainer
from blip.train.metrics_log import MetricLogger
from blip.train.optim import build_optimizer
from blip.train.precision import PrecisionPolicy
from blip.train.schedule import IterationSchedule
from blip.train.settings import validate_settings

log = logging.getLogger("blip.train")


def quote_stage_override(argv: list[str]) -> list[str]:
    """`stage=1` → `stage='1'`: Hydra parses a bare 1 as an int, which cannot name a config-group option."""
    return [re.sub(r"^(\+?stage)=(\d+)$", r"\1='\2'", a) for a in argv]


# ---- data --------------------------------------------------------------------------------------------------
def build_sources(data_cfg: DictConfig) -> tuple[list, list[float], object | None]:
    """(train sources, mixing weights, held-out source or None)."""
    if data_cfg.get("synthetic") is not None and not data_cfg.datasets:
        from blip.data.synthetic import ensure_synthetic_shards

        s = data_cfg.synthetic
        shards = ensure_synthetic_shards(s.cache_dir, num_train=s.num_train, num_val=s.num_val,
                                         shard_size=s.shard_size, image_size=s.render_size, seed=s.seed)
        return ([WebDatasetSource(shards.train_urls, num_samples=shards.num_train)], [1.0],
                WebDatasetSource(shards.val_urls, num_samples=shards.num_val))
    sources = [make_source(entry) for entry in data_cfg.datasets]
    weights = mixing_weights([source_name(e) for e in data_cfg.datasets], [s.num_samples for s in sources],
                             [e.get("weight") for e in data_cfg.datasets])
    eval_cfg = data_cfg.get("eval")
    return sources, weights, make_source(eval_cfg) if eval_cfg else None


def source_name(entry: DictConfig) -> str:
    return str(entry.get("name") or Path(str(entry.get("annotation") or entry.get("urls"))).stem)


def make_source(entry: DictConfig):
    if entry.type == "json":
        return JsonSource(entry.annotation, entry.get("image_root", ""), text_field=entry.get("text_field", "caption"),
                          answer_weight=entry.get("answer_weight"))
    if entry.type == "wds":
        return WebDatasetSource(entry.urls, num_samples=int(entry.num_samples))
    if entry.type == "nlvr2":
        from blip.data.nlvr2 import NLVR2Source
        return NLVR2Source(entry.annotation, entry.get("image_root", ""), random_swap=entry.get("random_swap", True))
    raise ValueError(f"unknown dataset type {entry.type!r} (json | wds | nlvr2)")


def dataset_text_cleaners(data_cfg: DictConfig, num_sources: int) -> list:
    """Per dataset: BLIP's pre_caption (captions, `data.max_words`) or pre_question (`text_cleaning: question`,
    the default for `text_field: question`; 50 words as BLIP) unless the entry sets its own `max_words`."""
    entries = list(data_cfg.datasets) or [DictConfig({})] * num_sources  # synthetic: captions
    cleaners = []
    for e in entries:
        kind = e.get("text_cleaning") or ("question" if e.get("text_field") == "question" else "caption")
        words = e.get("max_words") or (data_cfg.max_words if kind == "caption" else None)
        cleaners.append(text_cleaner(kind, words))
    return cleaners


def dataset_transforms(cfg: DictConfig, num_sources: int) -> list:
    """Per dataset: the training image transform of `model.transform` (blip: with RandAugment | blip2), unless the
    entry sets its own `transform:` (LAVIS's BLIP-2 pretraining gives its VG images `blip`)."""
    from blip.data.transforms import image_transform

    d = cfg.data
    entries = list(d.datasets) or [DictConfig({})] * num_sources
    made = {}
    for e in entries:
        kind = e.get("transform") or cfg.model.transform
        if kind not in made:
            made[kind] = image_transform(cfg.model.image_size, train=bool(d.augment), kind=kind, min_scale=d.min_scale)
    return [made[e.get("transform") or cfg.model.transform] for e in entries]


def build_train_data(cfg: DictConfig, info: DistInfo, sources: list, weights: list[float],
                     text_fn: list | None = None) -> TrainData:
    d, t = cfg.data, cfg.trainer
    transform = dataset_transforms(cfg, len(sources))
    samples = d.get("samples_per_epoch") or sum(s.num_samples for s in sources)
    batches = samples // (t.batch_size * info.world_size)
    batches -= batches % t.grad_accum
    if batches == 0:
        raise ValueError(f"{samples} training samples make no batch of {t.batch_size} x {info.world_size} rank(s) x "
                         f"{t.grad_accum} accumulation steps: lower trainer.batch_size or add data")
    stream = ImageTextStream(sources, transform, batch_size=t.batch_size, batches_per_epoch=batches, weights=weights,
                             seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                             shuffle_buffer=d.shuffle_buffer,
                             text_fn=text_fn or dataset_text_cleaners(d, len(sources)),
                             max_image_pixels=d.get("max_image_pixels"),
                             max_consecutive_failures=int(d.get("max_consecutive_failures") or 1000))
    return TrainData(stream, num_workers=d.num_workers)


# ---- run ---------------------------------------------------------------------------------------------------
def locate(spec: str, cfg: DictConfig, run_dir: Path) -> Path | None:
    """A run/checkpoint directory, `latest` (this run's name) or `latest:<name>` → a checkpoint directory."""
    if spec == "latest" or spec.startswith("latest:"):
        name = spec.partition(":")[2] or cfg.name
        found = newest_checkpoint(cfg.output_root, name, exclude=run_dir)
        if found is None:
            log.warning("%s: no run of %s with a checkpoint under %s", spec, name, cfg.output_root)
        return found
    return checkpoint_path(spec)


def init_source(spec: str, cfg: DictConfig, run_dir: Path) -> Path | str | None:
    """`init_from`: `latest[:<name>]` (None, with a warning, when there is no such run yet), or a run / checkpoint
    directory, weights file or blip.zoo name (read strictly by blip.train.init)."""
    if spec == "latest" or spec.startswith("latest:"):
        found = locate(spec, cfg, run_dir)
        if found is None:
            log.warning("init_from=%s: nothing to continue from, so %s starts from its own initialisation (stage 2 "
                        "continues from `scripts/train.py stage=1 model=%s` once that run exists)", spec,
                        cfg.model.arch, cfg.model.get("stage1_arch") or "<arch>")
        return found
    return spec


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint `resume` names, checked against its manifest: a damaged one falls back to the newest intact
    earlier checkpoint of its run, with a warning (blip.train.checkpoint.resume_point)."""
    if cfg.resume in (None, "", "none"):
        return None
    found = locate(str(cfg.resume), cfg, run_dir)
    if found is None:
        log.warning("resume=%s: nothing to resume; starting fresh", cfg.resume)
    return None if found is None else resume_point(found)


def claim_run_dir(cfg: DictConfig, resume_from: Path | None) -> Path:
    """This run's directory, claimed by creating its config.yaml exclusively: runs of one name started in the same
    second get `<dir>`, `<dir>-1`, ... . A resumed run continues in the directory of the run it resumes. Either way
    this process locks the directory (`run.lock`) until it exits, so a second resume of a running run is refused
    (blip.file_lock.LockHeldError naming its pid) before it touches anything."""
    config = OmegaConf.to_yaml(cfg, resolve=True)
    if resume_from is not None and (own := own_run_dir(resume_from)) is not None:
        hold_until_exit(own / RUN_LOCK, f"run directory {own}")
        removed = remove_stale_tmp(own / "checkpoints")
        for damaged in set_aside_damaged_after(resume_from):
            log.warning("set aside the damaged checkpoint %s (newer than the one resumed from)", damaged)
        (own / CONFIG).write_text(config)
        log.info("resuming in the run's own directory %s%s", own,
                 f" (removed {len(removed)} incomplete checkpoint(s))" if removed else "")
        return own
    base = Path(cfg.run_dir)
    for i in itertools.count():
        run_dir = base if i == 0 else base.with_name(f"{base.name}-{i}")
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(run_dir / CONFIG, "x") as f:
                f.write(config)
        except FileExistsError:
            continue
        hold_until_exit(run_dir / RUN_LOCK, f"run directory {run_dir}")
        remove_stale_tmp(run_dir / "checkpoints")
        return run_dir
    raise AssertionError("unreachable")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Use the model's own `set_grad_checkpointing` hooks (timm convention) where it has them; without any, wrap
    every repeated block (the ModuleList entries) in torch's checkpoint wrapper."""
    hooked = [m for m in model.modules() if m is not model and hasattr(m, "set_grad_checkpointing")]
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif hooked:
        for m in hooked:
            m.set_grad_checkpointing(True)
    else:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        blocks = set(map(id, block_lists(model)))
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)


def prepare_model(model: nn.Module, cfg: DictConfig, info: DistInfo, policy: PrecisionPolicy) -> nn.Module:
    t = cfg.trainer
    cast = policy.cast_frozen(model)
    if cast:
        log.info("frozen towers stored in %s: %s", policy.frozen_dtype or policy.precision, ", ".join(cast))
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.to(info.device)
    mixed = policy.compute_dtype if t.distributed.strategy == "fsdp" and policy.precision != "fp32" else None
    model = wrap_model(model, info, t.distributed.strategy, mixed_dtype=mixed,
                       find_unused_parameters=t.distributed.find_unused_parameters)
    if t.compile:
        model = torch.compile(model)
    return model


def broadcast_str(value: str, info: DistInfo) -> str:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def initialised_model(cfg: DictConfig, run_dir: Path, resume_from: Path | None, sources, info: DistInfo) -> nn.Module:
    """The training objective with its starting weights: unimodal files, ``init_from`` (BLIP-2 stage 2: the strict
    stage-1 hand-off), the refusal of a random frozen tower, and stage 2's LLM warm-up (not on resume: a checkpoint
    holds the warm LLM)."""
    init = init_source(str(cfg.init_from), cfg, run_dir) if cfg.get("init_from") else None
    init = read_checkpoint(init, "init_from") if init is not None else None   # read once, for every use below
    # BLIP-2 stage 2 starts from a stage-1 run through the one strict hand-off
    # (blip.convert.blip2_handoff.init_from_stage1); a stage-2 / InstructBLIP file (fine-tuning) loads by name
    llm_task = cfg.model.task in LLM_TASKS
    stage1 = init if init is not None and llm_task and is_stage1_checkpoint(init) else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, qformer_from=stage1)
    question_aware = llm_task and model.model.instruct
    reports = unimodal_init(model, cfg.model, cfg.data, text=not question_aware)
    if init is not None and stage1 is None:
        reports.append(init_from_checkpoint(model, init, cfg.get("init_from_min_fraction", 1.0),
                                            already={k for r in reports for k in r.loaded}))
    covered = {k for r in reports for k in r.loaded}
    if stage1 is not None:   # what the hand-off loaded into the objective's model (a stage-1 run carries its ViT)
        covered |= {f"model.{k}" for k in model.model.stage1_report.loaded}
    if question_aware:
        reports.append(question_text_init(model, covered, cfg.model.get("text_init")))
    refuse_random_frozen(model, covered, cfg.model)
    if init is None and cfg.model.task in BLIP_FINETUNE_TASKS:
        log.warning("%s/%s starts from random weights: set init_from=<run dir> to fine-tune pretrained weights",
                    cfg.model.arch, cfg.model.task)
    if cfg.stage.id == 2 and cfg.trainer.get("llm_warmup_steps") and resume_from is None:
        from blip.train.llm_warmup import warm_up_llm

        warm_up_llm(model, sources, cfg.trainer, info)
    return model


def custom_model(cfg: DictConfig, base: nn.Module | None = None) -> nn.Module:
    """task=custom: the base (init_from; ``base`` if resolving the recipe already loaded it) with the recipe applied
    and its objective around it; the resolution the recipe left to the checkpoint is recorded in the config."""
    from blip.runs import custom_objective

    torch.manual_seed(cfg.seed)  # identical new weights (adapters, new text parts) on every rank
    model = custom_objective(cfg, base)
    if cfg.model.get("image_size") is None:
        with open_dict(cfg):
            cfg.model.image_size = int(model.model.image_size)
    return model


def build_trainer(wrapped: nn.Module, cfg: DictConfig, info: DistInfo, policy: PrecisionPolicy, data,
                  run_dir: Path) -> Trainer:
    """The optimizer, the iteration schedule and the trainer around them, checkpointing into ``run_dir``."""
    t = cfg.trainer
    optimizer = build_optimizer(unwrap(wrapped), name=t.optimizer.name, lr=t.optimizer.lr,
                                weight_decay=t.optimizer.weight_decay, betas=tuple(t.optimizer.betas),
                                eps=t.optimizer.eps, layer_decay=t.optimizer.layer_decay,
                                weight_decay_exempt=t.optimizer.weight_decay_exempt)
    trainer = Trainer(wrapped, optimizer, None, info=info, precision=policy, grad_accum=t.grad_accum,
                      grad_clip=t.grad_clip, epochs=t.epochs, max_steps=t.max_steps, log_every=t.log_every,
                      checkpoint_dir=run_dir / "checkpoints", checkpoint_every=t.checkpoint_every,
                      keep_last=t.keep_last, fsdp=t.distributed.strategy == "fsdp",
                      layout={"batch_size": int(t.batch_size)},
                      save_frozen=cfg.stage.id != "finetune")   # task=custom: the frozen parts are init_from's
    trainer.schedule = IterationSchedule(optimizer, name=t.schedule.name, lr=t.optimizer.lr,
                                         total_steps=trainer.total_steps(data.batches_per_epoch),
                                         steps_per_epoch=data.batches_per_epoch // t.grad_accum,
                                         warmup_steps=t.schedule.warmup_steps, warmup_lr=t.schedule.warmup_lr,
                                         min_lr=t.schedule.min_lr, decay_rate=t.schedule.decay_rate)
    return trainer


def run(cfg: DictConfig) -> dict:
    # every setting typed and in range before any work (blip.train.settings); task=custom's open (null) settings
    # are checked again once its recipe has filled them
    finetune = cfg.stage.id == "finetune"
    validate_settings(cfg, open_nulls=finetune)
    t = cfg.trainer
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(t.device, t.distributed.backend)
    if t.get("threads"):
        torch.set_num_threads(int(t.threads))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")  # no-op under Hydra
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the INFO lines, from rank 0
    custom = None
    if finetune:   # task=custom: the rows and the model pick the recipe (blip.train.custom)
        from blip.data.custom import CustomSource
        from blip.train.custom import resolve_custom

        custom = resolve_custom(cfg)
        validate_settings(cfg)
        model = custom_model(cfg, custom.base)   # before the run directory: config.yaml records what it resolved
    resume_from = find_resume(cfg, Path(cfg.run_dir))
    # rank 0 claims the directory; ranks may resolve ${now:...} a second apart
    run_dir = Path(broadcast_str(str(claim_run_dir(cfg, resume_from)) if info.is_main else "", info))
    started = time.perf_counter()

    if custom is not None:
        sources, weights, eval_source, benchmark = [CustomSource(custom.train)], [1.0], None, None
    else:
        sources, weights, eval_source = build_sources(cfg.data)  # every rank: the cache write is atomic
        benchmark = benchmark_data(cfg)  # fine-tuning: the task's benchmark files, checked before any training
        model = initialised_model(cfg, run_dir, resume_from, sources, info)
    torch.manual_seed(cfg.seed + info.rank)

    policy = PrecisionPolicy(t.precision, t.frozen_dtype, device_type=info.device.type)
    wrapped = prepare_model(model, cfg, info, policy)
    text_fn = None
    if custom is not None:
        from blip.data.custom import custom_text_cleaner
        text_fn = [custom_text_cleaner(custom.train.kind, cfg.data.max_words)]
    data = build_train_data(cfg, info, sources, weights, text_fn)
    trainer = build_trainer(wrapped, cfg, info, policy, data, run_dir)
    if resume_from is not None:
        trainer.load_state_dict(load_checkpoint(resume_from, info))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, trainer.state.step,
                 trainer.state.epoch, trainer.state.batch)
    total = trainer.total_steps(data.batches_per_epoch)
    n_train = sum(p.numel() for p in unwrap(wrapped).parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters, %d steps (%d per epoch), %d rank(s), run dir %s", cfg.model.arch, n_train,
             total, data.batches_per_epoch // t.grad_accum, info.world_size, run_dir)
    before = held_out_custom(wrapped, cfg, custom, info) if resume_from is None else None
    if before is not None:
        (run_dir / "results_before.json").write_text(json.dumps(before, indent=1))
    trainer.logger = MetricLogger(run_dir, enabled=info.is_main, tensorboard=t.tensorboard, total_steps=total,
                                  initial_step=trainer.state.step, progress_bar=t.progress_bar)
    history = trainer.fit(data)
    trainer.logger.close()
    results = {"steps": trainer.state.step, "samples": trainer.state.samples, "skipped": trainer.state.skipped,
               "train_seconds": round(time.perf_counter() - started, 1)}
    if custom is not None and custom.val is not None:
        results["before"] = before if before is not None else previous_before(run_dir)
        results["after"] = held_out_custom(wrapped, cfg, custom, info)
    evaluate_and_report(results, wrapped, cfg, info, benchmark, eval_source, history, run_dir, started)
    barrier(info)
    if owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # after the barrier: a peer vanishing mid-teardown aborts gloo
    return results


def held_out_custom(wrapped: nn.Module, cfg: DictConfig, custom, info: DistInfo) -> dict | None:
    """task=custom: the held-out rows (data.val) evaluated with the metrics of their kind, on rank 0 (None
    elsewhere, or without data.val). The model is put back in training mode afterwards."""
    if custom is None or custom.val is None or not cfg.eval.enabled:
        return None
    result = None
    if info.is_main:
        from blip.evaluation.custom import evaluate_custom

        model = unwrap(wrapped)
        model.eval()
        generation = {k: cfg.eval[k] for k in ("num_beams", "max_new_tokens") if cfg.eval.get(k) is not None}
        prompt = cfg.model.objective.get("prompt") if custom.val.kind == "caption" else None
        result = evaluate_custom(getattr(model, "model", model), custom.val, device=info.device,
                                 batch_size=int(cfg.eval.batch_size), generation=generation, prompt=prompt,
                                 max_shown=int(cfg.eval.num_captions_shown))
        model.train()
    barrier(info)
    return result


def previous_before(run_dir: Path) -> dict | None:
    """A resumed custom run keeps the "before" its first start measured (results.json is written at the end, so a
    run interrupted before that has none: the "before" stays unknown rather than measured on trained weights)."""
    path = run_dir / "results_before.json"
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_and_report(results: dict, wrapped: nn.Module, cfg: DictConfig, info: DistInfo, benchmark, eval_source,
                        history, run_dir: Path, started: float) -> None:
    """After training: the fine-tuning benchmark or the held-out evaluation into ``results``; rank 0 writes the loss
    curve and ``results.json`` and prints the summary."""
    eval_model = unwrap(wrapped)
    held_out = eval_source is not None or benchmark is not None
    if cfg.trainer.distributed.strategy == "fsdp" and info.distributed and cfg.eval.enabled and held_out:
        eval_model = unsharded_copy(wrapped, cfg, info)  # sharded weights are only whole inside forward
    if benchmark is not None:
        results["eval"] = evaluate_after_training(eval_model, cfg, benchmark, run_dir, info, results["steps"])
    if info.is_main:
        write_loss_curve(history, run_dir)
        fine_tuning = cfg.model.task in BLIP_FINETUNE_TASKS  # evaluated on their benchmark
        if not fine_tuning and cfg.eval.enabled and eval_source is not None:
            results["eval"] = evaluate(eval_model, cfg, eval_source, info)
        results["total_seconds"] = round(time.perf_counter() - started, 1)
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        print_summary(results, run_dir)


def unsharded_copy(model: nn.Module, cfg: DictConfig, info: DistInfo) -> nn.Module | None:
    """Collective: the full weights of an FSDP-sharded model, loaded into a fresh model on rank 0 (None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    copy = build_model(cfg.model)
    copy.load_state_dict(state)
    return copy.to(info.device)


def evaluate(model: nn.Module, cfg: DictConfig, source, info: DistInfo) -> dict:
    from blip.data.transforms import image_transform
    from blip.train.heldout import retrieval_eval

    transform = image_transform(cfg.model.image_size, train=False, kind=cfg.model.transform)
    batches = eval_batches(source, transform, cfg.eval.batch_size, text_cleaner("caption", cfg.data.max_words),
                           cfg.data.get("max_image_pixels"))
    if cfg.stage.id == 2:
        from blip.train.heldout import caption_eval

        return caption_eval(model, batches, info.device, cfg)
    return retrieval_eval(model, batches, info.device)


def write_loss_curve(history: list[dict], run_dir: Path) -> None:
    """loss_curve.json (every logged step) and loss_curve.svg (total loss against step; no plotting dependency)."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    (run_dir / "loss_curve.json").write_text(json.dumps(history))
    if len(points) < 2:
        return
    w, h, pad = 640, 360, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: pad + (w - 2 * pad) * (x - x0) / max(x1 - x0, 1e-9)  # noqa: E731
    sy = lambda y: h - pad - (h - 2 * pad) * (y - y0) / max(y1 - y0, 1e-9)  # noqa: E731
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
           f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{path}"/>'
           f'<text x="{pad}" y="20">training loss (step {x0}–{x1})</text>'
           f'<text x="4" y="{sy(y1) + 4:.0f}">{y1:.2f}</text><text x="4" y="{sy(y0) + 4:.0f}">{y0:.2f}</text>'
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/></svg>')
    (run_dir / "loss_curve.svg").write_text(svg)


def print_summary(results: dict, run_dir: Path) -> None:
    ev = results.get("eval", {})
    print(f"\ntrained {results['steps']} steps on {results['samples']} samples in {results['train_seconds']} s "
          f"(skipped samples: {sum(results['skipped'].values())})")
    if "i2t_r1" in ev:
        print(f"held-out retrieval over {ev['num_images']} images / {ev['num_texts']} distinct captions: "
              f"image→text R@1 {ev['i2t_r1']:.1f}% (chance {ev['chance_i2t_r1']:.1f}%), R@5 {ev['i2t_r5']:.1f}%; "
              f"text→image R@1 {ev['t2i_r1']:.1f}% (chance {ev['chance_t2i_r1']:.1f}%)")
    if "itm_i2t_r1" in ev:
        print(f"held-out ITM head alone (every image-caption pair): image→text R@1 {ev['itm_i2t_r1']:.1f}%, "
              f"text→image R@1 {ev['itm_t2i_r1']:.1f}%; match at p > 0.5 on {ev['itm_pos_acc']:.1f}% of the true "
              f"pairs, non-match on {ev['itm_neg_acc']:.1f}% of the others")
    before, after = results.get("before"), results.get("after")
    if after:
        metrics = [k for k, v in after.items() if isinstance(v, float)]
        change = ", ".join(f"{k} {before[k]:.1f} -> {after[k]:.1f}" if before and k in before else f"{k} {after[k]:.1f}"
                           for k in metrics)
        print(f"held-out {after['kind']} rows ({after['num_items']}), before -> after fine-tuning: {change}")
        ev = after
    for sample in ev.get("samples", []):
        print(f"  {sample['reference']!r:45} → {sample['generated']!r}")
    if "acc_all_attributes" in ev:
        print("held-out caption attribute accuracy: " + ", ".join(f"{k[4:]} {v:.1f}%" for k, v in ev.items()
                                                                if k.startswith("acc_")))
    print(f"results, loss curve, metrics and checkpoints in {run_dir}")
