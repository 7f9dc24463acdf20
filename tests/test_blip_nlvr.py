"""BLIP NLVR2 against the LAVIS reference fixture (logits and loss computed by LAVIS's own ``BlipNLVR`` from a tiny
random checkpoint in its key layout, described in the fixtures' README), plus the checkpoint conversions."""
import pytest
import torch

import blip
from blip.checkpoints import CheckpointError, read_state_dict
from blip.convert.blip import load_original, original_to_ours, ours_to_original
from blip.models.blip import BlipNLVR
from blip.objectives.blip_finetune import NLVRObjective

HEADS = dict(vision={"heads": 2}, text={"num_heads": 2})   # not stored in the shapes
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max() <= tol, (a - b).abs().max()


@pytest.fixture(scope="module")
def fix(fixtures):
    return fixtures / "lavis" / "blip_nlvr"


@pytest.fixture(scope="module")
def lavis(fix):
    inputs = torch.load(fix / "inputs.pt", weights_only=True)
    outputs = torch.load(fix / "outputs.pt", weights_only=True)
    return blip.load(fix / "checkpoint.pth", **HEADS), inputs, outputs


def test_lavis_logits_hidden_states_and_loss(lavis):
    model, inp, out = lavis
    assert isinstance(model, BlipNLVR)
    assert model.load_report.unused == ["text_encoder.embeddings.position_ids"]
    assert not model.load_report.expected_missing
    fed = inp["tokens_as_fed"]
    with torch.no_grad():
        res = model(inp["image0"], inp["image1"], fed["text_input_ids"], fed["text_attention_mask"])
        states = model.text_encoder(fed["text_input_ids"], attention_mask=fed["text_attention_mask"],
                                    encoder_hidden_states=res.image_embeds)
        # the objective tokenizes the raw sentences itself ([ENC] first, padded to the longest, not truncated)
        pairs = torch.stack([inp["image0"], inp["image1"]], dim=1)
        loss = NLVRObjective(model)({"pixel_values": pairs, "text": inp["text_input"], "label": inp["label"]})["loss"]
    close(res.image_embeds, out["image_embeds"])
    close(states, out["text_last_hidden_state"])
    close(res.logits, out["logits"])
    close(loss, out["loss"])
    assert torch.equal(res.logits.argmax(-1), out["predicted_class"])


def test_lavis_predict_from_the_raw_images(lavis, fix):
    model, inp, out = lavis
    left = [str(fix / f) for f in inp["raw_image0_files"]]
    right = [str(fix / f) for f in inp["raw_image1_files"]]
    assert model.predict(left, right, inp["text_input"]) == (out["predicted_class"] == 1).tolist()


def test_original_layout_round_trip_and_strict_accounting(fix):
    sd = read_state_dict(fix / "checkpoint.pth")
    ours = original_to_ours(sd)
    assert "text_encoder.layers.7.cross_attn.merge.weight" in ours and "cls_head.2.bias" in ours
    assert not any("merge" in k for k in ours if ".layers.5." in k)
    back = ours_to_original(ours)
    assert set(back) == set(sd) - {"text_encoder.embeddings.position_ids"}
    assert all(torch.equal(back[k], sd[k]) for k in back)

    for drop in ("text_encoder.encoder.layer.6.crossattention.output.merge_layer.weight",
                 "text_encoder.encoder.layer.0.crossattention.self1.key.weight", "cls_head.0.bias"):
        broken = {k: v for k, v in sd.items() if k != drop}
        with pytest.raises(CheckpointError):
            load_original(broken, "broken.pth", **HEADS)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_original({**sd, "text_encoder.pooler.dense.weight": torch.zeros(8, 8)}, "extra.pth", **HEADS)


def test_fine_tuning_starts_both_branches_from_the_single_cross_attention():
    """BLIP / LAVIS copy a pretrained cross-attention into both branches; averaged (layers < 6) over one image
    twice, the twin encoder must then equal the single-image encoder it came from."""
    torch.manual_seed(0)
    source = blip.create_model("blip_tiny", "retrieval").eval()
    sd = ours_to_original(source.state_dict())
    nlvr = load_original(sd, "retrieval.pth", task="nlvr", config=source.cfg)
    assert isinstance(nlvr, BlipNLVR)
    assert sorted(nlvr.load_report.expected_missing) == ["cls_head.0.bias", "cls_head.0.weight", "cls_head.2.bias",
                                                         "cls_head.2.weight"]   # 2 layers: no merge layer yet
    assert {k.split(".")[0] for k in nlvr.load_report.unused} >= {"vision_proj", "text_proj", "itm_head"}
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        twin = nlvr.text_encoder(ids, encoder_hidden_states=nlvr.image_embeds(pixels, pixels))
        single = source.multimodal_embeds(source.image_embeds(pixels), ids)
    close(twin, single)


def test_create_model_base_nlvr_structure():
    assert ("blip_base", "nlvr") in blip.list_models()
    with torch.device("meta"):
        model = blip.create_model("blip_base", "nlvr")
    merge = sorted(int(k.split(".")[2]) for k in model.state_dict() if k.endswith("cross_attn.merge.weight"))
    assert merge == list(range(6, 12))   # BLIP's nlvr_encoder: layers >= 6 merge, earlier ones average
    assert model.cls_head[2].out_features == 2 and model.cfg.image_size == 384


def test_safetensors_export_round_trip(lavis, tmp_path):
    from blip.convert.blip import save_safetensors
    model, inp, out = lavis
    again = blip.load(save_safetensors(model, tmp_path / "nlvr.safetensors"))
    assert isinstance(again, BlipNLVR) and again.cfg == model.cfg
    fed = inp["tokens_as_fed"]
    with torch.no_grad():
        logits = again(inp["image0"], inp["image1"], fed["text_input_ids"], fed["text_attention_mask"]).logits
    close(logits, out["logits"])
