"""Image-text retrieval evaluation as in BLIP: ITC similarities, ITM re-ranking of the top-k, recall@K.

:func:`run_retrieval` is the benchmark pass (sharded, resumable): ITC features of every image and text, the full
similarity matrix, ITM logits for each query's top-k, ``score = ITM + ITC`` inside the top-k (-100 outside), recall.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..data.eval_datasets import RetrievalData
from .sharding import EvalContext, ListDataset, run_pass


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


class RetrievalScorer:
    """ITC features, similarities and ITM match logits of a BLIP retrieval model or a BLIP-2 Q-Former."""

    def __init__(self, model: nn.Module, family: str, max_length: int):
        if family not in ("blip", "blip2_qformer") or not hasattr(model, "itm_head"):
            raise ValueError(f"retrieval needs a model with ITC and ITM heads (BLIP retrieval or a BLIP-2 Q-Former), "
                             f"got {type(model).__name__}")
        self.model, self.family, self.max_length = model, family, max_length

    def tokens(self, texts: list[str], itm: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] text for ITC; BLIP's ITM puts [ENC] first, BLIP-2 keeps [CLS] (LAVIS)."""
        from ..data.tokenizer import tokenize, with_first_token
        enc = tokenize(self.model.tokenizer, texts, self.max_length)
        ids = enc["input_ids"]
        if itm and self.family == "blip":
            ids = with_first_token(ids, self.model.cfg.enc_token_id)
        return ids.to(device), enc["attention_mask"].to(device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, E] (BLIP) or [B, Q, E] (BLIP-2 queries), normalized."""
        if self.family == "blip":
            return self.model.encode_image(pixels)
        return self.model.encode_image(pixels).embeds

    def text_features(self, texts: list[str], device) -> torch.Tensor:
        ids, mask = self.tokens(texts, itm=False, device=device)
        out = self.model.encode_text(ids, mask)
        return out if self.family == "blip" else out.embeds

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """[N_img, N_txt] cosine similarity (BLIP-2: max over queries, ``chunk`` images at a time: the per-query
        scores [chunk, N_txt, Q] are the largest intermediate)."""
        from ..models.blip2_qformer import query_similarity
        if self.family == "blip":
            return image_feats @ text_feats.t()
        return torch.cat([query_similarity(image_feats[i:i + chunk], text_feats)
                          for i in range(0, len(image_feats), chunk)])

    def itm_logits(self, pixels: torch.Tensor, texts: list[str], chunk: int = 128) -> torch.Tensor:
        """Match logits [n] of one image [1, 3, H, W] with each of ``texts`` (BLIP-2: averaged over queries)."""
        m = self.model
        vit = m.image_embeds(pixels) if self.family == "blip" else m.image_features(pixels)
        out = []
        for start in range(0, len(texts), chunk):
            ids, mask = self.tokens(texts[start:start + chunk], itm=True, device=pixels.device)
            embeds = vit.expand(ids.shape[0], -1, -1)
            head = m.itm_logits_from_embeds if self.family == "blip" else m.itm_logits_from_features
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
                  ) -> tuple[dict, dict, dict[str, Tensor]]:
    """Returns (predictions: each image's top-10 texts and each text's top-10 images, metrics in percent, the top-k
    scores {"i2t_index", "i2t_score" [N_img, k], "t2i_index", "t2i_score" [N_txt, k]})."""
    from .tasks import _collate_pixels, _image_dataset, protocol_for
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
