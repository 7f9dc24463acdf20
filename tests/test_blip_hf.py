"""BLIP task models against HF transformers (float32, CPU): each HF model is saved with save_pretrained and loaded
with blip.load(dir) — the real loading path — then compared; and our HF export round-trips through transformers."""
import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

import blip
from blip.convert.blip import export_hf
from blip.models.blip import BlipCaption, BlipRetrieval, BlipVQA

BOS, EOS_HF, PAD, SEP = 97, 2, 0, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hf_config(layer_norm_eps=1e-5):
    # section 4 of hf-openclip-timm-facts.md; vision init raised from HF's 1e-10 so outputs depend on the image
    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.02, layer_norm_eps=layer_norm_eps),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                         bos_token_id=BOS, eos_token_id=EOS_HF, pad_token_id=PAD, sep_token_id=SEP),
        projection_dim=16, image_text_hidden_size=16)


def build(cls, tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    hf = cls(hf_config(**kw)).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, blip.load(tmp_path / "hf")


PX = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, 9, 10, 11, 0]])
AM = (IDS != 0).long()


def until_eos(ids, eos=SEP):
    """HF 5.x fills finished beams with eos instead of pad when pad_token_id is 0 (``pad or eos``): compare
    every row up to and including its first eos."""
    rows = []
    for row in ids.tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_caption_logits(tmp_path, eps):
    hf, ours = build(BlipForConditionalGeneration, tmp_path, layer_norm_eps=eps)
    assert isinstance(ours, BlipCaption) and ours.cfg.vision.layer_norm_eps == eps
    with torch.no_grad():
        ref = hf(pixel_values=PX, input_ids=IDS, attention_mask=AM).logits
        got = ours(PX, IDS, AM).logits
    assert got.shape == ref.shape == (2, 5, 99)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_caption_greedy_and_beam_ids(tmp_path, seed):
    hf, ours = build(BlipForConditionalGeneration, tmp_path, seed=seed)
    prompt = IDS[:, :4]  # same-length prompts; HF drops the last input token (it assumes a trailing [SEP])
    hf_in = torch.cat([prompt, torch.full((2, 1), SEP)], 1)
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=8, min_new_tokens=5), dict(max_new_tokens=6, num_beams=3),
               dict(max_new_tokens=8, num_beams=3, min_new_tokens=4, length_penalty=0.6),
               dict(max_new_tokens=7, num_beams=3, repetition_penalty=1.5)):
        ref = hf.generate(pixel_values=PX, input_ids=hf_in.clone(), do_sample=False, **kw)
        got = ours.generate(PX, prompt, **kw)
        assert got[:, :4].tolist() == prompt.tolist()
        assert got.shape == ref.shape, kw
        if kw.get("num_beams", 1) > 1:
            assert until_eos(got) == until_eos(ref), kw
        else:
            assert torch.equal(got, ref), kw
    # no prompt: HF starts from [bos]; so do we
    ref = hf.generate(pixel_values=PX, max_new_tokens=6, num_beams=3)
    assert until_eos(ours.generate(PX, max_new_tokens=6, num_beams=3)) == until_eos(ref)


def test_caption_nucleus_sampling_ids(tmp_path):
    """Same global RNG state -> the same samples: HF's top_k (default 50!), top_p, temperature and repetition
    penalty are applied as ours, and both draw one torch.multinomial per step."""
    hf, ours = build(BlipForConditionalGeneration, tmp_path)
    prompt = IDS[:, :4]
    for kw in (dict(top_p=0.9, top_k=0, temperature=0.8), dict(top_p=0.5, top_k=0),
               dict(top_p=0.9, top_k=50, repetition_penalty=1.1), dict(top_k=5, temperature=1.3)):
        torch.manual_seed(5)
        ref = hf.generate(pixel_values=PX, input_ids=torch.cat([prompt, torch.full((2, 1), SEP)], 1), do_sample=True,
                          max_new_tokens=8, **kw)
        torch.manual_seed(5)
        assert torch.equal(ours.generate(PX, prompt, do_sample=True, max_new_tokens=8, **kw), ref), kw


def test_caption_sep_stops_generation(tmp_path):
    hf, ours = build(BlipForConditionalGeneration, tmp_path, seed=3)
    with torch.no_grad():  # make [SEP] likely so that rows finish early and get padded
        hf.text_decoder.cls.predictions.bias[SEP] += 4.0
        ours.text_decoder.lm_head.bias[SEP] += 4.0
    ref = hf.generate(pixel_values=PX, input_ids=torch.tensor([[BOS, 5, SEP], [BOS, 9, SEP]]), max_new_tokens=10)
    got = ours.generate(PX, torch.tensor([[BOS, 5], [BOS, 9]]), max_new_tokens=10)
    assert (got == SEP).any() and torch.equal(got, ref)


def test_retrieval_itm_and_itc(tmp_path):
    hf, ours = build(BlipForImageTextRetrieval, tmp_path)
    assert isinstance(ours, BlipRetrieval)
    with torch.no_grad():
        itm = hf(input_ids=IDS, pixel_values=PX, attention_mask=AM, use_itm_head=True).itm_score
        itc = hf(input_ids=IDS, pixel_values=PX, attention_mask=AM, use_itm_head=False).itm_score
        got_itm, got_itc = ours.itm_logits(PX, IDS, AM), ours.itc_similarity(PX, IDS, AM)
        out = ours(PX, IDS, AM)
    assert (got_itm - itm).abs().max() < 1e-4 and (got_itc - itc).abs().max() < 1e-4
    assert torch.allclose(out.itm_logits, got_itm, atol=1e-6) and torch.allclose(out.itc_similarity, got_itc, atol=1e-6)
    assert itc.std() > 1e-3  # the check is not vacuous: similarities differ across pairs


def test_vqa_generate_answers(tmp_path):
    hf, ours = build(BlipForQuestionAnswering, tmp_path)
    assert isinstance(ours, BlipVQA)
    for kw in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3), dict(max_new_tokens=5, min_new_tokens=3)):
        ref = hf.generate(input_ids=IDS, pixel_values=PX, attention_mask=AM, **kw)
        got = ours.generate(PX, IDS, AM, **kw)  # HF's decoder also attends to padded question positions
        assert got.shape == ref.shape and until_eos(got) == until_eos(ref), kw
        if kw.get("num_beams", 1) == 1:
            assert torch.equal(got, ref)


@pytest.mark.parametrize("cls", [BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering])
def test_export_round_trip_through_transformers(tmp_path, cls):
    _, ours = build(cls, tmp_path, seed=4, layer_norm_eps=1e-6)
    export_hf(ours, tmp_path / "export")
    back = cls.from_pretrained(tmp_path / "export").eval()
    again = blip.load(tmp_path / "export")
    with torch.no_grad():
        if cls is BlipForConditionalGeneration:
            pairs = [(back(pixel_values=PX, input_ids=IDS, attention_mask=AM).logits, ours(PX, IDS, AM).logits),
                     (again(PX, IDS, AM).logits, ours(PX, IDS, AM).logits)]
        elif cls is BlipForImageTextRetrieval:
            pairs = [(back(input_ids=IDS, pixel_values=PX, attention_mask=AM).itm_score, ours.itm_logits(PX, IDS, AM)),
                     (back(input_ids=IDS, pixel_values=PX, attention_mask=AM, use_itm_head=False).itm_score,
                      ours.itc_similarity(PX, IDS, AM))]
        else:
            pairs = [(back.generate(input_ids=IDS, pixel_values=PX, attention_mask=AM, max_new_tokens=6),
                      ours.generate(PX, IDS, AM, max_new_tokens=6))]
    for a, b in pairs:
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() < 1e-5
