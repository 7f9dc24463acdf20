"""BLIP fine-tuning objectives (original BLIP ``train_caption.py`` / ``train_retrieval.py`` / ``train_vqa.py`` /
``train_nlvr.py``):
``forward(batch) -> {"loss", ...terms}`` around a task model, for the trainer (DDP wraps the objective).

The task model's submodules are registered under their own names (``visual_encoder``, ``text_encoder``...), so an
objective's state dict uses the task model's keys (plus, for retrieval, the momentum copies / queue / ``temp`` under
BlipPretrain's names). Hence ``init_from`` a BlipPretrain run loads by name — for retrieval including the momentum
encoders, queues and temperature, as BLIP's ``blip_retrieval(pretrained=...)`` does — and a fine-tuned checkpoint
loads back into the task model by name. ``objective.model`` is the task model (generation, evaluation).

batch keys: "pixel_values" [B, 3, H, W], "text" list[str] (cleaned caption / question), "image_ids" [B],
"progress" (epochs); VQA also "answers" list[list[str]] and optionally "weights" list[list[float]]; NLVR2's
"pixel_values" are pairs [B, 2, 3, H, W] (left, right) with "label" [B] (1 = the sentence is true).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import answer_weights
from ..data.tokenizer import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID, get_tokenizer, tokenize_to, with_first_token
from ..losses import FeatureQueue, concat_all_gather, lm_loss_from_hidden
from ..models.structure import DeclaredLayers
from .momentum import MomentumDistillation, itm_hard_negatives, momentum_itc, ramped_alpha


class TaskObjective(DeclaredLayers, nn.Module):
    """Registers the task model's children as its own (same names, same objects), so the task model's layer groups
    (``visual_encoder``) hold here too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if list(model.named_parameters(recurse=False)) or list(model.named_buffers(recurse=False)):
            raise ValueError(f"{type(model).__name__} holds tensors outside submodules; wrap it differently")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["_task_model"] = model   # not a submodule: its children are already ours
        self.tokenizer = getattr(model, "tokenizer", None) or get_tokenizer("blip")

    @property
    def model(self) -> nn.Module:
        return self._task_model

    def _tokens(self, texts: list[str], max_length: int, padding: str = "longest") -> tuple[Tensor, Tensor]:
        return tokenize_to(self.tokenizer, texts, max_length, next(self.parameters()).device, padding=padding)


class CaptionObjective(TaskObjective):
    """LM loss of ``[DEC] prompt caption [SEP]`` with the prompt and padding masked, label smoothing 0.1.

    BLIP ``caption_coco.yaml``: prompt "a picture of " (its 4 positions, [DEC] included, get -100), max 40 tokens.
    """

    def __init__(self, model: nn.Module, prompt: str = "a picture of ", max_txt_len: int = 40,
                 label_smoothing: float = 0.1):
        super().__init__(model)
        self.prompt, self.max_txt_len, self.label_smoothing = prompt, max_txt_len, label_smoothing
        self.prompt_length = len(self.tokenizer(prompt)["input_ids"]) - 1   # [CLS]/[DEC] + prompt tokens, no [SEP]

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = self._tokens([self.prompt + t for t in batch["text"]], self.max_txt_len)
        ids = with_first_token(ids, DEC_TOKEN_ID)
        labels = ids.masked_fill(ids == PAD_TOKEN_ID, -100)
        labels[:, :self.prompt_length] = -100
        hidden, _ = self.model.decoder_states(batch["pixel_values"], ids, mask)
        loss = lm_loss_from_hidden(hidden, self.text_decoder.lm_head, labels, self.label_smoothing)
        return {"loss": loss, "loss_lm": loss}


class RetrievalObjective(MomentumDistillation, TaskObjective):
    """ITC (momentum distillation over world batch + queue, targets spread over every caption of the same image id)
    + ITM (hard negatives never sharing the image id), as BLIP ``blip_retrieval.py``.

    alpha ramps over the first epoch (BLIP ``train_retrieval.py``). ``negative_all_rank``: ITM negatives from the
    world batch (COCO: True, Flickr: False). EMA and temperature clamp in :meth:`after_optimizer_step`.
    """

    new_on_init_from = ("temp",)   # a task-model checkpoint has no temperature: it starts at ``temp``

    def __init__(self, model: nn.Module, queue_size: int = 57600, momentum: float = 0.995, alpha: float = 0.4,
                 alpha_warmup_epochs: float = 1.0, temp: float = 0.07, max_txt_len: int = 35,
                 negative_all_rank: bool = True, itc_world_batch: bool = True):
        super().__init__(model)
        self.momentum, self.alpha, self.alpha_warmup_epochs = momentum, alpha, alpha_warmup_epochs
        self.max_txt_len, self.negative_all_rank, self.itc_world_batch = max_txt_len, negative_all_rank, itc_world_batch
        self.init_momentum(temp)
        self.queue = FeatureQueue(self.vision_proj.out_features, queue_size)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        pixel_values, image_ids = batch["pixel_values"], batch["image_ids"].to(self.temp.device)
        alpha = ramped_alpha(self.alpha, float(batch.get("progress", 0.0)), self.alpha_warmup_epochs)
        ids, mask = self._tokens(batch["text"], self.max_txt_len, padding="max_length")

        image_embeds = self.visual_encoder(pixel_values)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text_encoder(ids, attention_mask=mask)[:, 0]), dim=-1)
        with torch.no_grad():
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, attention_mask=mask)[:, 0]), dim=-1)
        loss_itc, _, _ = momentum_itc(image_feat, text_feat, image_feat_m, text_feat_m, self.queue, self.temp, alpha,
                                      image_ids=image_ids, world_batch=self.itc_world_batch)
        self.queue.enqueue(image_feat_m, text_feat_m, image_ids)

        with torch.no_grad():   # BLIP retrieval: online features against the (world) batch's online features
            gather = concat_all_gather if self.negative_all_rank else (lambda t: t)
            sim_i2t = image_feat @ gather(text_feat).T / self.temp
            sim_t2i = text_feat @ gather(image_feat).T / self.temp
        enc_ids = with_first_token(ids, ENC_TOKEN_ID)
        loss_itm = itm_hard_negatives(self.text_encoder, self.itm_head, image_embeds, enc_ids, mask, sim_i2t, sim_t2i,
                                      image_ids, self.negative_all_rank)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}


class VQAObjective(TaskObjective):
    """BLIP VQA answer loss: for each question its k answers are decoded against the image-grounded question states;
    ``loss = sum_q sum_k w_qk * seq_loss_qk / B`` with the label-smoothed (0.1) LM loss summed over answer tokens.

    Weights: ``batch["weights"]`` if given (VG answers: 0.2 in BLIP), else :func:`answer_weights` of the answers.
    """

    def __init__(self, model: nn.Module, max_question_len: int = 35, max_answer_len: int = 32,
                 label_smoothing: float = 0.1):
        super().__init__(model)
        self.max_question_len, self.max_answer_len, self.label_smoothing = max_question_len, max_answer_len, \
            label_smoothing

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if "weights" in batch:
            answers, weights = batch["answers"], batch["weights"]
        else:
            answers, weights = zip(*(answer_weights(list(a)) for a in batch["answers"]))
        counts = [len(a) for a in answers]
        q_ids, q_mask = self._tokens(batch["text"], self.max_question_len)
        a_ids, a_mask = self._tokens([a for ans in answers for a in ans], self.max_answer_len)
        a_ids = with_first_token(a_ids, DEC_TOKEN_ID)
        device = q_ids.device
        image_embeds = self.visual_encoder(batch["pixel_values"])
        states = self.text_encoder(with_first_token(q_ids, ENC_TOKEN_ID), attention_mask=q_mask,
                                   encoder_hidden_states=image_embeds)
        per_answer = torch.tensor(counts, device=device)
        hidden = self.text_decoder.hidden_states(a_ids, a_mask,
                                                 encoder_hidden_states=states.repeat_interleave(per_answer, 0),
                                                 encoder_attention_mask=q_mask.repeat_interleave(per_answer, 0))
        labels = a_ids.masked_fill(a_ids == PAD_TOKEN_ID, -100)
        seq_loss = lm_loss_from_hidden(hidden, self.text_decoder.lm_head, labels, self.label_smoothing,
                                       reduction="sum_per_sequence")
        w = torch.tensor([x for ws in weights for x in ws], device=device, dtype=seq_loss.dtype)
        loss = (w * seq_loss).sum() / len(counts)
        return {"loss": loss, "loss_vqa": loss}


class NLVRObjective(TaskObjective):
    """BLIP NLVR2: cross-entropy (no label smoothing) of the 2-way logits. The sentence is tokenized as BLIP does:
    ``[ENC] sentence [SEP]`` padded to the longest, not truncated (``max_txt_len`` defaults to the model's
    position limit)."""

    def __init__(self, model: nn.Module, max_txt_len: int | None = None):
        super().__init__(model)
        self.max_txt_len = max_txt_len or model.cfg.text.max_position_embeddings

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = self._tokens(batch["text"], self.max_txt_len)
        ids = with_first_token(ids, ENC_TOKEN_ID)
        pairs = batch["pixel_values"]
        logits = self.model(pairs[:, 0], pairs[:, 1], ids, mask).logits
        loss = F.cross_entropy(logits, torch.as_tensor(batch["label"], device=logits.device))
        return {"loss": loss, "loss_nlvr": loss}


OBJECTIVES: dict[str, type[TaskObjective]] = {"caption": CaptionObjective, "retrieval": RetrievalObjective,
                                              "vqa": VQAObjective, "nlvr": NLVRObjective}


def wrap_objective(task: str, model: nn.Module, **settings) -> TaskObjective:
    """The training objective of a BLIP task model, e.g. ``wrap_objective("caption", model, prompt="a photo of ")``."""
    if task not in OBJECTIVES:
        raise KeyError(f"no BLIP fine-tuning objective for task {task!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[task](model, **settings)
