"""BLIP-2 stage 1 against the LAVIS fixture (real LAVIS 1.0.2 outputs): both checkpoint files, every recorded output."""

import pytest
import torch

import blip
from blip.data.tokenizer import get_tokenizer
from blip.models.blip2_qformer import Blip2Qformer
from conftest import FIXTURES

FIX = FIXTURES / "lavis"
DIR = FIX / "blip2_qformer"


@pytest.fixture(scope="module")
def data():
    inputs = torch.load(DIR / "inputs.pt", weights_only=True)
    return inputs, inputs["tokens_as_fed"], torch.load(DIR / "outputs.pt", weights_only=True)


def _load(which: str) -> Blip2Qformer:
    if which == "full":
        return blip.load(DIR / "checkpoint.pth")
    return blip.load(DIR / "checkpoint_trainable_only.pth", vision_weights=FIX / "eva_vit_tiny.pth")


@pytest.fixture(scope="module", params=["full", "trainable_only+eva"])
def model(request):
    torch.set_num_threads(1)
    return _load(request.param)


def close(a, b, tol=1e-4):
    diff = (a - b).abs().max().item()
    assert diff <= tol, diff


@torch.no_grad()
def test_features(model, data):
    inputs, tok, out = data
    px = inputs["image"]
    close(model.image_features(px), out["vit_embeds"])
    f = model.extract_features(px, mode="image")
    close(f.image_embeds, out["image_embeds"])
    close(f.image_embeds_proj, out["image_embeds_proj"])
    ids, am = tok["features_text_input_ids"], tok["features_text_attention_mask"]
    f = model.extract_features(input_ids=ids, attention_mask=am, mode="text")
    close(f.text_embeds, out["text_embeds"])
    close(f.text_embeds_proj, out["text_embeds_proj"])
    f = model.extract_features(px, ids, am, mode="multimodal")
    close(f.multimodal_embeds, out["multimodal_embeds"])


@torch.no_grad()
def test_itm_all_pairs(model, data):
    inputs, tok, out = data
    vit = model.image_features(inputs["image"])
    i, j = zip(*inputs["itm_pairs"])
    logits = model.itm_logits_from_features(vit[list(i)], tok["itm_text_ids"][list(j)], tok["itm_text_atts"][list(j)])
    close(logits[:, 1], out["compute_itm"])
    # the pixel-level API gives the same numbers
    close(model.itm_logits(inputs["image"][list(i)], tok["itm_text_ids"][list(j)], tok["itm_text_atts"][list(j)]),
          logits, 1e-5)


@torch.no_grad()
def test_itc_head(model, data):
    inputs, tok, out = data
    ids, am = tok["fwd_text_input_ids"], tok["fwd_text_attention_mask"]
    img = torch.nn.functional.normalize(out["fwd_image_feats_unnormalized"], dim=-1)
    txt = torch.nn.functional.normalize(out["fwd_text_feat_unnormalized"], dim=-1)
    expected = torch.einsum("iqe,te->itq", img, txt).max(-1).values
    close(model.itc_similarity(inputs["image"], ids, am), expected)


@torch.no_grad()
def test_lm_pieces(model, data):
    inputs, tok, out = data
    logits = model(inputs["image"], tok["fwd_lm_input_ids"], tok["fwd_text_attention_mask"]).logits
    labels = tok["fwd_lm_labels"]
    nxt = torch.cat([labels[:, 1:], labels[:, -1:]], 1).clamp_min(0)  # README: last position = own label, -100 -> 0
    close(logits.gather(2, nxt[..., None])[..., 0], out["fwd_lm_next_label_logits"])
    close(logits.logsumexp(-1), out["fwd_lm_logsumexp"])
    assert torch.equal(logits.argmax(-1), out["fwd_lm_argmax"])


@torch.no_grad()
def test_qformer_captions(model, data):
    inputs, _, out = data
    # LAVIS generate(max_length=10, min_length=10) counts the [DEC] prompt token; transformers 4.26 beam lengths
    greedy = model.generate(inputs["image"], max_new_tokens=9, min_new_tokens=9)
    assert torch.equal(greedy, out["qformer_greedy_ids"])
    beam = model.generate(inputs["image"], max_new_tokens=9, min_new_tokens=9, num_beams=3,
                          beam_length_convention="total")
    assert torch.equal(beam, out["qformer_beam3_ids"])
    tok = get_tokenizer("blip2_qformer")
    assert tok.batch_decode(greedy, skip_special_tokens=True) == out["qformer_greedy_captions"]
    assert tok.batch_decode(beam, skip_special_tokens=True) == out["qformer_beam3_captions"]


def test_checkpoint_report_names_each_file():
    from blip.convert.blip2 import describe
    model = _load("trainable_only+eva")
    origins = model.load_report.origins
    assert origins["image_encoder.visual_encoder"].endswith("eva_vit_tiny.pth")
    assert all(v.endswith("checkpoint_trainable_only.pth") for k, v in origins.items() if "visual_encoder" not in k)
    assert "eva_vit_tiny.pth" in describe(model.load_report)


def test_missing_vit_and_double_vit_are_errors():
    from blip.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="vision_weights"):
        blip.load(DIR / "checkpoint_trainable_only.pth")
    with pytest.raises(CheckpointError, match="its own visual_encoder"):
        blip.load(DIR / "checkpoint.pth", vision_weights=FIX / "eva_vit_tiny.pth")


def test_unknown_keys_are_errors(tmp_path):
    from blip.checkpoints import CheckpointError, read_state_dict
    sd = read_state_dict(DIR / "checkpoint.pth")
    sd["Qformer.bert.pooler.dense.weight"] = torch.zeros(16, 16)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pooler"):
        blip.load(tmp_path / "bad.pth")


def test_string_level_caption_and_match(model, data):
    inputs, tok, out = data
    files = [str((DIR / f).resolve()) for f in inputs["raw_image_files"]]
    torch.testing.assert_close(model.pixel_values(files), inputs["image"], atol=1e-5, rtol=0)  # LAVIS eval transform
    assert model.caption(files, max_new_tokens=9, min_new_tokens=9) == out["qformer_beam3_captions"]
    result = model.match(files, inputs["text_input"])
    scores = result.itm_prob
    assert scores.shape == (3, 3) and ((scores > 0) & (scores < 1)).all()
    i, j = 1, 2
    logits = model.itm_logits(inputs["image"][i:i + 1], tok["itm_text_ids"][j:j + 1], tok["itm_text_atts"][j:j + 1])
    close(scores[i, j], logits.softmax(-1)[0, 1])
    close(result.itc_sim,
          model.itc_similarity(inputs["image"], tok["itm_text_ids"], tok["itm_text_atts"]))


def test_vision_weights_by_zoo_name(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("BLIP_HOME", str(tmp_path))
    shutil.copy(FIX / "eva_vit_tiny.pth", tmp_path / "eva_vit_g.pth")   # where blip.zoo expects "blip2-eva-vit-g"
    model = blip.load(DIR / "checkpoint_trainable_only.pth", vision_weights="blip2-eva-vit-g")
    assert model.load_report.origins["image_encoder.visual_encoder"] == str(tmp_path / "eva_vit_g.pth")


def test_own_safetensors_and_training_checkpoints_round_trip(tmp_path, data):
    from blip.convert.blip2 import save_safetensors
    inputs, tok, out = data
    model = _load("full")
    save_safetensors(model, tmp_path / "stage1.safetensors")
    back = blip.load(tmp_path / "stage1.safetensors")   # config from the metadata: no arch needed
    assert back.cfg == model.cfg
    ids, am = tok["itm_text_ids"][:2], tok["itm_text_atts"][:2]
    with torch.no_grad():
        assert torch.equal(back.itm_logits(inputs["image"][:2], ids, am),
                           model.itm_logits(inputs["image"][:2], ids, am))
    # a training checkpoint of the stage-1 objective (keys under "model.")
    objective = blip.load(DIR / "checkpoint.pth", task="stage1")
    torch.save({"model": objective.state_dict(), "step": 3}, tmp_path / "state.pt")
    again = blip.load(tmp_path / "state.pt")
    with torch.no_grad():
        assert torch.equal(again.generate(inputs["image"], max_new_tokens=9, min_new_tokens=9),
                           out["qformer_greedy_ids"])


def test_whole_model_in_bf16(data):
    inputs, tok, out = data
    model = blip.load(DIR / "checkpoint.pth", dtype=torch.bfloat16)
    i, j = zip(*inputs["itm_pairs"])
    with torch.no_grad():
        logits = model.itm_logits(inputs["image"][list(i)], tok["itm_text_ids"][list(j)], tok["itm_text_atts"][list(j)])
        assert model.image_features(inputs["image"]).dtype == torch.float32   # ln_vision computes in fp32
    close(logits[:, 1].float(), out["compute_itm"], tol=0.05)


@pytest.mark.parametrize("trainable_only", [False, True])
def test_export_lavis_reproduces_the_lavis_files(trainable_only):
    from blip.checkpoints import read_state_dict
    from blip.convert.blip2_lavis import export_lavis
    name = "checkpoint_trainable_only.pth" if trainable_only else "checkpoint.pth"
    original = read_state_dict(DIR / name)
    exported = export_lavis(_load("full"), trainable_only=trainable_only)
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k].to(v.dtype), v), k


def test_real_size_lavis_layout_round_trip():
    """blip2_vitg_qformer <-> the LAVIS blip2_pretrained.pth layout (lavis-and-blip-facts §3.3), on the meta device."""
    from blip.convert.blip2_lavis import export_lavis, lavis_stage1_to_ours
    with torch.device("meta"):
        model = blip.create_model("blip2_vitg_qformer", "qformer")
    lavis = export_lavis(model, trainable_only=True)
    assert lavis["query_tokens"].shape == (1, 32, 768) and lavis["ln_vision.weight"].shape == (1408,)
    assert lavis["Qformer.bert.embeddings.word_embeddings.weight"].shape == (30523, 768)
    cross = {int(k.split(".")[4]) for k in lavis if ".crossattention." in k}
    assert cross == {0, 2, 4, 6, 8, 10}
    assert lavis["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 1408)
    assert not any(k.startswith("visual_encoder.") for k in lavis)
    back, used = lavis_stage1_to_ours(lavis)
    assert used == set(lavis)
    own = model.state_dict()
    assert set(back) == {k for k in own if not k.startswith("image_encoder.visual_encoder.")}
    assert all(back[k].shape == own[k].shape for k in back)


def test_checkpoint_with_its_own_vit_decides_the_image_size(tmp_path):
    """LAVIS fine-tuned files (e.g. COCO at 364 px) carry their ViT; its position grid sets the model's image size."""
    from blip.checkpoints import read_state_dict
    from blip.nn.vit import resize_pos_embed
    sd = read_state_dict(DIR / "checkpoint.pth")
    sd["visual_encoder.pos_embed"] = resize_pos_embed(sd["visual_encoder.pos_embed"], 25)   # 4x4 -> 5x5 patches
    torch.save({"model": sd}, tmp_path / "finetuned.pth")
    model = blip.load(tmp_path / "finetuned.pth")
    assert model.cfg.vision.image_size == 70
    with torch.no_grad():
        assert model.image_features(torch.randn(1, 3, 70, 70)).shape == (1, 26, 48)
