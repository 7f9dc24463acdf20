"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optionally SPICE) through pycocoevalcap.

The scorers and the PTB tokenizer are the ones every captioning paper uses; METEOR, SPICE and the tokenizer
run Java (``java`` must be on PATH). SPICE fetches Stanford CoreNLP on first use, so it is off by default.
"""
from __future__ import annotations

import shutil
from typing import Mapping


def caption_metrics(predictions: Mapping[object, str], references: Mapping[object, list[str]],
                    spice: bool = False) -> dict[str, float]:
    """Corpus-level scores for ``predictions`` (image id -> caption) against ``references`` (id -> captions)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java for the PTB tokenizer and METEOR: install a JRE (e.g. "
                           "`apt-get install default-jre-headless`)")
    missing = [i for i in predictions if i not in references]
    if missing:
        raise KeyError(f"{len(missing)} predicted image ids have no references, e.g. {missing[:5]}")
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in predictions})
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]), (Rouge(), ["ROUGE_L"]),
               (Cider(), ["CIDEr"])]
    if spice:
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice(), ["SPICE"]))
    out: dict[str, float] = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = float(value)
    return out
