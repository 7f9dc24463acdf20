"""The stage-2 embedded default (synthetic shapes, offline): a language-model warm-up that stands in for a pretrained
LLM.

BLIP-2 stage 2 teaches the Q-Former to speak to a frozen *pretrained* LLM. Offline there is none, and a random tiny
LLM cannot caption, so the default first gives the tiny LLM a short language-model warm-up on the training captions
(text only, no images), logs it as a stand-in, then freezes it again for stage 2 proper.

What a pretrained LLM brings to BLIP-2 is the skill of using its context; a tiny LM trained on captions alone learns to
ignore any prefix. So each warm-up caption is preceded by a context of as many tokens as there are queries: the
caption's content words, shuffled (padded with the pad token). The LLM learns to describe a shape from an unordered
bag of words, and stage 2 must teach the Q-Former to produce such a context from pixels.
"""

from __future__ import annotations

import itertools
import logging

import torch
from omegaconf import DictConfig
from torch import nn

from blip.data.skips import SkipCounter
from blip.train.distributed import DistInfo

log = logging.getLogger("blip.train")


def training_captions(sources: list, limit: int = 20000) -> list[str]:
    """Captions of the first `limit` training samples (text only: images are not decoded)."""
    skips = SkipCounter()
    texts = (raw["text"] for source in sources for unit in range(source.num_units)
             for raw in source.iter_unit(unit, skips) if isinstance(raw["text"], str) and raw["text"])
    return list(itertools.islice(texts, limit))


def warm_up_llm(objective: nn.Module, sources: list, trainer_cfg: DictConfig, info: DistInfo,
                batch_size: int = 64) -> list[float]:
    """LM-train `objective.model.llm` on the training captions for `llm_warmup_steps`, then freeze it again.

    Every rank runs the same seeded warm-up, so the LLM stays identical across ranks. Returns the losses."""
    llm, tokenizer = objective.model.llm, objective.tokenizer
    eos = objective.eos_text() if hasattr(objective, "eos_text") else tokenizer.eos_token
    captions = training_captions(sources)
    steps, lr = int(trainer_cfg.llm_warmup_steps), float(trainer_cfg.llm_warmup_lr)
    log.info("stage-2 default: no pretrained LLM offline, so the tiny LLM is warmed up as a language model on %d "
             "training captions for %d steps (a stand-in for a pretrained LLM; images are not used)",
             len(captions), steps)
    prefix_len = int(getattr(getattr(objective.model, "qformer", None), "num_queries", 0))
    llm.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(captions), (batch_size,), generator=generator).tolist()
        tok = tokenizer([captions[i] + eos for i in idx], padding="longest", return_tensors="pt")
        labels = tok.input_ids.masked_fill(tok.attention_mask == 0, -100)
        ids, mask = tok.input_ids, tok.attention_mask
        if prefix_len:
            context = torch.stack([bag_of_words(captions[i], tokenizer, prefix_len, generator) for i in idx])
            ids = torch.cat([context, ids], 1)
            mask = torch.cat([torch.ones_like(context), mask], 1)
            labels = torch.cat([torch.full_like(context, -100), labels], 1)
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:  # linear decay to 0
            group["lr"] = lr * (1 - (step + 1) / steps)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("LLM warm-up step %d/%d: loss %.3f", step + 1, steps, sum(losses[-20:]) / len(losses[-20:]))
    llm.eval().requires_grad_(False)
    return losses


STOP_WORDS = {"a", "an", "in", "the", "of", "on"}


def bag_of_words(caption: str, tokenizer, length: int, generator: torch.Generator) -> torch.Tensor:
    """The caption's content words in random order as `length` token ids (cut or padded with the pad token)."""
    words = [w for w in caption.split() if w not in STOP_WORDS]
    words = [words[i] for i in torch.randperm(len(words), generator=generator).tolist()]
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids[:length]
    return torch.tensor(ids + [tokenizer.pad_token_id] * (length - len(ids)), dtype=torch.long)
