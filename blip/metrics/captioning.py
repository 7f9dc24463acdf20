"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optionally SPICE) through pycocoevalcap.

The scorers and the PTB tokenizer are the ones every captioning paper uses; METEOR, SPICE and the tokenizer
run Java (``java`` must be on PATH). SPICE also needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's
``spice/lib`` (pycocoevalcap downloads them on first use; blip never does): :func:`spice_status` says whether it can
run, and why not.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Collection, Mapping

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java for the PTB tokenizer and METEOR: install a JRE (e.g. "
                           "`apt-get install default-jre-headless`)")


def spice_status(setting: bool | str = "auto") -> tuple[bool, str | None]:
    """(run SPICE?, the reason it is skipped or None). setting: "auto" | True (required: raise if unavailable) |
    False."""
    if setting is False or setting == "false":
        return False, "SPICE skipped: disabled by the task's spice=false"
    import pycocoevalcap
    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    missing = [j for j in CORENLP_JARS if not (lib / j).exists()]
    why = None
    if shutil.which("java") is None:
        why = "SPICE skipped: no `java` on PATH (install a JRE, e.g. apt-get install default-jre-headless)"
    elif missing:
        why = (f"SPICE skipped: Stanford CoreNLP jars {missing} are not in {lib} (fetch them once with `python -c "
               "'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; get_stanford_models()'`)")
    if why and setting not in ("auto", None):
        raise RuntimeError(why.replace("SPICE skipped", "spice=true but SPICE cannot run"))
    return why is None, why


@functools.lru_cache(maxsize=1)
def meteor():
    """One METEOR scorer per process: its Java server loads the paraphrase tables once (seconds to tens of
    seconds), then scores any number of calls (NoCaps domains, repeated evaluations)."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def ptb_tokenize(predictions: Mapping[object, str], references: Mapping[object, list[str]]
                 ) -> tuple[dict[object, list[str]], dict[object, list[str]]]:
    """(res, gts) as pycocoevalcap scores them: every caption through its PTB tokenizer (line by line, so a subset
    of the output is what tokenizing the subset gives)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    require_java()
    missing = [i for i in predictions if i not in references]
    if missing:
        raise KeyError(f"{len(missing)} predicted image ids have no references, e.g. {missing[:5]}")
    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in predictions})
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    return res, gts


def score_tokenized(res: Mapping[object, list[str]], gts: Mapping[object, list[str]],
                    spice: bool = False, only: Collection[str] | None = None) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE) of tokenized captions (:func:`ptb_tokenize`). only: the metric
    names wanted (e.g. {"Bleu_4", "CIDEr"}): scorers that give none of them are not run (METEOR's JVM not started)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    scorers = [(lambda: Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (meteor, ["METEOR"]),
               (Rouge, ["ROUGE_L"]), (Cider, ["CIDEr"])]
    if spice:
        from pycocoevalcap.spice.spice import Spice
        scorers.append((Spice, ["SPICE"]))
    out: dict[str, float] = {}
    for make_scorer, names in scorers:
        if only is not None and not set(names) & set(only):
            continue
        score, _ = make_scorer().compute_score(dict(gts), dict(res))
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            if only is None or name in only:
                out[name] = float(value)
    return out


def caption_metrics(predictions: Mapping[object, str], references: Mapping[object, list[str]],
                    spice: bool = False, only: Collection[str] | None = None) -> dict[str, float]:
    """Corpus-level scores for ``predictions`` (image id -> caption) against ``references`` (id -> captions);
    only: the metric names wanted (all when None)."""
    return score_tokenized(*ptb_tokenize(predictions, references), spice=spice, only=only)


def nocaps_metrics(predictions: Mapping[int, str], references: Mapping[int, list[str]], domains: Mapping[int, str],
                   spice: bool = False) -> dict:
    """NoCaps: the overall scores at the top level plus one entry per domain ("in-domain", "near-domain",
    "out-domain"), each subset scored on its own (CIDEr's document frequencies come from that subset's references,
    as on the NoCaps evaluation server). The captions are tokenized once."""
    res, gts = ptb_tokenize(predictions, references)
    out: dict = score_tokenized(res, gts, spice=spice)
    for domain in sorted(set(domains.values())):
        ids = [i for i in res if domains[i] == domain]
        out[domain] = score_tokenized({i: res[i] for i in ids}, {i: gts[i] for i in ids}, spice=spice)
    return out
