"""Benchmark task runners: captioning, VQA, retrieval and NLVR2 over a dataset, sharded and resumable.

Each runner takes a loaded model, the dataset (:mod:`blip.data.eval_datasets`), the task config (its ``protocol``
block holds one entry per model family: ``blip``, ``blip2_qformer``, ``blip2_llm``) and an
:class:`~blip.evaluation.sharding.EvalContext`, and returns ``(predictions, metrics)`` on every rank. Decoding goes
through the models' string API, so the conventions (prompts, [DEC]/[ENC], BLIP's length counting) live in one place.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from ..data.eval_datasets import CaptionData, NLVRData, RetrievalData, VQAData
from ..metrics.retrieval import recall_at_k, rerank_with_itm
from ..models.family import Family, family_of
from .sharding import EvalContext, ListDataset, run_pass

log = logging.getLogger("blip.evaluate")


# ---- models -----------------------------------------------------------------------------------------------------
def protocol_for(task: Mapping, model: nn.Module) -> tuple[Family, Mapping]:
    """(family, the task's protocol settings for that family); a clear error when the task has none."""
    family = family_of(model)
    protocols = task["protocol"]
    if family not in protocols:
        raise ValueError(f"task {task['name']} has no protocol for {family} models ({type(model).__name__}); it "
                         f"evaluates {sorted(protocols)} checkpoints")
    return family, protocols[family]


def image_preprocess(model: nn.Module):
    """The model's eval transform: bicubic resize to its own image size, CLIP normalisation (BLIP and BLIP-2 alike)."""
    from ..data.transforms import image_transform
    from ..predictor import image_size_of
    return image_transform(image_size_of(model), train=False)


def _load_pixels(transform, item, index: int) -> tuple[torch.Tensor, int]:
    """item = (anything, image path) -> ([3, S, S], index); runs in the DataLoader workers."""
    from ..data.images import load_image
    return transform(load_image(item[1])), index


def _collate_pixels(samples: list) -> tuple[torch.Tensor, list[int]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def _image_dataset(model: nn.Module, items: list) -> ListDataset:
    return ListDataset(items, partial(_load_pixels, image_preprocess(model)))


# ---- captioning -------------------------------------------------------------------------------------------------
def caption_images(model: nn.Module, family: Family, p: Mapping, pixels: torch.Tensor) -> list[str]:
    """One caption per image with the protocol ``p`` of ``family`` (BLIP lengths count the prompt tokens)."""
    if family == Family.BLIP:   # BLIP's lengths count the prompt tokens ([DEC] a picture of = 4)
        from ..data.tokenizer import caption_prompt_ids
        plen = caption_prompt_ids(model.tokenizer, p["prompt"], 1).shape[1]
        return model.caption(pixels, prompt=p["prompt"], num_beams=p["num_beams"],
                             max_new_tokens=p["max_length"] - plen, min_new_tokens=max(p["min_length"] - plen, 0))
    if family == Family.BLIP2_QFORMER:   # LAVIS's lengths count [DEC]
        return model.caption(pixels, num_beams=p["num_beams"], max_new_tokens=p["max_length"] - 1,
                             min_new_tokens=max(p["min_length"] - 1, 0))
    # LAVIS's min_length counts new tokens for decoder-only LLMs and the decoder start token for T5
    min_new = p["min_length"] - 1 if model.is_seq2seq else p["min_length"]
    return model.caption(pixels, prompt=p["prompt"], num_beams=p["num_beams"], max_new_tokens=p["max_new_tokens"],
                         min_new_tokens=max(min_new, 0), beam_length_convention="total")


def run_captioning(model: nn.Module, data: CaptionData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    from ..metrics.captioning import caption_metrics, nocaps_metrics, require_java, spice_status
    family, p = protocol_for(task, model)
    items = list(zip(data.image_ids, data.images))
    if data.references is not None:  # before any decoding: what scoring will need
        require_java()
        spice, why = spice_status(task.get("spice", "auto"))

    def compute(batch):
        pixels, index = batch
        captions = caption_images(model, family, p, pixels.to(ctx.device))
        return [{"image_id": data.image_ids[i], "caption": c} for i, c in zip(index, captions)]

    predictions = run_pass(ctx, "caption", _image_dataset(model, items), _collate_pixels, compute)
    if data.references is None or not ctx.is_main:
        return predictions, {}
    if why:
        log.warning(why)
    by_id = {r["image_id"]: r["caption"] for r in predictions}
    if data.domains is not None:
        metrics = nocaps_metrics(by_id, data.references, data.domains, spice=spice)
    else:
        metrics = caption_metrics(by_id, data.references, spice=spice)
    if why:
        metrics["SPICE_skipped"] = why
    return predictions, metrics


# ---- VQA --------------------------------------------------------------------------------------------------------
def answer_questions(model: nn.Module, family: Family, p: Mapping, pixels: torch.Tensor, questions: list[str],
                     answer_list: list[str] | None) -> list[str]:
    """One answer per (image, question) with the protocol ``p`` (BLIP: rank over ``answer_list`` or generate)."""
    if family == Family.BLIP:
        if p["method"] == "rank":
            return model.answer(pixels, questions, method="rank", answer_list=answer_list, k=p["k"])
        return model.answer(pixels, questions, method="generate", num_beams=p["num_beams"],   # lengths count [DEC]
                            max_new_tokens=p["max_length"] - 1, min_new_tokens=max(p["min_length"] - 1, 0))
    return model.answer(pixels, questions, prompt=p["prompt"], num_beams=p["num_beams"],
                        max_new_tokens=p["max_new_tokens"], beam_length_convention="total")


def run_vqa(model: nn.Module, data: VQAData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    from ..metrics.vqa import exact_match_accuracy, lemmatizer, vqa_accuracy
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

    predictions = run_pass(ctx, "answer", _image_dataset(model, items), _collate_pixels, compute, unit="question")
    if why:
        log.warning(why)
    if lemmatize is not None:
        predictions = [{**r, "answer": lemmatize(r["answer"])} for r in predictions]
    gqa = task["format"] == "gqa"
    if gqa:  # the GQA evaluation's own result format
        predictions = [{"questionId": r["question_id"], "prediction": r["answer"]} for r in predictions]
    if data.answers is None or not ctx.is_main:
        return predictions, {}
    if gqa:
        metrics = exact_match_accuracy({r["questionId"]: r["prediction"] for r in predictions}, data.answers)
    else:
        metrics = vqa_accuracy({r["question_id"]: r["answer"] for r in predictions}, data.answers, data.answer_types)
    if why:
        metrics["lemmatizer_skipped"] = why
    return predictions, metrics



# ---- NLVR2 ------------------------------------------------------------------------------------------------------
def _load_pair(transform, item, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """item = (left path, right path) -> ([3, S, S], [3, S, S], index)."""
    from ..data.images import load_image
    return transform(load_image(item[0])), transform(load_image(item[1])), index


def _collate_pairs(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), [s[2] for s in samples]


def run_nlvr(model: nn.Module, data: NLVRData, task: Mapping, ctx: EvalContext) -> tuple[list, dict]:
    """BLIP's NLVR2 evaluation (train_nlvr.py): argmax of the two-image classifier per sentence; accuracy in
    percent. predictions: [{"identifier", "prediction": "True" | "False"}] (the NLVR2 evaluation's fields)."""
    if not hasattr(model, "predict") or family_of(model) != Family.BLIP:
        raise ValueError(f"nlvr2 needs a BLIP NLVR2 model (task=nlvr), got {type(model).__name__}")
    dataset = ListDataset(data.images, partial(_load_pair, image_preprocess(model)))

    def compute(batch):
        left, right, index = batch
        verdicts = model.predict(left.to(ctx.device), right.to(ctx.device), [data.sentences[i] for i in index])
        return [{"identifier": data.identifiers[i], "prediction": str(bool(v))} for i, v in zip(index, verdicts)]

    predictions = run_pass(ctx, "nlvr", dataset, _collate_pairs, compute, unit="pair")
    if any(label is None for label in data.labels) or not ctx.is_main:
        return predictions, {}
    hits = [p["prediction"] == str(label) for p, label in zip(predictions, data.labels)]
    return predictions, {"accuracy": 100.0 * sum(hits) / len(hits)}


# ---- retrieval --------------------------------------------------------------------------------------------------
class RetrievalScorer:
    """ITC features, similarities and ITM match logits of a BLIP retrieval model or a BLIP-2 Q-Former."""

    def __init__(self, model: nn.Module, family: Family, max_length: int):
        if family not in (Family.BLIP, Family.BLIP2_QFORMER) or not hasattr(model, "itm_head"):
            raise ValueError(f"retrieval needs a model with ITC and ITM heads (BLIP retrieval or a BLIP-2 Q-Former), "
                             f"got {type(model).__name__}")
        self.model, self.family, self.max_length = model, family, max_length

    def tokens(self, texts: list[str], itm: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] text for ITC; BLIP's ITM puts [ENC] first, BLIP-2 keeps [CLS] (LAVIS)."""
        from ..data.tokenizer import tokenize, with_first_token
        enc = tokenize(self.model.tokenizer, texts, self.max_length)
        ids = enc["input_ids"]
        if itm and self.family == Family.BLIP:
            ids = with_first_token(ids, self.model.cfg.enc_token_id)
        return ids.to(device), enc["attention_mask"].to(device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, E] (BLIP) or [B, Q, E] (BLIP-2 queries), normalized."""
        if self.family == Family.BLIP:
            return self.model.encode_image(pixels)
        return self.model.encode_image(pixels).embeds

    def text_features(self, texts: list[str], device) -> torch.Tensor:
        ids, mask = self.tokens(texts, itm=False, device=device)
        out = self.model.encode_text(ids, mask)
        return out if self.family == Family.BLIP else out.embeds

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """[N_img, N_txt] cosine similarity (BLIP-2: max over queries, ``chunk`` images at a time: the per-query
        scores [chunk, N_txt, Q] are the largest intermediate)."""
        from ..models.blip2_qformer import query_similarity
        if self.family == Family.BLIP:
            return image_feats @ text_feats.t()
        return torch.cat([query_similarity(image_feats[i:i + chunk], text_feats)
                          for i in range(0, len(image_feats), chunk)])

    def itm_logits(self, pixels: torch.Tensor, texts: list[str], chunk: int = 128) -> torch.Tensor:
        """Match logits [n] of one image [1, 3, H, W] with each of ``texts`` (BLIP-2: averaged over queries)."""
        m = self.model
        vit = m.image_embeds(pixels) if self.family == Family.BLIP else m.image_features(pixels)
        out = []
        for start in range(0, len(texts), chunk):
            ids, mask = self.tokens(texts[start:start + chunk], itm=True, device=pixels.device)
            embeds = vit.expand(ids.shape[0], -1, -1)
            head = m.itm_logits_from_embeds if self.family == Family.BLIP else m.itm_logits_from_features
            out.append(head(embeds, ids, mask)[:, 1].float())
        return torch.cat(out) if out else torch.empty(0, device=pixels.device)


def _text_item(text: str, index: int) -> tuple[str, int]:
    return text, index


def _collate_texts(samples: list) -> tuple[list[str], list[int]]:
    return [s[0] for s in samples], [s[1] for s in samples]


def itm_pairs(sim: torch.Tensor, k: int) -> list[list[int]]:
    """For each image, the texts whose ITM score the re-ranking needs: its own top-k texts and every text that has
    the image in its top-k (each pair is scored once and used in both directions)."""
    n_img, n_txt = sim.shape
    needed = [set(row) for row in sim.topk(min(k, n_txt), dim=1).indices.tolist()]
    for j, images in enumerate(sim.t().topk(min(k, n_img), dim=1).indices.tolist()):
        for i in images:
            needed[i].add(j)
    return [sorted(s) for s in needed]


def run_retrieval(model: nn.Module, data: RetrievalData, task: Mapping, ctx: EvalContext
                  ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Returns (predictions: each image's top-10 texts and each text's top-10 images, metrics in percent, the top-k
    scores {"i2t_index", "i2t_score" [N_img, k], "t2i_index", "t2i_score" [N_txt, k]})."""
    family, p = protocol_for(task, model)
    scorer = RetrievalScorer(model, family, p["max_length"])
    images = _image_dataset(model, list(enumerate(data.images)))
    image_feats = run_pass(ctx, "image_features", images, _collate_pixels,
                           lambda b: scorer.image_features(b[0].to(ctx.device)), tensors=True)
    texts = ListDataset(data.texts, _text_item)
    text_feats = run_pass(ctx, "text_features", texts, _collate_texts,
                          lambda b: scorer.text_features(b[0], ctx.device), unit="text", tensors=True)
    sim = scorer.similarity(image_feats, text_feats)
    k = p["k"]
    if task.get("itm", True):
        needed = itm_pairs(sim, k)

        def compute(batch):
            pixels, index = batch
            return [scorer.itm_logits(pixels[b:b + 1].to(ctx.device), [data.texts[j] for j in needed[i]]).tolist()
                    for b, i in enumerate(index)]

        scores = run_pass(ctx, "itm", images, _collate_pixels, compute)
        itm = torch.full_like(sim, float("nan"))
        for i, (texts_i, scores_i) in enumerate(zip(needed, scores)):
            itm[i, texts_i] = torch.tensor(scores_i, dtype=itm.dtype)
        i2t, t2i = rerank_with_itm(sim, lambda i, t: itm[i, t], k)
    else:
        i2t, t2i = sim, sim.t()
    r = recall_at_k(i2t, data.img2txt, scores_t2i=t2i)
    metrics = {f"txt_r{n}": r[f"i2t_r{n}"] for n in (1, 5, 10)} | {"txt_r_mean": r["i2t_r_mean"]}
    metrics |= {f"img_r{n}": r[f"t2i_r{n}"] for n in (1, 5, 10)}
    metrics |= {"img_r_mean": r["t2i_r_mean"], "r_mean": r["r_mean"]}
    top_i2t, top_t2i = i2t.topk(min(k, i2t.shape[1]), dim=1), t2i.topk(min(k, t2i.shape[1]), dim=1)
    predictions = {"i2t": top_i2t.indices[:, :10].tolist(), "t2i": top_t2i.indices[:, :10].tolist()}
    scores = {"i2t_index": top_i2t.indices, "i2t_score": top_i2t.values,
              "t2i_index": top_t2i.indices, "t2i_score": top_t2i.values}
    return predictions, metrics, scores
