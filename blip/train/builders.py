"""Model construction for training: `blip.create_model` plus the objective's own settings.

`create_model(arch, task, **overrides)` configures the architecture; training objectives also take settings that
are not architecture (BLIP's ITC queue length, text length, distillation alpha...). Configs pass those as
`objective`, which this builder hands to the objective's constructor.
"""

from __future__ import annotations

from torch import nn

import blip


def create_training_model(arch: str, task: str, *, objective: dict | None = None, llm: str | None = None,
                          llm_tokenizer: str | None = None, **overrides) -> nn.Module:
    """`blip.create_model(arch, task, **overrides)` as a training objective.

    objective: the objective's keyword arguments (BLIP pretraining: {"queue_size": 4096, "max_txt_len": 16};
    BLIP-2 stage 2: {"prompt": ..., "max_txt_len": ...}). Task "stage2" wraps the BLIP-2 LLM model in its LM
    objective; llm: HF directory of the frozen LLM; llm_tokenizer: "synthetic" gives the tiny LLM the word-level
    tokenizer of the synthetic captions."""
    if task == "stage2":
        from blip.models.blip2_llm_objective import Blip2Stage2Objective

        model = blip.create_model(arch, task, **({"llm": llm} if llm else {}), **overrides)
        if llm_tokenizer == "synthetic":
            from blip.data.synthetic import synthetic_llm_tokenizer

            model.tokenizer = synthetic_llm_tokenizer()
        elif llm_tokenizer:
            model.config.tokenizer = llm_tokenizer
        return Blip2Stage2Objective(model, **(objective or {}))
    if task in ("caption", "retrieval", "vqa", "nlvr") and arch.startswith("blip_"):  # BLIP fine-tuning
        from blip.models.blip_finetune import wrap_objective

        return wrap_objective(task, blip.create_model(arch, task, **overrides), **(objective or {}))
    if not objective:
        return blip.create_model(arch, task, **overrides)
    if task != "pretrain" or not arch.startswith("blip_"):
        raise ValueError(f"objective settings are supported for BLIP pretraining, not {arch}/{task}")
    from blip.models.blip import ARCHS
    from blip.models.blip_pretrain import BlipPretrain

    if arch not in ARCHS:
        raise KeyError(f"unknown BLIP arch {arch!r}; known: {sorted(ARCHS)}")
    return BlipPretrain(ARCHS[arch].with_overrides(**overrides), **objective)
