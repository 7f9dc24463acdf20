"""Fine-tuning switches applied to an already-built BLIP-2 model (the papers' recipes start from a pretrained model
and change what trains):

- :func:`set_vit_trainable`: the image encoder trains (LAVIS ``freeze_vit: False``, BLIP-2 caption / retrieval / VQA
  fine-tuning) or is frozen again;
- :func:`question_aware_structure`: a stage-2 model's Q-Former also reads the question (BLIP-2 VQA fine-tuning, "we
  condition the Q-Former on the question"), i.e. the InstructBLIP structure, sharing every existing weight. Its new
  text parts (word / position embeddings, text FFN) are filled from a checkpoint by
  :func:`blip.convert.blip2_handoff.question_aware`, or by :func:`text_ffn_from_query_ffn` here.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from .blip2_llm import QUESTION_TEXT_PARTS, Blip2LanguageModel, InstructBlipLanguageModel, instruct_qformer
from .blip2_qformer import Blip2Qformer
from .qformer import FrozenImageEncoder, QFormer


def blip2_model(model: nn.Module) -> nn.Module:
    """The BLIP-2 model itself: ``model``, or the ``.model`` of a training objective wrapping one."""
    inner = getattr(model, "model", None)
    found = inner if isinstance(inner, nn.Module) and hasattr(inner, "image_encoder") else model
    if not isinstance(getattr(found, "image_encoder", None), FrozenImageEncoder):
        raise TypeError(f"{type(model).__name__} is no BLIP-2 model (Blip2LanguageModel, InstructBLIP, Blip2Qformer "
                        "or an objective around one): it has no BLIP-2 image encoder")
    return found


def set_vit_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Make the ViT of a BLIP-2 LLM model, an InstructBLIP model or a :class:`Blip2Qformer` (or of the training
    objective wrapping one as ``.model``) trainable or frozen, in place.

    Trainable: ``requires_grad`` on, it follows ``model.train()`` (dropout / drop-path active), its activations are
    kept for backward, and it is stored in fp32 (LAVIS ``vit_precision: fp32`` for fine-tuning; a ViT cast to bf16 /
    fp16 comes back as fp32 copies of those values, reload the weights for full precision). Frozen towers are cast by
    the training precision policy only when all their parameters are frozen, so a trainable ViT stays fp32 there too.
    The model's config records the state (``freeze_vit``), so exports and run reloads build the same structure.
    Layer-wise LR decay (``trainer.optimizer.layer_decay``) groups the ViT's blocks through the model's ``vit_path``.
    """
    target = blip2_model(model)
    target.image_encoder.set_frozen(not trainable)
    if isinstance(target, Blip2Qformer):
        target.cfg = replace(target.cfg, freeze_vit=not trainable,
                             vit_dtype="fp32" if trainable else target.cfg.vit_dtype)
    else:
        target.config.freeze_vit = not trainable


def is_question_text_part(name: str) -> bool:
    """Whether ``name`` (a key of an LLM model) is one of the Q-Former's text parts (:data:`QUESTION_TEXT_PARTS`)."""
    return any(re.fullmatch(p, name) for p in QUESTION_TEXT_PARTS)


def question_aware_structure(model: Blip2LanguageModel) -> InstructBlipLanguageModel:
    """The instruction-aware (InstructBLIP) form of a stage-2 model: the same image encoder, LLM, ``llm_proj`` and
    Q-Former weights (shared tensors, not copies), plus the Q-Former's text parts (word / position embeddings and
    each layer's text FFN) at their initialisation (normal, std ``initializer_range``, as BERT's). ``model`` itself
    is left as it was; an InstructBLIP model is returned as is."""
    if not isinstance(model, Blip2LanguageModel):
        raise TypeError(f"question_aware takes a BLIP-2 LLM model (stage 2), got {type(model).__name__}")
    if model.instruct:
        return model
    aware = InstructBlipLanguageModel.__new__(InstructBlipLanguageModel)
    nn.Module.__init__(aware)
    module_state = set(vars(aware))
    aware.__dict__.update({k: v for k, v in vars(model).items() if k not in module_state})  # config, tokenizers...
    for name, child in model.named_children():
        setattr(aware, name, child)
    aware.config = replace(model.config, qformer=instruct_qformer(model.config.qformer))
    aware.qformer = _with_text_parts(model.qformer, aware.config.qformer)
    aware.train(model.training)
    return aware


def _with_text_parts(qformer: QFormer, cfg) -> QFormer:
    """A Q-Former of ``cfg`` (with text parts) whose other parameters are ``qformer``'s own tensors."""
    with torch.device(qformer.query_tokens.device):
        grown = QFormer(cfg)
    for name, param in qformer.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(grown.get_submodule(owner) if owner else grown, attr, param)
    grown.transformer.grad_checkpointing = qformer.transformer.grad_checkpointing
    return grown


@torch.no_grad()
def text_ffn_from_query_ffn(model: InstructBlipLanguageModel) -> list[str]:
    """Each Q-Former layer's text FFN := a copy of its query FFN (the reverse of LAVIS's stage-1 init, which copies
    BERT's FFN into the query FFN): without a checkpoint holding text parts, the question's positions then pass
    through FFNs trained on the Q-Former's own features instead of random ones. Returns the keys set."""
    done = []
    for i, layer in enumerate(model.qformer.transformer.layers):
        layer.ffn.load_state_dict(layer.ffn_query.state_dict())
        done += [f"qformer.transformer.layers.{i}.ffn.{k}" for k in layer.ffn.state_dict()]
    return done
