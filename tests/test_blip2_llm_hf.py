"""BLIP-2 LLM models against HF transformers (float32, CPU, tiny random configs).

HF models are saved with ``save_pretrained`` and loaded with ``blip.load(dir)``. HF 5.x expects ``<image>``
placeholder ids (``image_token_index``) in ``input_ids``; HF gets those expanded ids, blip gets the plain prompt.
"""
import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

import blip
from tiny_weights import randomize

NQ, IMG = 4, 98
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
QFORMER = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               cross_attention_frequency=1, max_position_embeddings=64)
OPT = OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1)
T5 = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1)




def build(cls, config, tmp_path, seed):
    hf = cls(config).eval()
    randomize(hf, seed)
    hf.save_pretrained(tmp_path)
    return hf, blip.load(tmp_path)


def images(n=2, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def expand(ids):
    return torch.cat([torch.full((ids.shape[0], NQ), IMG), ids], 1)


@pytest.fixture(scope="module")
def opt_pair(tmp_path_factory):
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT.to_dict(), num_query_tokens=NQ,
                      image_token_index=IMG)
    return build(Blip2ForConditionalGeneration, cfg, tmp_path_factory.mktemp("blip2_opt"), 1)


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=T5.to_dict(), num_query_tokens=NQ,
                      image_token_index=IMG)
    return build(Blip2ForConditionalGeneration, cfg, tmp_path_factory.mktemp("blip2_t5"), 2)


PROMPT = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])


def test_opt_logits(opt_pair):
    hf, ours = opt_pair
    px = images()
    with torch.no_grad():
        ref = hf(pixel_values=px, input_ids=expand(PROMPT)).logits[:, NQ:]
        got = ours(px, PROMPT).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, length_penalty=0.5),
                                dict(num_beams=1, min_new_tokens=6), dict(num_beams=1, eos_token_id=32),
                                dict(num_beams=3, eos_token_id=32, min_new_tokens=3)])
def test_opt_generate_ids(opt_pair, kw):
    hf, ours = opt_pair
    px = images(seed=3)
    ref = hf.generate(pixel_values=px, input_ids=expand(PROMPT), max_new_tokens=8, do_sample=False, **kw)
    got = ours.generate(px, PROMPT, max_new_tokens=8, **kw)
    assert torch.equal(got, ref[:, NQ:]), (got, ref)
    # no prompt at all: both start from the bos
    ref = hf.generate(pixel_values=px, max_new_tokens=8, do_sample=False, **kw)
    assert torch.equal(ours.generate(px, max_new_tokens=8, **kw), ref[:, NQ:])


def test_opt_placeholders_rejected(opt_pair):
    _, ours = opt_pair
    with pytest.raises(ValueError, match="placeholder"):
        ours(images(), expand(PROMPT))
    with pytest.raises(ValueError, match="pixel_values"):
        ours(None, PROMPT)


T5_IDS = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
T5_LABELS = torch.tensor([[10, 11, 1], [12, 1, -100]])


def test_t5_logits(t5_pair):
    hf, ours = t5_pair
    px, mask = images(), (T5_IDS != 0).long()
    with torch.no_grad():
        full_mask = torch.cat([torch.ones(2, NQ, dtype=torch.long), mask], 1)
        ref = hf(pixel_values=px, input_ids=expand(T5_IDS), attention_mask=full_mask, labels=T5_LABELS).logits
        dec = hf.language_model._shift_right(T5_LABELS)
        got = ours(px, T5_IDS, mask, decoder_input_ids=dec).logits
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, min_new_tokens=5),
                                dict(num_beams=1, eos_token_id=78), dict(num_beams=3, eos_token_id=71)])
def test_t5_generate_ids(t5_pair, kw):
    hf, ours = t5_pair
    px, mask = images(seed=4), (T5_IDS != 0).long()
    full_mask = torch.cat([torch.ones(2, NQ, dtype=torch.long), mask], 1)
    ref = hf.generate(pixel_values=px, input_ids=expand(T5_IDS), attention_mask=full_mask, max_new_tokens=7,
                      do_sample=False, **kw)
    got = ours.generate(px, T5_IDS, mask, max_new_tokens=7, **kw)
    assert torch.equal(got, ref), (got, ref)


def test_opt_batched_prompts_of_different_lengths(opt_pair):
    """Left padding done right: HF with left-padded expanded ids, blip with a right-padded batch, each prompt alone."""
    hf, ours = opt_pair
    px = images(seed=6)
    rows = [[2, 5, 6, 7, 8], [2, 9]]
    right = torch.tensor([r + [1] * (5 - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows])
    left = torch.tensor([[1] * (5 - len(r)) + r for r in rows])
    left_mask = right_mask.flip(1)
    for kw in (dict(num_beams=1), dict(num_beams=3)):
        hf_ids = torch.tensor([[1] * (5 - len(r)) + [IMG] * NQ + r for r in rows])  # left padded, as HF wants
        ref = hf.generate(pixel_values=px, input_ids=hf_ids, attention_mask=(hf_ids != 1).long(), max_new_tokens=6,
                          do_sample=False, **kw)
        got = ours.generate(px, right, right_mask, max_new_tokens=6, **kw)
        assert torch.equal(got[:, -6:], ref[:, -6:]), (got, ref)
        assert torch.equal(got, ours.generate(px, left, left_mask, max_new_tokens=6, **kw))
        for i, r in enumerate(rows):
            alone = ours.generate(px[i:i + 1], torch.tensor([r]), max_new_tokens=6, **kw)
            assert torch.equal(alone[0, -6:], got[i, -6:])


@pytest.mark.parametrize("arch,token", [("blip2_tiny_opt", 511), ("blip2_tiny_t5", 415), ("blip2_tiny_llama", 511)])
def test_export_hf_round_trip(tmp_path, arch, token):
    """blip -> HF directory: transformers' own Blip2ForConditionalGeneration reproduces our ids; blip.load reads it
    back."""
    from blip.convert.blip2_hf import export_hf_llm as export_hf
    from blip.models.blip2_llm import create

    model = create(arch, "stage2").eval()
    randomize(model, 11)
    export_hf(model, tmp_path, image_token_index=token)
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    px, ids = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1)), PROMPT
    nq = model.qformer.num_queries
    hf_ids = torch.cat([torch.full((2, nq), token), ids], 1)
    ref = hf.generate(pixel_values=px, input_ids=hf_ids, max_new_tokens=6, num_beams=3, do_sample=False)
    got = model.generate(px, ids, max_new_tokens=6, num_beams=3)
    assert torch.equal(got, ref if model.is_seq2seq else ref[:, nq:])
    back = blip.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_real_size_keys_and_shapes_match_hf():
    """blip2_vitg_opt2.7b / blip2_vitg_flant5xl / instructblip_vicuna7b <-> HF at the real sizes (hub configs: OPT-2.7b,
    flan-t5-xl and Vicuna-7b text configs, default vision / Q-Former), on the meta device: every HF tensor maps onto
    one of ours with its shape and every one of ours is covered."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig

    from blip.convert.blip2_hf import hf_llm_to_ours as hf_to_ours
    from blip.models.blip2_llm import create

    opt = OPTConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, vocab_size=50304,
                    word_embed_proj_dim=2560, max_position_embeddings=2048)
    t5 = T5Config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32001)
    cases = [(Blip2ForConditionalGeneration, Blip2Config, opt, "blip2_vitg_opt2.7b", "stage2"),
             (Blip2ForConditionalGeneration, Blip2Config, t5, "blip2_vitg_flant5xl", "stage2"),
             (InstructBlipForConditionalGeneration, InstructBlipConfig, vicuna, "instructblip_vicuna7b", "instruct")]
    for hf_cls, cfg_cls, text, arch, task in cases:
        qformer = dict(vocab_size=30523) if task == "instruct" else {}  # the hub InstructBLIP Q-Former has [DEC]
        with torch.device("meta"):
            hf = hf_cls(cfg_cls(text_config=text.to_dict(), qformer_config=qformer, num_query_tokens=32))
            ours = create(arch, task, llm=text.to_dict())
        hf_sd = hf.state_dict()
        out, used = hf_to_ours(hf_sd, instruct=task == "instruct")
        assert used | {k for k in hf_sd if k.endswith("position_ids")} == set(hf_sd), arch
        own = ours.state_dict()
        assert set(out) == set(own), (arch, set(out) ^ set(own))
        assert all(out[k].shape == own[k].shape for k in own), arch
        assert own["qformer.query_tokens"].shape == (1, 32, 768)
