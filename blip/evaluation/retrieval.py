"""Image-text retrieval benchmarks (COCO, Flickr30k): ITC similarities of every image with every text, the top-k
re-ranked by ITM (BLIP retrieval models and BLIP-2 Q-Formers), scored by recall@k in both directions."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..data.eval_datasets import RetrievalData
from ..metrics.retrieval import recall_at_k, rerank_with_itm
from ..models.family import Family
from .common import collate_pixels, image_dataset, protocol_for
from .sharding import EvalContext, ListDataset, run_pass


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
    images = image_dataset(model, list(enumerate(data.images)))
    image_feats = run_pass(ctx, "image_features", images, collate_pixels,
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

        scores = run_pass(ctx, "itm", images, collate_pixels, compute)
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
