"""Training objectives: ``forward(batch: dict) -> {"loss": Tensor, ...terms}`` around an inference model.

- :mod:`.blip_pretrain`: BLIP pretraining (ITC with momentum distillation, hard-negative ITM, LM);
- :mod:`.blip_finetune`: BLIP caption / retrieval / VQA fine-tuning;
- :mod:`.momentum`: the momentum encoder (EMA copies, momentum ITC, hard-negative ITM, the alpha ramp);
- :mod:`.blip2_stage1`: BLIP-2 stage 1 (ITC + ITM + ITG on the Q-Former);
- :mod:`.blip2_stage2`: BLIP-2 stage 2 (LM through a frozen LLM), with :mod:`.prefix_lm` (the FlanT5 prefix-LM split).
"""
