"""BLIP / BLIP-2 text side: the bert-base-uncased tokenizer plus BLIP's special-token conventions.

BLIP adds `[DEC]` (decoder bos, id 30522) and `[ENC]` (id 30523) to bert-base-uncased (30524 tokens, the MED vocab);
the BLIP-2 Q-Former adds only `[DEC]` (30523 tokens). Text is always tokenized as `[CLS] ... [SEP]`; callers then
overwrite position 0 (`with_first_token`): `[DEC]` for every decoder / LM input, `[ENC]` for the BLIP ITM and VQA
question encoder, `[CLS]` kept for ITC and every Q-Former encoder use. The tensor-level model API never does this for
you, so string-level code goes through the helpers below.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from .special_ids import (CLS_TOKEN_ID, DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID,  # noqa: F401  (re-exported)
                          SEP_TOKEN_ID, UNK_TOKEN_ID)

DEFAULT_VOCAB = Path(__file__).resolve().parent / "assets" / "bert-base-uncased-vocab.txt"

# kind -> (tokens that must sit at these ids, final length)
_KINDS: dict[str, tuple[dict[str, int], int]] = {
    "blip": ({"[DEC]": DEC_TOKEN_ID, "[ENC]": ENC_TOKEN_ID}, 30524),
    "blip2_qformer": ({"[DEC]": DEC_TOKEN_ID}, 30523),
}


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt (one token per line, id = line number) -> {token: id}; a CheckpointError naming a file that is not
    UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}
    except ValueError as e:  # UnicodeDecodeError
        from blip.checkpoints import CheckpointError
        raise CheckpointError(f"{path}: not a vocab.txt (one UTF-8 token per line: {e}); use bert-base-uncased's "
                              "vocab.txt") from None


def _from_vocab_file(path: Path) -> PreTrainedTokenizerBase:
    vocab = _read_vocab(path)
    # transformers>=5 builds from a `vocab` dict and silently ignores `vocab_file`; 4.x only knows `vocab_file`.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    else:
        tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True, model_max_length=512)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tokenizer built from {path} has {len(tok)} tokens, the file has {len(vocab)} lines")
    return tok


def get_tokenizer(kind: str = "blip", source: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The BLIP tokenizer (`kind="blip"`, 30524 tokens) or the BLIP-2 Q-Former one (`"blip2_qformer"`, 30523).

    `source`: a bert-base-uncased `vocab.txt`, or a directory with tokenizer files (e.g. an HF checkpoint dir, which
    may already contain `[DEC]`/`[ENC]`; they are not added twice). Default: the vocab shipped with the package.
    Never downloads. Raises ValueError if the special tokens would not land on ids 30522/30523.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}")
    required, expected_len = _KINDS[kind]
    path = Path(source) if source is not None else DEFAULT_VOCAB
    if path.is_dir():
        from blip.checkpoints import hf_pretrained

        tok = hf_pretrained(BertTokenizerFast, path)
    elif path.is_file():
        tok = _from_vocab_file(path)
    else:
        raise FileNotFoundError(f"tokenizer source {str(path)!r} is neither a vocab.txt file nor a directory")

    vocab = tok.get_vocab()
    for token, want in required.items():
        have = vocab.get(token)
        if have is None and len(tok) != want:
            raise ValueError(
                f"cannot add {token} to the tokenizer from {str(path)!r}: it has {len(tok)} tokens, so {token} would "
                f"get id {len(tok)} instead of {want}. Use the bert-base-uncased vocab (30522 tokens)."
            )
        if have is not None and have != want:
            raise ValueError(f"tokenizer from {str(path)!r} has {token} at id {have}, BLIP expects {want}")
        if token == "[DEC]":
            tok.add_special_tokens({"bos_token": "[DEC]"})  # sets bos; adds the token only if missing
        elif have is None:
            tok.add_special_tokens({"additional_special_tokens": [token]})
        vocab = tok.get_vocab()
        if vocab.get(token) != want:
            raise ValueError(f"{token} got id {vocab.get(token)}, BLIP expects {want}")
    if len(tok) != expected_len:
        raise ValueError(
            f"tokenizer from {str(path)!r} has {len(tok)} tokens after adding BLIP's special tokens; "
            f"kind {kind!r} needs exactly {expected_len}"
        )
    return tok


def _check_texts(texts: str | Sequence[str], allow_empty: bool) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("no texts given: pass at least one caption / question")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text at index {i} is {type(text).__name__} ({text!r}), expected a string")
        if not allow_empty and not text.strip():
            raise ValueError(f"text at index {i} is empty ({text!r}); every caption/question needs some words")
    return texts


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    max_length: int,
    padding: str = "longest",
    allow_empty: bool = False,
) -> dict[str, torch.Tensor]:
    """`[CLS] tokens [SEP]`, truncated to `max_length` (the [SEP] is kept), right-padded with [PAD].

    padding: "longest" (pad to the longest text) or "max_length" (always `max_length` columns).
    Returns {"input_ids": LongTensor [B, T], "attention_mask": LongTensor [B, T]}.
    Raises ValueError naming the index of an empty (or non-string) text unless `allow_empty`.
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    texts = _check_texts(texts, allow_empty)
    enc = tokenizer(
        texts, padding=padding, truncation=True, max_length=max_length, padding_side="right", return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tokenize_to(tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str], max_length: int,
                device: torch.device | str, padding: str = "longest", first_token: int | None = None,
                allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tokenize`, position 0 replaced by ``first_token`` when given (:func:`with_first_token`), on ``device``:
    (input_ids [B, T], attention_mask [B, T])."""
    enc = tokenize(tokenizer, texts, max_length, padding=padding, allow_empty=allow_empty)
    ids = enc["input_ids"] if first_token is None else with_first_token(enc["input_ids"], first_token)
    return ids.to(device), enc["attention_mask"].to(device)


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Copy of `input_ids` [..., T] with position 0 replaced (LAVIS: [CLS] -> [DEC] for decoders, [ENC] for ITM)."""
    out = input_ids.clone()
    out[..., 0] = token_id
    return out


def caption_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, batch: int) -> torch.Tensor:
    """BLIP caption prompt as fed to `generate`: `[DEC] prompt-tokens`, no trailing [SEP]. LongTensor [batch, P].

    P = len(tokenizer(prompt).input_ids) - 1 = BLIP's `prompt_length` (e.g. "a picture of " -> 4).
    """
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][:-1]
    ids[0] = DEC_TOKEN_ID
    return torch.tensor([ids] * batch, dtype=torch.long)
