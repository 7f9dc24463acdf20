"""Checkpoint formats <-> blip's modules, one facade per family.

``blip.convert.blip`` and ``blip.convert.blip2`` each expose ``owns(state_dict)``, ``load_original(...)``,
``HF_LOADERS`` (HF class name -> loader), ``exports(model)``, ``export_hf(model, dir)`` and
``save_safetensors(model, path)``. Below them, pure part converters (``blip2_parts``) import nothing from the facades.
"""
