"""Pure state-dict converters per family: original BLIP / LAVIS / HF layouts <-> blip's modules."""
