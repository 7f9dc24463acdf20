"""BLIP's text cleaning (salesforce/BLIP data/utils.py, LAVIS blip_caption / blip_question processors).

Expected values are worked out by hand from BLIP's rules: captions turn each of . ! " ( ) * # : ; ~ into a space,
collapse runs of 2+ whitespace characters into one space, drop a trailing newline, trim spaces and keep the first
max_words words split on " "; questions delete those characters and trim trailing spaces only.
"""

import pytest

from blip.data import pre_caption, pre_question
from blip.data.text import text_cleaner

CAPTIONS = [
    ("A man's dog, running.", "a man's dog, running"),                      # apostrophe and comma kept
    ("A well-lit room/kitchen.", "a well-lit room/kitchen"),                # hyphen and slash kept
    ("It costs 3.50 dollars!", "it costs 3 50 dollars"),                    # the decimal point becomes a space
    ("<person> holding a <PERSON>'s hand", "<person> holding a <person>'s hand"),  # <person> kept as written
    ("  Two   cats (sleeping) on a sofa.  \n", "two cats sleeping on a sofa"),
    ("What?! #Nope: *really*", "what? nope really"),                        # ? kept, ! # : * spaced
    ("~Hello~World~", "hello world"),
    ("a\tb", "a\tb"),                                                        # one tab is not a run of spaces
    ("a \tb\t\tc", "a b c"),
    ("don't, won't - can't", "don't, won't - can't"),
]


@pytest.mark.parametrize("raw, expected", CAPTIONS)
def test_pre_caption_is_blips(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_space_separated_words():
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert pre_caption("one two three four", max_words=3) == "one two three"
    assert pre_caption("line one\nline two", max_words=2) == "line one\nline"   # "\n" does not split words


QUESTIONS = [
    ("What's in the Picture?", "what's in the picture?"),
    ("Is it red!!!   ", "is it red"),
    ("well-lit (room)", "well-lit room"),
    ("  What is  3.5 + 2?", "  what is  35 + 2?"),   # leading and inner spaces stay, the point is deleted
    ("Who is <person>?", "who is <person>?"),
    ("what is this?\n", "what is this?\n"),           # only trailing spaces are trimmed
    ("Where; is: it~", "where is it"),
]


@pytest.mark.parametrize("raw, expected", QUESTIONS)
def test_pre_question_is_blips(raw, expected):
    assert pre_question(raw) == expected


def test_pre_question_truncates():
    assert pre_question("How many cars, trucks and bikes?", max_words=3) == "how many cars,"
    assert pre_question(" a b c", max_words=2) == " a"   # a leading space counts as an empty word
    assert pre_question(" ".join(["q"] * 60)) == " ".join(["q"] * 50)


def test_text_cleaner_kinds():
    assert text_cleaner("caption")("A, b. " + "w " * 40).count(" ") == 29   # captions: 30 words by default
    assert text_cleaner("caption", 2)("A man's dog.") == "a man's"
    assert text_cleaner("question")("Why?. " + "w " * 60).count(" ") == 49  # questions: 50 words
    assert text_cleaner("none")("Kept AS is.") == "Kept AS is."
    with pytest.raises(ValueError, match="text_cleaning"):
        text_cleaner("answer")
