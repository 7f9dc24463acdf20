"""BLIP-2 stage 1 against HF transformers' Blip2ForImageTextRetrieval: loading its directories and exporting to them."""
import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

import blip
from blip import create_model as create
from blip.convert.blip2_hf import export_hf_qformer as export_hf

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)
QFORMER = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               cross_attention_frequency=2, max_position_embeddings=64, use_qformer_text_input=True)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-trivial (HF zero-inits biases and query tokens; norms get weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5 * 1.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    px = torch.randn(3, 3, 28, 28)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 8, 9, 0, 0, 0], [1, 11, 12, 13, 2, 0]])  # padded text
    return px, ids, (ids != 0).long()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(Blip2Config(vision_config=VISION, qformer_config=QFORMER, num_query_tokens=5,
                                                   image_text_hidden_size=16)).eval()
    _randomize(model, 1)
    return model


def _hf_scores(model, px, ids, am):
    with torch.no_grad():
        itm = model(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=True)
        itc = model(pixel_values=px, input_ids=ids, attention_mask=am, use_image_text_matching_head=False)
    return itm.logits_per_image, itc.logits_per_image


def test_load_hf_directory_matches_hf(hf_model, inputs, tmp_path):
    px, ids, am = inputs
    hf_model.save_pretrained(tmp_path)
    ours = blip.load(tmp_path)
    hf_itm, hf_itc = _hf_scores(hf_model, px, ids, am)
    with torch.no_grad():
        itm, itc = ours.itm_logits(px, ids, am), ours.itc_similarity(px, ids, am)
    assert itm.shape == (3, 2) and itc.shape == (3, 3)
    assert (itm - hf_itm).abs().max() <= 1e-4
    assert (itc - hf_itc).abs().max() <= 1e-4
    assert hf_itc.std() > 1e-2 and (hf_itm[:, 1] - hf_itm[:, 0]).std() > 1e-2  # the comparison is not vacuous
    # HF carries no ITG head: captioning refuses instead of decoding from random weights
    assert not ours.has_lm_head
    with pytest.raises(ValueError, match="ITG"):
        ours.generate(px)
    assert set(ours.load_report.expected_missing) == {"lm_head.dense.weight", "lm_head.dense.bias",
                                                      "lm_head.norm.weight", "lm_head.norm.bias", "lm_head.bias",
                                                      "temp"}


def test_export_loads_in_transformers_with_same_scores(inputs, tmp_path):
    px, ids, am = inputs
    torch.manual_seed(3)
    ours = create("blip2_tiny_qformer", "qformer").eval()
    _randomize(ours, 4)
    export_hf(ours, tmp_path)
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    px56 = torch.nn.functional.interpolate(px, size=56)
    ids = ids.clamp_max(30000) * 97  # any ids of the 30523-token vocab
    hf_itm, hf_itc = _hf_scores(hf, px56, ids, am)
    with torch.no_grad():
        itm, itc = ours.itm_logits(px56, ids, am), ours.itc_similarity(px56, ids, am)
    # HF has one vision LayerNorm eps (1e-6) where LAVIS's ln_vision uses 1e-5: ~1e-6 relative
    assert (itm - hf_itm).abs().max() <= 1e-4
    assert (itc - hf_itc).abs().max() <= 1e-4
    # and the exported directory loads back into an identical model
    back = blip.load(tmp_path)
    with torch.no_grad():
        assert (back.itm_logits(px56, ids, am) - hf_itm).abs().max() <= 1e-4


def test_own_format_keeps_the_missing_lm_head_marked(hf_model, tmp_path):
    from blip.convert.blip2 import save_safetensors
    hf_model.save_pretrained(tmp_path / "hf")
    save_safetensors(blip.load(tmp_path / "hf"), tmp_path / "ours.safetensors")
    assert not blip.load(tmp_path / "ours.safetensors").has_lm_head


def test_real_size_keys_and_shapes_match_hf_blip2_itm_vit_g():
    """blip2_vitg_qformer <-> HF Blip2ForImageTextRetrieval at the real sizes (blip2-itm-vit-g config), on the meta
    device: every HF tensor is produced with its shape, and every one of ours is consumed."""
    from blip.convert.blip2_parts import hf_qformer_to_ours, hf_vision_to_ours
    from blip.convert.blip2_hf import to_hf_state_dict
    with torch.device("meta"):
        ours = create("blip2_vitg_qformer", "qformer")
        hf = Blip2ForImageTextRetrieval(Blip2Config(qformer_config=dict(vocab_size=30523, use_qformer_text_input=True)))
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    converted = to_hf_state_dict(ours)
    assert set(converted) == set(hf_sd)
    assert all(converted[k].shape == hf_sd[k].shape for k in hf_sd)
    assert sum(k.startswith("vision_model.encoder.layers.") and k.endswith("qkv.weight") for k in hf_sd) == 39
    back, used = hf_vision_to_ours(hf_sd)
    qf, qf_used = hf_qformer_to_ours(hf_sd)
    back.update(qf)
    ours_sd = ours.state_dict()
    expected_missing = {k for k in ours_sd
                        if k.startswith(("lm_head.", "temp", "vision_proj", "text_proj", "itm_head"))}
    assert set(back) == set(ours_sd) - expected_missing
    assert all(back[k].shape == ours_sd[k].shape for k in back)
