"""Image-text retrieval evaluation as in BLIP: ITC similarities, ITM re-ranking of the top-k, recall@K."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def recall_at_k(scores_i2t: Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                ks: Sequence[int] = (1, 5, 10), scores_t2i: Tensor | None = None) -> dict[str, float]:
    """Text retrieval (image -> text) and image retrieval (text -> image) recall in percent.

    scores_i2t: [N_img, N_txt]; scores_t2i: [N_txt, N_img] (default: the transpose; differs after ITM re-ranking);
    img2txt[i]: the caption indices of image i; txt2img[t]: the image of caption t.
    An image counts as retrieved at K when any of its captions ranks within the top K (BLIP/ALBEF protocol).
    """
    n_img, n_txt = scores_i2t.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"scores {tuple(scores_i2t.shape)} vs {len(img2txt)} images / {len(txt2img)} texts")
    order_i2t = scores_i2t.argsort(dim=1, descending=True)
    rank_of = torch.empty_like(order_i2t)
    rank_of.scatter_(1, order_i2t, torch.arange(n_txt).expand(n_img, n_txt))
    best_txt_rank = torch.stack([rank_of[i, list(img2txt[i])].min() for i in range(n_img)])
    order_t2i = (scores_i2t.t() if scores_t2i is None else scores_t2i).argsort(dim=1, descending=True)
    img_rank = (order_t2i == torch.as_tensor(list(txt2img))[:, None]).float().argmax(dim=1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (best_txt_rank < k).float().mean().item()
        out[f"img_r{k}"] = 100.0 * (img_rank < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
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
