"""Held-out evaluation at the end of a run: retrieval recall@K and caption attribute accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ..metrics.retrieval import recall_at_k


@torch.no_grad()
def retrieval_eval(model: nn.Module, batches: Iterable[dict], device: torch.device, max_length: int = 35,
                   max_itm_pairs: int = 100_000) -> dict:
    """Image→text and text→image recall over held-out pairs; texts with identical captions count as equivalent.

    Uses the models' tensor API: `encode_image(pixel_values) -> [B, D]`, `encode_text(input_ids, attention_mask)
    -> [B, D]` (normalized) and `model.tokenizer`; a model whose image embedding is not one vector (BLIP-2: [B, Q, D])
    supplies `retrieval_similarity(image_feats, text_feats) -> [N_img, N_txt]`. A model with `itm_image_features
    (pixel_values)` and `itm_match_prob(image_features, input_ids, attention_mask) -> [B]` also gets its ITM head
    scored on every (image, caption) pair, when there are at most ``max_itm_pairs``: :func:`itm_metrics` (``itm_*``
    keys)."""
    model.eval()
    itm = hasattr(model, "itm_match_prob")
    image_feats, itm_feats, texts = [], [], []
    for batch in batches:
        pixels = batch["pixel_values"].to(device)
        image_feats.append(model.encode_image(pixels).float().cpu())
        if itm:
            itm_feats.append(model.itm_image_features(pixels).cpu())
        texts += batch["text"]
    unique = sorted(set(texts))
    text_feats, tokens = [], []
    for start in range(0, len(unique), 256):
        tok = model.tokenizer(unique[start:start + 256], padding="longest", truncation=True,
                              max_length=max_length, return_tensors="pt")
        tokens.append((tok["input_ids"].to(device), tok["attention_mask"].to(device)))
        text_feats.append(model.encode_text(*tokens[-1]).float().cpu())
    image_feats, text_feats = torch.cat(image_feats), torch.cat(text_feats)
    similarity = getattr(model, "retrieval_similarity", None)  # BLIP-2: [N, Q, D] query embeddings, max over Q
    sim = similarity(image_feats, text_feats) if similarity is not None else image_feats @ text_feats.t()
    index = {t: j for j, t in enumerate(unique)}
    positives = [[index[t]] for t in texts]
    result = recall_at_k(sim, positives)
    if itm and len(texts) * len(unique) <= max_itm_pairs:
        rows = []
        for feats in torch.cat(itm_feats).split(1):   # one image against every caption
            feats = feats.to(device)
            rows.append(torch.cat([model.itm_match_prob(feats.expand(len(ids), -1, -1), ids, mask).float().cpu()
                                   for ids, mask in tokens]))
        result.update(itm_metrics(torch.stack(rows), positives))
    result.update(num_images=len(texts), num_texts=len(unique))
    return result


def itm_metrics(match_prob: Tensor, img2txt: Sequence[Sequence[int]]) -> dict[str, float]:
    """The ITM head alone, from its match probability of every pair [N_img, N_txt] (img2txt[i]: image i's texts):
    image→text and text→image R@1 ranked by it, and its accuracy (%) at 0.5 on the positive and on the negative
    pairs (a head stuck at its prior, 1/3 match with 2 negatives per positive, scores 0 and 100)."""
    ranked = recall_at_k(match_prob, img2txt, ks=(1,))
    positive = torch.zeros_like(match_prob, dtype=torch.bool)
    for i, texts in enumerate(img2txt):
        positive[i, list(texts)] = True
    said_match = match_prob > 0.5
    return {"itm_i2t_r1": ranked["i2t_r1"], "itm_t2i_r1": ranked["t2i_r1"],
            "itm_pos_acc": 100.0 * said_match[positive].float().mean().item(),
            "itm_neg_acc": 100.0 * (~said_match[~positive]).float().mean().item()}


def attribute_accuracy(generated: Sequence[str], references: Sequence[str], parse) -> dict:
    """Per-attribute accuracy (%) of generated captions against reference captions, both read by `parse`."""
    totals: dict[str, float] = {}
    exact = 0
    for gen, ref in zip(generated, references):
        g, r = parse(gen), parse(ref)
        ok_all = True
        for name, value in r.items():
            ok = g.get(name) == value
            totals[name] = totals.get(name, 0) + ok
            ok_all &= ok
        exact += ok_all
    n = max(1, len(references))
    out = {f"acc_{k}": 100 * v / n for k, v in totals.items()}
    out["acc_all_attributes"] = 100 * exact / n
    return out


@torch.no_grad()
def caption_eval(objective: nn.Module, batches: Iterable[dict], device: torch.device, cfg: DictConfig) -> dict:
    """Stage-2 embedded default: generate captions for held-out images; accuracy of the attributes they name
    (synthetic data)."""
    from blip.data.synthetic import parse_attributes

    model = objective.model if hasattr(objective, "model") else objective
    model.eval()
    tokenizer = objective.tokenizer
    generated, references = [], []
    for batch in batches:
        out = model.generate(batch["pixel_values"].to(device), max_new_tokens=int(cfg.eval.max_new_tokens),
                             min_new_tokens=int(cfg.eval.min_new_tokens), num_beams=int(cfg.eval.num_beams))
        # no prompt: the output is the caption (the OPT convention ends it with "\n")
        generated += [t.split("\n")[0].strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        references += batch["text"]
    result = attribute_accuracy(generated, references, parse_attributes)
    result["num_images"] = len(references)
    result["samples"] = [{"reference": r, "generated": g}
                         for r, g in zip(references[:cfg.eval.num_captions_shown], generated)]
    return result
