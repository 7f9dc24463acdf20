"""Tokenizer + BLIP token conventions, checked against the raw vocab.txt line numbers and LAVIS's recorded tokens."""

import hashlib
import shutil

import pytest
import torch

from blip.data import tokenizer as tk
from blip.data.tokenizer import (
    caption_prompt_ids,
    get_tokenizer,
    tokenize,
    with_first_token,
)
from conftest import FIXTURES

VOCAB = tk.DEFAULT_VOCAB   # the real bert-base-uncased vocab.txt (its md5 is checked below)
LAVIS = FIXTURES / "lavis"


@pytest.fixture(scope="module")
def lines() -> dict[str, int]:
    """token -> 0-based line number in the raw vocab file (= its id), read without any tokenizer code."""
    return {line.rstrip("\n"): i for i, line in enumerate(VOCAB.read_text(encoding="utf-8").splitlines(True))}


@pytest.fixture(scope="module")
def blip_tok():
    return get_tokenizer("blip")


@pytest.fixture(scope="module")
def qformer_tok():
    return get_tokenizer("blip2_qformer")


def fed(fixture: str) -> dict:
    inputs = torch.load(LAVIS / fixture / "inputs.pt", weights_only=True)
    return inputs, inputs["tokens_as_fed"]


def test_shipped_vocab_is_bert_base_uncased():
    assert hashlib.md5(tk.DEFAULT_VOCAB.read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"


def test_constants_match_vocab_lines(lines):
    assert len(lines) == 30522
    assert (lines["[PAD]"], lines["[UNK]"], lines["[CLS]"], lines["[SEP]"]) == (tk.PAD_TOKEN_ID, tk.UNK_TOKEN_ID,
                                                                                tk.CLS_TOKEN_ID, tk.SEP_TOKEN_ID)
    assert tk.DEC_TOKEN_ID == len(lines) and tk.ENC_TOKEN_ID == len(lines) + 1


def test_blip_tokenizer_special_tokens(blip_tok):
    assert len(blip_tok) == 30524
    assert blip_tok.bos_token == "[DEC]" and blip_tok.bos_token_id == 30522
    assert blip_tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert (blip_tok.cls_token_id, blip_tok.sep_token_id, blip_tok.pad_token_id) == (101, 102, 0)
    # special tokens are atomic, never split into word pieces
    assert blip_tok("[DEC] dog [ENC]", add_special_tokens=False)["input_ids"] == [30522, 3899, 30523]


def test_qformer_tokenizer_has_only_dec(qformer_tok):
    assert len(qformer_tok) == 30523
    assert qformer_tok.bos_token_id == 30522
    assert "[ENC]" not in qformer_tok.get_vocab()


def test_ids_are_vocab_line_numbers(blip_tok, lines):
    text = "A Picture of two RED cars, parked near the street!"
    words = ["a", "picture", "of", "two", "red", "cars", ",", "parked", "near", "the", "street", "!"]
    expected = [lines["[CLS]"], *[lines[w] for w in words], lines["[SEP]"]]
    assert blip_tok(text)["input_ids"] == expected
    # a word that is not in the vocab is split into word pieces that are
    pieces = blip_tok.tokenize("emigrationwy")
    assert len(pieces) > 1 and pieces[1].startswith("##") and all(p in lines for p in pieces)


def test_tokenize_matches_lavis_caption_decoder_input(blip_tok):
    inputs, tokens = fed("blip_caption")
    enc = tokenize(blip_tok, inputs["text_input"], max_length=40)
    assert torch.equal(with_first_token(enc["input_ids"], tk.DEC_TOKEN_ID), tokens["decoder_input_ids"])
    assert torch.equal(enc["attention_mask"], tokens["decoder_attention_mask"])
    assert enc["input_ids"][0, 0] == tk.CLS_TOKEN_ID  # with_first_token returned a copy


def test_tokenize_matches_lavis_itm_itc_vqa(blip_tok):
    inputs, tokens = fed("blip_itm")
    enc = tokenize(blip_tok, inputs["text_input"], max_length=35)
    assert torch.equal(enc["input_ids"], tokens["itc_input_ids"])
    assert torch.equal(enc["attention_mask"], tokens["itc_attention_mask"])
    texts = [inputs["text_input"][j] for _, j in inputs["itm_pairs"]]
    itm = tokenize(blip_tok, texts, max_length=35)
    assert torch.equal(with_first_token(itm["input_ids"], tk.ENC_TOKEN_ID), tokens["itm_input_ids"])

    inputs, tokens = fed("blip_vqa")
    q = tokenize(blip_tok, inputs["text_input"], max_length=35)
    assert torch.equal(with_first_token(q["input_ids"], tk.ENC_TOKEN_ID), tokens["question_input_ids"])
    assert torch.equal(q["attention_mask"], tokens["question_attention_mask"])
    a = tokenize(blip_tok, inputs["answer"], max_length=35)
    assert torch.equal(with_first_token(a["input_ids"], tk.DEC_TOKEN_ID), tokens["answer_input_ids"])


def test_tokenize_matches_lavis_qformer(qformer_tok):
    inputs, tokens = fed("blip2_qformer")
    texts = inputs["text_input"]
    assert torch.equal(tokenize(qformer_tok, texts, 32)["input_ids"], tokens["features_text_input_ids"])
    fwd = tokenize(qformer_tok, texts, 32, padding="max_length")
    assert torch.equal(fwd["input_ids"], tokens["fwd_text_input_ids"])
    assert torch.equal(fwd["attention_mask"], tokens["fwd_text_attention_mask"])
    assert torch.equal(with_first_token(fwd["input_ids"], tk.DEC_TOKEN_ID), tokens["fwd_lm_input_ids"])
    itm = tokenize(qformer_tok, texts, 35, padding="max_length")
    assert torch.equal(itm["input_ids"], tokens["itm_text_ids"])
    assert torch.equal(itm["attention_mask"], tokens["itm_text_atts"])


def test_caption_prompt_ids_match_lavis(blip_tok):
    _, tokens = fed("blip_caption")
    ids = caption_prompt_ids(blip_tok, "a picture of ", batch=2)
    assert ids.dtype == torch.long
    assert torch.equal(ids, tokens["greedy_prompt_ids"])  # [30522, 1037, 3861, 1997]
    assert ids.shape[1] == len(blip_tok("a picture of ").input_ids) - 1  # BLIP's prompt_length
    assert caption_prompt_ids(blip_tok, "", batch=1).tolist() == [[tk.DEC_TOKEN_ID]]


def test_decode_matches_lavis_strings(blip_tok, qformer_tok):
    outputs = torch.load(LAVIS / "blip_caption" / "outputs.pt", weights_only=True)
    for tag in ("greedy", "beam3", "beam3_default", "greedy_max20_min5"):
        assert blip_tok.batch_decode(outputs[f"{tag}_ids"], skip_special_tokens=True) == outputs[f"{tag}_decoded"]
    outputs = torch.load(LAVIS / "blip2_qformer" / "outputs.pt", weights_only=True)
    for tag in ("qformer_greedy", "qformer_beam3"):
        assert qformer_tok.batch_decode(outputs[f"{tag}_ids"], skip_special_tokens=True) == outputs[f"{tag}_captions"]


def test_truncation_keeps_sep_and_padding_is_right(blip_tok, lines):
    enc = tokenize(blip_tok, ["one two three four five six seven", "dog"], max_length=5)
    assert enc["input_ids"].tolist() == [
        [101, lines["one"], lines["two"], lines["three"], 102],
        [101, lines["dog"], 102, 0, 0],
    ]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    fixed = tokenize(blip_tok, "dog", max_length=6, padding="max_length")
    assert fixed["input_ids"].tolist() == [[101, lines["dog"], 102, 0, 0, 0]]
    with pytest.raises(ValueError, match="padding"):
        tokenize(blip_tok, "dog", 6, padding="left")


def test_empty_caption_names_index(blip_tok):
    with pytest.raises(ValueError, match="index 2"):
        tokenize(blip_tok, ["a dog", "a cat", "  \n", "a bird"], max_length=10)
    with pytest.raises(ValueError, match="index 1"):
        tokenize(blip_tok, ["a dog", None], max_length=10)
    assert tokenize(blip_tok, [""], max_length=10, allow_empty=True)["input_ids"].tolist() == [[101, 102]]


def test_source_vocab_file_and_dirs(tmp_path, blip_tok):
    from_file = get_tokenizer("blip", VOCAB)
    assert from_file.get_vocab() == blip_tok.get_vocab()
    # the tokenizer dir LAVIS loaded (vocab.txt + tokenizer_config.json, no [DEC]/[ENC] yet); its vocab.txt is
    # byte-identical to VOCAB, so the fixture keeps only its tokenizer_config.json
    lavis_dir = tmp_path / "bert-base-uncased"
    lavis_dir.mkdir()
    shutil.copy(VOCAB, lavis_dir / "vocab.txt")
    shutil.copy(LAVIS / "tokenizers" / "bert-base-uncased" / "tokenizer_config.json", lavis_dir)
    from_dir = get_tokenizer("blip", lavis_dir)
    assert len(from_dir) == 30524 and from_dir.convert_tokens_to_ids("[ENC]") == 30523
    # a saved BLIP tokenizer already holds [DEC]/[ENC]: reloading must not add them twice
    blip_tok.save_pretrained(tmp_path / "saved")
    again = get_tokenizer("blip", tmp_path / "saved")
    assert len(again) == 30524 and again.bos_token_id == 30522
    assert again("a dog")["input_ids"] == blip_tok("a dog")["input_ids"]
    with pytest.raises(ValueError, match="30523"):  # it has [ENC], which the Q-Former vocab must not
        get_tokenizer("blip2_qformer", tmp_path / "saved")


def test_source_with_wrong_size_is_rejected(tmp_path):
    vocab = VOCAB.read_text(encoding="utf-8")
    (tmp_path / "vocab.txt").write_text(vocab + "[extra]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[DEC\].*30522"):
        get_tokenizer("blip", tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="kind"):
        get_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError):
        get_tokenizer("blip", tmp_path / "missing.txt")
