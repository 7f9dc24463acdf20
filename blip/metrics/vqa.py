"""VQA accuracy with the answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA ``vqaEval.py``).

accuracy(answer) = mean over the 10 annotators of min(1, #matches among the other 9 / 3), after normalising
punctuation, number words, articles and contractions. The normalisation tables below are the official ones
(quirks included: apostrophes in the contraction targets are typographic, as in the original).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn’t’ve couldnt’ve=couldn’t’ve
didnt=didn’t doesnt=doesn’t dont=don’t hadnt=hadn’t hadnt’ve=hadn’t’ve hadn'tve=hadn’t’ve hasnt=hasn’t
havent=haven’t hed=he’d hed’ve=he’d’ve he’dve=he’d’ve hes=he’s howd=how’d howll=how’ll hows=how’s Id’ve=I’d’ve
I’dve=I’d’ve Im=I’m Ive=I’ve isnt=isn’t itd=it’d itd’ve=it’d’ve it’dve=it’d’ve itll=it’ll let’s=let’s maam=ma’am
mightnt=mightn’t mightnt’ve=mightn’t’ve mightn’tve=mightn’t’ve mightve=might’ve mustnt=mustn’t mustve=must’ve
neednt=needn’t notve=not’ve oclock=o’clock oughtnt=oughtn’t ow’s’at=’ow’s’at ’ows’at=’ow’s’at ’ow’sat=’ow’s’at
shant=shan’t shed’ve=she’d’ve she’dve=she’d’ve she’s=she’s shouldve=should’ve shouldnt=shouldn’t
shouldnt’ve=shouldn’t’ve shouldn’tve=shouldn’t’ve somebody’d=somebodyd somebodyd’ve=somebody’d’ve
somebody’dve=somebody’d’ve somebodyll=somebody’ll somebodys=somebody’s someoned=someone’d
someoned’ve=someone’d’ve someone’dve=someone’d’ve someonell=someone’ll someones=someone’s somethingd=something’d
somethingd’ve=something’d’ve something’dve=something’d’ve somethingll=something’ll thats=that’s thered=there’d
thered’ve=there’d’ve there’dve=there’d’ve therere=there’re theres=there’s theyd=they’d theyd’ve=they’d’ve
they’dve=they’d’ve theyll=they’ll theyre=they’re theyve=they’ve twas=’twas wasnt=wasn’t wed’ve=we’d’ve
we’dve=we’d’ve weve=we've werent=weren’t whatll=what’ll whatre=what’re whats=what’s whatve=what’ve whens=when’s
whered=where’d wheres=where's whereve=where’ve whod=who’d whod’ve=who’d’ve who’dve=who’d’ve wholl=who’ll
whos=who’s whove=who've whyll=why’ll whyre=why’re whys=why’s wont=won’t wouldve=would’ve wouldnt=wouldn’t
wouldnt’ve=wouldn’t’ve wouldn’tve=wouldn’t’ve yall=y’all yall’ll=y’all’ll y’allll=y’all’ll yall’d’ve=y’all’d’ve
y’alld’ve=y’all’d’ve y’all’dve=y’all’d’ve youd=you’d youd’ve=you’d’ve you’dve=you’d’ve youll=you’ll
youre=you’re youve=you’ve""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, lookahead quirk included
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """Normalise a predicted answer as the official evaluation does."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_digits_articles(normalize_punctuation(answer))


def answer_accuracy(prediction: str, gt_answers: Iterable[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the (usually 10) human answers."""
    gts = list(gt_answers)
    if not gts:
        raise ValueError("a question needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    if len(set(gts)) > 1:  # the official code normalises ground-truth punctuation only when annotators disagree
        gts = [normalize_punctuation(a) for a in gts]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def answers_by_id(records: Iterable[Mapping], source: str, id_key: str = "question_id",
                  answer_key: str = "answer") -> dict[Any, str]:
    """A prediction set ``[{id_key: ..., answer_key: ...}]`` -> {id: answer}, refusing a repeated id (as a mapping
    one of the two answers would be dropped silently and the question scored once). source: names the set."""
    from ..data.annotations import unique_ids
    records = list(records)
    unique_ids((r[id_key] for r in records), source, id_key)
    return {r[id_key]: r[answer_key] for r in records}


def _refuse_empty(predictions: Mapping) -> None:
    if not predictions:
        raise ValueError("no predictions to score: an empty split has no accuracy (it would read as 0.00)")


def vqa_accuracy(predictions: Mapping[Any, str], ground_truth: Mapping[Any, list[str]],
                 answer_types: Mapping[Any, str] | None = None) -> dict:
    """Official VQA accuracy in percent, rounded to 2 decimals as the official tool reports it: {"overall", and with
    ``answer_types`` (question id -> "yes/no" | "number" | "other") "perAnswerType": {type: accuracy}}. Every
    predicted id must have ground truth."""
    _refuse_empty(predictions)
    missing = [q for q in predictions if q not in ground_truth]
    if missing:
        raise KeyError(f"{len(missing)} predicted question ids have no ground truth, e.g. {missing[:5]}")
    accs = {q: answer_accuracy(predictions[q], ground_truth[q]) for q in predictions}
    out: dict = {"overall": round(100.0 * sum(accs.values()) / len(accs), 2)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for q, acc in accs.items():
            by_type.setdefault(answer_types[q], []).append(acc)
        out["perAnswerType"] = {t: round(100.0 * sum(a) / len(a), 2) for t, a in sorted(by_type.items())}
    return out


def exact_match_accuracy(predictions: Mapping[Any, str], ground_truth: Mapping[Any, list[str]]) -> dict:
    """GQA accuracy in percent: the normalised prediction equals the (single) answer (LAVIS GQA task)."""
    _refuse_empty(predictions)
    missing = [q for q in predictions if q not in ground_truth]
    if missing:
        raise KeyError(f"{len(missing)} predicted question ids have no ground truth, e.g. {missing[:5]}")
    hits = [normalize_answer(predictions[q]) == ground_truth[q][0] for q in predictions]
    return {"overall": 100.0 * sum(hits) / len(hits)}


def lemmatizer(setting: bool | str) -> tuple[Callable[[str], str] | None, str | None]:
    """LAVIS's OK-VQA answer lemmatizer (spaCy en_core_web_sm: nouns and verbs -> lemma) and why it is off.

    setting: False (off), True (required), "auto" (on when spaCy and its English model are installed)."""
    if setting is False or setting == "false":
        return None, None
    try:
        import spacy
        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError) as e:
        why = (f"answer lemmatization skipped (LAVIS apply_lemmatizer): spaCy's en_core_web_sm is not available "
               f"({type(e).__name__}); install spacy and `python -m spacy download en_core_web_sm`")
        if setting is True or setting == "true":
            raise RuntimeError(why) from e
        return None, why

    def lemmatize(answer: str) -> str:
        return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))
    return lemmatize, None
