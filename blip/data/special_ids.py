"""The token ids BLIP and BLIP-2 give a meaning to (bert-base-uncased's, plus BLIP's added ``[DEC]`` and ``[ENC]``).

A module of its own so models can name them without importing the tokenizer (and transformers)."""
PAD_TOKEN_ID = 0
UNK_TOKEN_ID = 100
CLS_TOKEN_ID = 101
SEP_TOKEN_ID = 102
DEC_TOKEN_ID = 30522   # decoder bos: first token of every decoder / LM input
ENC_TOKEN_ID = 30523   # first token of BLIP's ITM and VQA question inputs
