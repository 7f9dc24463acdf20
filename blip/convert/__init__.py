"""Checkpoint formats <-> blip's modules.

:mod:`.formats` holds the table of formats (how each recognises itself, its key map, its loader) and
:func:`~.formats.read_checkpoint`, the one reader every way into a model uses. The key maps live next to their
formats: :mod:`.bert` (BERT / MED / Q-Former names), :mod:`.vit` (HF ViT, timm / EVA, OpenAI and HF CLIP),
:mod:`.blip` (salesforce/BLIP, LAVIS BLIP, HF BLIP, blip's own), :mod:`.blip_nlvr`, :mod:`.blip2_lavis`,
:mod:`.blip2_hf`, :mod:`.blip2_ours` over the parts every BLIP-2 model shares (:mod:`.blip2_parts`).
:mod:`.unimodal` loads one tower (``vision_init`` / ``text_init``); :mod:`.blip` and :mod:`.blip2` also export.
"""
