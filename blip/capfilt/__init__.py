"""CapFilt (BLIP paper §3.3): bootstrap a noisy image–text dataset with a captioner and a filter.

- :mod:`.captioner`: sample synthetic captions; :mod:`.filter`: ITM scores and the keep rule;
- :mod:`.job`: the resumable, sharded job over webdataset shards or a JSON list (:class:`CapFilt`).
"""
from .captioner import sample_captions, sample_seed
from .filter import itm_match_scores, keep_caption
from .job import CapFilt, CapFiltConfig, CapFiltInput, CapFiltSettingsError, merge_outputs, output_urls

__all__ = ["CapFilt", "CapFiltConfig", "CapFiltInput", "CapFiltSettingsError", "itm_match_scores", "keep_caption",
           "merge_outputs", "output_urls", "sample_captions", "sample_seed"]
