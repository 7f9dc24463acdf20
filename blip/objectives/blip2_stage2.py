"""BLIP-2 stage-2 objective (generative learning with a frozen LLM): LM loss through the Q-Former queries.

- decoder-only LLMs (OPT, Llama, ...), as LAVIS Blip2OPT: the caption gets the eos text appended ("\\n" for OPT, the
  tokenizer's eos otherwise), is tokenized with the LLM's bos and right padding, and the loss covers only caption
  tokens: queries (not in the logits), prompt tokens (``prompt_length`` counts the bos, as LAVIS) and padding are
  excluded. The bos itself is not a target by default; LAVIS, with an empty prompt (its stage-2 pretraining), also
  scores the last query predicting the bos ``</s>``: ``bos_target=True`` restores that term.
- encoder-decoder LLMs (FlanT5): the paper's **prefix LM**: each caption's tokens are split at a point drawn uniformly
  from 1 .. max(1, n // 2); the prefix (+ ``</s>``) goes to the encoder after the queries, the rest (+ ``</s>``) is the
  decoder target (:mod:`blip.objectives.prefix_lm`). LAVIS never implemented the split; with
  ``text_input``/``text_output`` in the batch the LAVIS behaviour (encoder reads text_input, decoder predicts
  text_output) is used instead.
- instruction tuning / VQA (``text_input`` + ``text_output``; InstructBLIP always): decoder-only LLMs read bos +
  text_input + text_output + eos text with the loss on the output part only (LAVIS ``concat_text_input_output``);
  InstructBLIP's Q-Former also reads text_input (BERT ids). Inputs and outputs are truncated to ``max_txt_len`` and
  ``max_output_len`` tokens (LAVIS InstructBLIP: 128 and 256).
- VQA fine-tuning (batches with "answers", the question in "text"): each question, formatted by ``question_prompt``
  (default: the model's, else LAVIS's "Question: {} Short answer:"; ``task=blip2_vqa``: the paper's "Question: {}
  Answer:"), is paired with each of its answers as above; BLIP's VQA loss over the LLM:
  ``loss = sum_q sum_k w_qk * NLL(answer_qk) / B`` with the NLL summed over the answer's tokens (eos included) and
  the weights of "weights" (else BLIP's VQAv2 rule, :func:`blip.data.text.answer_weights`). A question-aware
  (InstructBLIP-structured) model's Q-Former reads the formatted question; the image and Q-Former run once per
  question.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import answer_weights
from ..losses import lm_loss
from ..models.frozen_llm import align_padding
from ..models.structure import DeclaredLayers
from .prefix_lm import pad_rows, prefix_lm_batch, split_point, text_pair_batch


class Blip2Stage2Objective(DeclaredLayers, nn.Module):
    """forward(batch) -> {"loss", "loss_lm"}. batch: "pixel_values" [B, 3, H, W], "text" list[str] (captions), or
    "text_input"/"text_output" (LAVIS FlanT5 mode, VQA / instruction tuning, InstructBLIP). Gradients reach
    ln_vision, the Q-Former and ``llm_proj`` only."""

    vit_path = "model.image_encoder.visual_encoder"
    checkpointed = ("model",)   # the model's own hook: its ViT and Q-Former stacks and its LLM

    def __init__(self, model: nn.Module, prompt: str = "", max_txt_len: int = 32,
                 generator: torch.Generator | None = None, bos_target: bool = False,
                 question_prompt: str | None = None, max_output_len: int | None = None):
        super().__init__()
        self.model = model
        self.prompt = prompt
        self.max_txt_len = max_txt_len
        self.max_output_len = max_output_len or max_txt_len   # text_output tokens (LAVIS max_output_txt_len)
        self.generator = generator
        self.bos_target = bos_target   # LAVIS: without a prompt, the last query position predicts the bos
        model.config.prompt = prompt   # the model captions with the prompt it is trained with (its run records it)
        if question_prompt is not None:   # a VQA run: answer() and its evaluation use the template it trained with
            model.config.question_prompt = question_prompt

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def no_weight_decay(self) -> set[str]:
        return {"model.qformer.query_tokens"}

    # ---- decoder-only -----------------------------------------------------------------------------------------
    def eos_text(self) -> str:
        eos = self.model.config.eos
        return eos if isinstance(eos, str) else self.tokenizer.eos_token

    def prompt_length(self) -> int:
        """Tokens of the prompt including the bos (LAVIS ``prompt_length``); 0 without a prompt."""
        if not self.prompt:
            return 0
        return len(self.tokenizer(self.prompt.rstrip()).input_ids)

    def causal_batch(self, texts: list[str]) -> dict[str, Tensor]:
        """Captions -> input_ids, attention_mask [B, T] (bos + prompt + caption + eos text, right padded) and
        labels [B, T] (-100 on padding and on the prompt incl. bos; with ``bos_target`` and no prompt the bos keeps
        its id, as LAVIS's targets)."""
        full = [self.prompt + t + self.eos_text() for t in texts]
        tok = self.tokenizer(full, padding="longest", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        # right padding whatever the tokenizer's padding_side, so the prompt occupies the first positions
        ids, mask = align_padding(tok.input_ids, tok.attention_mask, self.model.pad_token_id, "right")
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :max(self.prompt_length(), 0 if self.bos_target else 1)] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def causal_pair_batch(self, inputs: list[str], outputs: list[str]) -> dict[str, Tensor]:
        """Instruction tuning / VQA (LAVIS ``concat_text_input_output``): bos + text_input, then text_output + eos
        text; the loss covers only the output part. Right padded."""
        tok, eos = self.tokenizer, self.eos_text()
        rows, starts = [], []
        for inp, out in zip(inputs, outputs):
            head = tok(inp, truncation=True, max_length=self.max_txt_len).input_ids
            tail = tok(out + eos, add_special_tokens=False, truncation=True, max_length=self.max_output_len).input_ids
            rows.append(head + tail)
            starts.append(len(head))
        ids, mask = pad_rows(rows, self.model.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for i, start in enumerate(starts):
            labels[i, :start] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def qformer_batch(self, instructions: list[str]) -> dict[str, Tensor]:
        """InstructBLIP: the instruction as Q-Former BERT ids ([CLS] ... [SEP], truncated on the left as LAVIS)."""
        q = self.model.qformer_tokenizer(instructions, padding="longest", truncation=True,
                                         max_length=self.max_txt_len, return_tensors="pt")
        return {"qformer_input_ids": q.input_ids, "qformer_attention_mask": q.attention_mask}

    # ---- encoder-decoder (FlanT5): :mod:`blip.objectives.prefix_lm` ---------------------------------------------
    def split_point(self, n: int) -> int:
        """Prefix length for a caption of n tokens: uniform in 1 .. max(1, n // 2) (BLIP-2 §3.3, prefix LM)."""
        return split_point(n, self.generator)

    def prefix_lm_batch(self, texts: list[str], splits: list[int] | None = None) -> dict[str, Tensor]:
        """Captions split into encoder prefix and decoder target (see :func:`prefix_lm_batch`)."""
        return prefix_lm_batch(self.tokenizer, texts, self._t5_ids(), prompt=self.prompt,
                               max_txt_len=self.max_txt_len, splits=splits, generator=self.generator)

    def text_pair_batch(self, inputs: list[str], outputs: list[str]) -> dict[str, Tensor]:
        """LAVIS Blip2T5 mode: encoder reads ``text_input``, the decoder predicts ``text_output`` (both with </s>)."""
        return text_pair_batch(self.tokenizer, inputs, outputs, self._t5_ids(), max_txt_len=self.max_txt_len,
                               max_output_len=self.max_output_len)

    def _t5_ids(self) -> tuple[int, int]:
        return self.model.pad_token_id, self.model.llm.config.decoder_start_token_id

    # ---- loss ---------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch: "pixel_values" and "text" (captions), or "text_input" + "text_output" (instruction / question and
        target; InstructBLIP models also read "text_input" with the Q-Former)."""
        if "answers" in batch:
            return self.answer_loss(batch)
        pixels = batch["pixel_values"]
        pair = "text_output" in batch
        inputs = batch.get("text_input", batch.get("text")) if pair else None
        if self.model.instruct and not pair:
            raise ValueError("InstructBLIP training needs text_input (the instruction) and text_output")
        if self.model.is_seq2seq:
            t = self.text_pair_batch(inputs, batch["text_output"]) if pair else self.prefix_lm_batch(batch["text"])
        else:
            t = self.causal_pair_batch(inputs, batch["text_output"]) if pair else self.causal_batch(batch["text"])
        if self.model.instruct:
            t.update(self.qformer_batch(inputs))
        t = {k: v.to(pixels.device) for k, v in t.items()}
        labels = t.pop("labels")
        if self.bos_target and not self.model.is_seq2seq and not pair:
            # one more position in front: the last query, whose target is labels[:, 0] (the bos, or -100)
            logits = self.model(pixels, **t, query_positions=1).logits
            labels = torch.cat([labels.new_full((labels.shape[0], 1), -100), labels], dim=1)
        else:
            logits = self.model(pixels, **t).logits
        if self.model.is_seq2seq:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            loss = lm_loss(logits, labels)
        return {"loss": loss, "loss_lm": loss.detach()}

    def answer_loss(self, batch: dict) -> dict[str, Tensor]:
        """VQA fine-tuning (module docstring): batch "pixel_values" [B, 3, H, W], "text" (B questions), "answers"
        (B lists), optionally "weights" (B lists, as the answers) -> {"loss", "loss_vqa"}."""
        pixels = batch["pixel_values"]
        if batch.get("weights") is not None:
            answers, weights = batch["answers"], batch["weights"]
        else:
            answers, weights = zip(*(answer_weights(list(a)) for a in batch["answers"]))
        counts = [len(a) for a in answers]
        if len(counts) != len(batch["text"]) or [len(w) for w in weights] != counts:
            raise ValueError(f"VQA batch: {len(batch['text'])} questions, answers per question {counts}, weights per "
                             f"question {[len(w) for w in weights]}: each question needs its answers and weights")
        questions = [self.model.question_template.format(q) for q in batch["text"]]
        inputs = [q for q, n in zip(questions, counts) for _ in range(n)]
        outputs = [a for group in answers for a in group]
        if self.model.is_seq2seq:
            t = self.text_pair_batch(inputs, outputs)
        else:
            t = self.causal_pair_batch(inputs, outputs)
        qformer = self.qformer_batch(questions) if self.model.instruct else {}
        t = {k: v.to(pixels.device) for k, v in {**t, **qformer}.items()}
        labels = t.pop("labels")
        prefix = self.model.query_embeds(pixels, t.pop("qformer_input_ids", None),
                                         t.pop("qformer_attention_mask", None))
        per_answer = torch.tensor(counts, device=pixels.device)
        logits = self.model.logits_from_queries(prefix.repeat_interleave(per_answer, 0), **t).logits
        if self.model.is_seq2seq:   # decoder logits are aligned with their labels
            nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
        else:
            nll = lm_loss(logits, labels, reduction="sum_per_sequence")
        w = torch.tensor([x for group in weights for x in group], device=nll.device, dtype=nll.dtype)
        loss = (w * nll).sum() / len(counts)
        return {"loss": loss, "loss_vqa": loss.detach()}
