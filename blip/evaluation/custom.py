"""Held-out metrics of a custom split (:func:`blip.data.custom.read_custom`) through the models' string API.

Every family works: BLIP caption / VQA models (``caption``, ``answer``), BLIP-2 Q-Former (``caption``), BLIP-2 and
InstructBLIP with an LLM (``caption``, ``answer``, ``complete``). Metrics, all in percent / ×100 (as papers print
them):

- caption: BLEU-4 and CIDEr of pycocoevalcap (PTB tokenizer; Java) ×100, one caption per image scored against
  every reference of that image (rows naming the same image are grouped);
- vqa: the official VQA accuracy (:func:`blip.metrics.vqa.answer_accuracy`: min(#matching humans / 3, 1) over the
  leave-one-out subsets, the official answer normalisation, applied to the references too since a user's answers
  are not pre-normalised as VQAv2's are); a question with a single answer counts as if every annotator gave it
  (correct = 100, else 0);
- instruction: exact match after whitespace / case normalisation, and BLEU-4 (as for captions) ×100.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..data.custom import CustomData, CustomDataError, custom_text_cleaner, input_text, iter_row_images
from ..data.datasets import batched
from ..models.family import Family, family_of

# InstructBLIP's generation defaults (LAVIS ``generate``: 5 beams, up to 256 tokens, at least 1)
INSTRUCTION_DEFAULTS = {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1}


def evaluate_custom(model: nn.Module, data: CustomData, *, device="cpu", batch_size: int = 16,
                    generation: dict | None = None, prompt: str | None = None, max_shown: int = 8) -> dict:
    """Generate for every item of ``data`` and score it: ``{"kind", "num_items", <metrics>, "samples": [{"image",
    "input", "reference", "generated"}, ... max_shown]}`` (metrics in the module docstring: ``bleu4`` / ``cider``;
    ``vqa_accuracy``; ``exact_match`` / ``bleu4``).

    generation: keywords of the string API (num_beams, max_new_tokens, ...; None values: its default).
    prompt: the caption prompt (BLIP "a picture of ", BLIP-2 "a photo of"; None: the model's default) or, for vqa
    with BLIP-2, the question template ("Question: {} Short answer:" when None)."""
    predictions = predict_custom(model, data, device=device, batch_size=batch_size, generation=generation,
                                 prompt=prompt)
    return report(data.kind, predictions, max_shown)


def predict_custom(model: nn.Module, data: CustomData, *, device="cpu", batch_size: int = 16,
                   generation: dict | None = None, prompt: str | None = None) -> list[dict]:
    """One prediction per item ``{"image", "where", "input", "references", "generated"}``: per image for captions
    (its references: the captions of every row naming it), per row otherwise (input: the question / instruction)."""
    if not data.rows:
        raise CustomDataError(f"{data.path}: no rows to evaluate; give a split with at least one row")
    if data.kind in ("caption", "instruction"):
        from ..metrics.captioning import require_java
        require_java()   # before any decoding: what scoring will need
    model = model.to(device).eval()
    family = family_of(model)
    clean = custom_text_cleaner(data.kind, None) if data.kind == "instruction" else None
    out = []
    for items in batched(_items(data), batch_size):
        images = [image for image, _ in items]
        inputs = [clean(p["input"]) if clean else p["input"] for _, p in items]
        settings = {k: v for k, v in (generation or {}).items() if v is not None}   # None: the API's default
        generated = _generate(model, family, data.kind, images, inputs, settings, prompt)
        out += [{**p, "generated": g} for (_, p), g in zip(items, generated)]
    return out


def _items(data: CustomData) -> Iterator[tuple[object, dict]]:
    """(PIL image, prediction fields) per item; caption rows naming the same image are one item."""
    from ..data.images import load_image
    references: dict[str, list[str]] = {}
    if data.kind == "caption":
        for row in data.rows:
            references.setdefault(row.image, []).extend(row.captions)
    for row, source in iter_row_images(data):
        if data.kind == "caption":
            if row.image not in references:
                continue
            refs = references.pop(row.image)   # the image's first row stands for all of them
        else:
            refs = list(row.answers) if row.kind == "vqa" else [row.response]
        try:
            image = load_image(source)
        except ValueError as e:   # ImageDecodeError
            raise CustomDataError(f"{row.where}: {e}; fix or remove the row") from e
        yield image, {"image": row.image, "where": row.where, "input": input_text(row), "references": refs}


def _generate(model: nn.Module, family: Family, kind: str, images: list, inputs: list, generation: dict,
              prompt: str | None) -> list[str]:
    what = f"a {type(model).__name__} ({family})"
    if kind == "caption":
        if not hasattr(model, "caption"):
            raise ValueError(f"{what} does not caption: evaluate a caption split with a caption model (BLIP: "
                             "model.task=caption; BLIP-2 / InstructBLIP)")
        if prompt is not None:
            if family == Family.BLIP2_QFORMER:
                raise ValueError("a BLIP-2 Q-Former captions without a prompt: leave prompt unset")
            generation["prompt"] = prompt
        return model.caption(images, **generation)
    if kind == "vqa" or (kind == "instruction" and family == Family.BLIP):
        if not hasattr(model, "answer"):
            raise ValueError(f"{what} does not answer questions: evaluate a {kind} split with a VQA model (BLIP: "
                             "model.task=vqa; BLIP-2 / InstructBLIP with an LLM)")
        if prompt is not None and family == Family.BLIP2_LLM:
            generation["prompt"] = prompt
        return model.answer(images, inputs, **generation)
    if family != Family.BLIP2_LLM:
        raise ValueError(f"{what} cannot follow instructions: evaluate an instruction split with BLIP-2 / "
                         "InstructBLIP (an LLM) or a BLIP VQA model")
    return model.complete(images, inputs, **{**INSTRUCTION_DEFAULTS, **generation})


def run_custom(model: nn.Module, data: CustomData, task: Mapping, output_dir: str | Path, *, device="cpu",
               batch_size: int = 16, autocast_dtype: torch.dtype | None = None,
               label: Mapping | None = None) -> dict:
    """``scripts/evaluate.py task=custom``: evaluate ``data`` with the task's ``generation`` / ``prompt`` /
    ``max_shown``, write ``predictions.json`` (every item) and ``metrics.json`` into ``output_dir``, print one
    summary line. Returns the metrics."""
    from .sharding import write_json_atomic
    started = time.perf_counter()
    generation = dict(task.get("generation") or {})
    autocast = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        predictions = predict_custom(model, data, device=device, batch_size=batch_size, generation=generation,
                                     prompt=task.get("prompt"))
    metrics = {**report(data.kind, predictions, int(task.get("max_shown", 8))), "data": str(data.path),
               "skipped_rows": data.skipped, **dict(label or {})}
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "predictions.json", predictions)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(summary_line(metrics, time.perf_counter() - started, str(output_dir)), flush=True)
    return metrics


def report(kind: str, predictions: list[dict], max_shown: int) -> dict:
    """{"kind", "num_items", <metrics>, "samples": the first ``max_shown`` items, references joined by " | "}."""
    samples = [{"image": p["image"], "input": p["input"], "reference": " | ".join(p["references"]),
                "generated": p["generated"]} for p in predictions[:max_shown]]
    return {"kind": kind, "num_items": len(predictions), **score_custom(kind, predictions), "samples": samples}


# ---- metrics --------------------------------------------------------------------------------------------------------
def score_custom(kind: str, predictions: list[dict]) -> dict:
    """The metrics of :func:`predict_custom`'s predictions of a ``kind`` split (see the module docstring)."""
    if kind == "vqa":
        return {"vqa_accuracy": vqa_accuracy_percent([(p["generated"], p["references"]) for p in predictions])}
    from ..metrics.captioning import caption_metrics
    generated = {i: p["generated"] for i, p in enumerate(predictions)}
    references = {i: p["references"] for i, p in enumerate(predictions)}
    if kind == "caption":
        scores = caption_metrics(generated, references, only=("Bleu_4", "CIDEr"))
        return {"bleu4": 100 * scores["Bleu_4"], "cider": 100 * scores["CIDEr"]}
    if kind == "instruction":
        scores = caption_metrics(generated, references, only=("Bleu_4",))
        return {"exact_match": exact_match_percent([(p["generated"], p["references"][0]) for p in predictions]),
                "bleu4": 100 * scores["Bleu_4"]}
    raise ValueError(f"unknown kind {kind!r}")


def vqa_accuracy_percent(pairs: list[tuple[str, list[str]]]) -> float:
    """Mean official VQA accuracy (percent) of (prediction, its reference answers) pairs; the references are
    normalised as the predictions are, and a single reference counts as every annotator's answer."""
    from ..metrics.vqa import answer_accuracy, normalize_answer
    accs = []
    for prediction, answers in pairs:
        answers = [normalize_answer(a) for a in answers]
        accs.append(float(normalize_answer(prediction) == answers[0]) if len(answers) == 1
                    else answer_accuracy(prediction, answers))
    return 100.0 * sum(accs) / len(accs)


def exact_match_percent(pairs: list[tuple[str, str]]) -> float:
    """Percent of (generated, reference) pairs equal after lower-casing and collapsing whitespace."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())
    return 100.0 * sum(norm(g) == norm(r) for g, r in pairs) / len(pairs)


def summary_line(metrics: Mapping, seconds: float, where: str) -> str:
    """One line: the split's metrics and size."""
    names = ("bleu4", "cider", "vqa_accuracy", "exact_match")
    shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in names if k in metrics)
    return f"custom {metrics['kind']}: {shown} ({metrics['num_items']} items, {seconds:.0f} s) -> {where}"
