"""VQA benchmarks (VQAv2, OK-VQA, GQA): one answer per question with the family's protocol (BLIP: ranked over the
answer list or generated; BLIP-2: generated from a prompt), scored by VQA accuracy or GQA's exact match."""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..data.eval_datasets import VQAData
from ..models.family import Family
from .common import collate_pixels, image_dataset, protocol_for
from .sharding import EvalContext, run_pass

log = logging.getLogger("blip.evaluate")


def answer_questions(model: nn.Module, family: Family, p: Mapping, pixels: torch.Tensor, questions: list[str],
                     answer_list: list[str] | None) -> list[str]:
    """One answer per (image, question) with the protocol ``p`` (BLIP: rank over ``answer_list`` or generate)."""
    if family == Family.BLIP:
        if p["method"] == "rank":
            return model.answer(pixels, questions, method="rank", answer_list=answer_list, k=p["k"])
        return model.answer(pixels, questions, method="generate", num_beams=p["num_beams"],   # lengths count [DEC]
                            max_new_tokens=p["max_length"] - 1, min_new_tokens=max(p["min_length"] - 1, 0))
    # length_penalty / min_new_tokens: null -> the model's LAVIS defaults (OPT 0 / 1, T5 -1 / 0)
    return model.answer(pixels, questions, prompt=p["prompt"], num_beams=p["num_beams"],
                        max_new_tokens=p["max_new_tokens"], min_new_tokens=p.get("min_new_tokens"),
                        length_penalty=p.get("length_penalty"), beam_length_convention="total")


def run_vqa(model: nn.Module, data: VQAData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    from ..metrics.vqa import answers_by_id, exact_match_accuracy, lemmatizer, vqa_accuracy
    family, p = protocol_for(task, model)
    items = list(zip(range(len(data.images)), data.images))
    lemmatize, why = lemmatizer(task.get("lemmatize", False)) if family != Family.BLIP else (None, None)
    if family == Family.BLIP and p["method"] == "rank" and data.answer_list is None:
        from ..data.eval_datasets import MissingDataError
        raise MissingDataError(data.answer_list_missing or f"task {task['name']} has no answer_list for ranking")

    def compute(batch):
        pixels, index = batch
        answers = answer_questions(model, family, p, pixels.to(ctx.device), [data.questions[i] for i in index],
                                   data.answer_list)
        return [{"question_id": data.question_ids[i], "answer": a} for i, a in zip(index, answers)]

    predictions = run_pass(ctx, "answer", image_dataset(model, items), collate_pixels, compute, unit="question")
    if why:
        log.warning(why)
    if lemmatize is not None:
        predictions = [{**r, "answer": lemmatize(r["answer"])} for r in predictions]
    gqa = task["format"] == "gqa"
    if gqa:  # the GQA evaluation's own result format
        predictions = [{"questionId": r["question_id"], "prediction": r["answer"]} for r in predictions]
    if data.answers is None or not ctx.is_main:
        return predictions, {}
    source = f"the {task['name']} predictions"
    if gqa:
        metrics = exact_match_accuracy(answers_by_id(predictions, source, "questionId", "prediction"), data.answers)
    else:
        metrics = vqa_accuracy(answers_by_id(predictions, source), data.answers, data.answer_types)
    if why:
        metrics["lemmatizer_skipped"] = why
    return predictions, metrics
