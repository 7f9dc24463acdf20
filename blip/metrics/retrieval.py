"""Image-text retrieval evaluation as in BLIP: ITC similarities, ITM re-ranking of the top-k, recall@K.

The benchmark pass that computes the scores from a model is :func:`blip.evaluation.retrieval.run_retrieval`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor


def recall_at_k(scores_i2t: Tensor, img2txt: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10),
                scores_t2i: Tensor | None = None) -> dict[str, float]:
    """Image->text (text retrieval) and text->image (image retrieval) recall@K in percent.

    scores_i2t: [N_img, N_txt]; scores_t2i: [N_txt, N_img] (default: the transpose; differs after ITM re-ranking).
    img2txt[i]: the texts that correctly describe image i (COCO: its 5 captions; a text may be correct for several
    images). A query counts as retrieved at K when any of its positives ranks within the top K (BLIP/ALBEF protocol).
    Returns {"i2t_r1", ..., "t2i_r1", ..., "i2t_r_mean", "t2i_r_mean", "r_mean", "chance_i2t_r1", "chance_t2i_r1"}.
    """
    n_img, n_txt = scores_i2t.shape
    if len(img2txt) != n_img:
        raise ValueError(f"scores {tuple(scores_i2t.shape)} vs positives for {len(img2txt)} images")
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(img2txt):
        positives[i, list(texts)] = True
    if not positives.any(1).all() or not positives.any(0).all():
        raise ValueError("every image and every text needs at least one positive")
    scores_t2i = scores_i2t.t() if scores_t2i is None else scores_t2i
    order_i2t = scores_i2t.float().argsort(dim=1, descending=True)
    order_t2i = scores_t2i.float().argsort(dim=1, descending=True)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * positives.gather(1, order_i2t[:, :k]).any(1).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * positives.t().gather(1, order_t2i[:, :k]).any(1).float().mean().item()
    out["i2t_r_mean"] = sum(out[f"i2t_r{k}"] for k in ks) / len(ks)
    out["t2i_r_mean"] = sum(out[f"t2i_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["i2t_r_mean"] + out["t2i_r_mean"]) / 2
    out["chance_i2t_r1"] = 100.0 * (positives.sum(1).float() / n_txt).mean().item()
    out["chance_t2i_r1"] = 100.0 * (positives.sum(0).float() / n_img).mean().item()
    return out


def rerank_with_itm(sim_i2t: Tensor, itm_score: Callable[[Tensor, Tensor], Tensor], k: int) -> tuple[Tensor, Tensor]:
    """BLIP's two-stage protocol: ITC picks the top-k, ITM re-scores them.

    sim_i2t: [N_img, N_txt] ITC similarities; ``itm_score(image_idx [n], text_idx [n]) -> [n]`` returns the ITM
    logit of the "match" class for the given pairs. Returns (scores_i2t, scores_t2i), -100 outside the top-k and
    ``itm + itc`` inside, as the original evaluation does.
    """
    n_img, n_txt = sim_i2t.shape
    i2t = torch.full_like(sim_i2t, -100.0)
    top_sim, top_txt = sim_i2t.topk(min(k, n_txt), dim=1)
    img_idx = torch.arange(n_img)[:, None].expand_as(top_txt)
    i2t.scatter_(1, top_txt, itm_score(img_idx.reshape(-1), top_txt.reshape(-1)).view_as(top_txt) + top_sim)
    t2i = torch.full_like(sim_i2t.t(), -100.0)
    top_sim, top_img = sim_i2t.t().topk(min(k, n_img), dim=1)
    txt_idx = torch.arange(n_txt)[:, None].expand_as(top_img)
    t2i.scatter_(1, top_img, itm_score(top_img.reshape(-1), txt_idx.reshape(-1)).view_as(top_img) + top_sim)
    return i2t, t2i
