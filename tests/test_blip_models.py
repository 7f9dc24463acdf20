"""BLIP architectures, feature extractor, own safetensors format, gradient checkpointing and the string API on
real and unusual image files."""
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

import blip
from blip.convert.blip import ARCHS, config_from_hf, hf_to_ours, save_safetensors
from blip.data.images import ImageDecodeError
from blip import create_model as create
from blip.models.blip import BlipFeatureExtractor
from conftest import FIXTURES

ASSETS = FIXTURES / "images"
FIX = FIXTURES / "lavis"
HF_CLASSES = {"caption": BlipForConditionalGeneration, "retrieval": BlipForImageTextRetrieval,
              "vqa": BlipForQuestionAnswering}
# the hub configs of Salesforce/blip-*-base and -large differ from HF's code defaults only in these fields
HF_HUB = {"blip_base": BlipConfig(text_config=dict(num_attention_heads=12)),
          "blip_large": BlipConfig(vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                      intermediate_size=4096),
                                   text_config=dict(num_attention_heads=12))}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# No ViT-L VQA exists (BLIP's "capfilt_large" VQA is ViT-B); HF would give its answer decoder 1024-wide
# cross-attention inputs although the question states are 768 wide, ours uses the text width.
@pytest.mark.parametrize("arch,task", [("blip_base", "caption"), ("blip_base", "retrieval"), ("blip_base", "vqa"),
                                       ("blip_large", "caption"), ("blip_large", "retrieval")])
def test_full_size_archs_match_hf_key_for_key(arch, task, tmp_path):
    """Built on the meta device: every HF tensor maps onto one of ours with the same shape, and vice versa."""
    with torch.device("meta"):
        hf = HF_CLASSES[task](HF_HUB[arch])
        ours = create(arch, task)
    theirs = {k: v.shape for k, v in hf_to_ours(hf.state_dict()).items()
              if not k.startswith("text_decoder.cls.predictions.decoder.")}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}
    HF_HUB[arch].save_pretrained(tmp_path)
    from_hf = config_from_hf(tmp_path)
    assert from_hf.vision.layer_norm_eps == 1e-5  # HF's default; the original BLIP ViT (ours) uses 1e-6
    # HF's hub configs train without dropout / drop-path; BLIP's own configs (ours) use 0.1
    assert (from_hf.text.hidden_dropout, from_hf.text.attention_dropout) == (0.0, 0.0)
    regularised = replace(from_hf, vision=replace(from_hf.vision, layer_norm_eps=1e-6,
                                                  drop_path=ARCHS[arch].vision.drop_path),
                          text=replace(from_hf.text, hidden_dropout=0.1, attention_dropout=0.1))
    assert regularised == ARCHS[arch]


def test_feature_extractor_against_lavis_itm_fixture():
    inp = torch.load(FIX / "blip_itm" / "inputs.pt", weights_only=True)
    out = torch.load(FIX / "blip_itm" / "outputs.pt", weights_only=True)
    model = blip.load(FIX / "blip_itm" / "checkpoint.pth", task="feature_extractor", vision={"heads": 4},
                      text={"num_heads": 2})
    assert isinstance(model, BlipFeatureExtractor) and "itm_head.weight" in model.load_report.unused
    itm_head = torch.nn.Linear(16, 2)
    sd = torch.load(FIX / "blip_itm" / "checkpoint.pth", weights_only=True)["model"]
    itm_head.load_state_dict({"weight": sd["itm_head.weight"], "bias": sd["itm_head.bias"]})
    img, _ = zip(*inp["itm_pairs"])
    with torch.no_grad():
        f_img = model.extract_features(inp["image"], mode="image")
        f_txt = model.extract_features(input_ids=out["itc_input_ids"], attention_mask=out["itc_attention_mask"],
                                       mode="text")
        f_mm = model.extract_features(inp["image"][list(img)], out["itm_input_ids"], out["itm_attention_mask"])
    assert (f_img.image_embeds - out["image_embeds"]).abs().max() < 1e-4
    assert (f_txt.text_embeds[:, 0] - out["itc_text_cls"]).abs().max() < 1e-4
    sim = f_img.image_embeds_proj[:, 0] @ f_txt.text_embeds_proj[:, 0].t()
    assert (sim - out["itc_sim"]).abs().max() < 1e-4
    assert (itm_head(f_mm.multimodal_embeds[:, 0]) - out["itm_logits"]).abs().max() < 1e-4
    assert torch.allclose(f_img.image_embeds_proj.norm(dim=-1), torch.ones(2, 17))


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa", "feature_extractor"])
def test_own_safetensors_round_trip(task, tmp_path):
    torch.manual_seed(0)
    model = create("blip_tiny", task, vision={"heads": 2}, text={"num_heads": 8}).eval()
    path = save_safetensors(model, tmp_path / "m.safetensors")
    back = blip.load(path)  # exact config and task come from the file's metadata
    assert type(back) is type(model) and back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = create("blip_tiny", "caption").train()
    px, ids = torch.randn(2, 3, 64, 64), torch.randint(1000, 2000, (2, 6))

    def grads():
        model.zero_grad()
        model(px, ids).logits.logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.visual_encoder.grad_checkpointing and model.text_decoder.transformer.grad_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_tokenizer_is_built_lazily():
    code = ("import sys, blip; from blip.models.blip import create; m = create('blip_tiny', 'caption'); "
            "assert 'blip.data.tokenizer' not in sys.modules and '_tokenizer' not in m.__dict__; "
            "assert len(m.tokenizer) == 30524 and 'blip.data.tokenizer' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return create("blip_tiny", "caption").eval()


GOOD = sorted(p for p in ASSETS.glob("*.jpg")) + [ASSETS / "unusual" / n for n in (
    "cmyk.jpg", "exif_rotated.jpg", "grayscale.png", "one_pixel.png", "palette.gif", "rgba.png", "very_wide.jpg")]
BAD = [ASSETS / "unusual" / n for n in ("empty.jpg", "not_an_image.jpg", "truncated.jpg")]


def test_every_asset_is_captioned_or_named_in_the_error(captioner):
    assert {p.name for p in GOOD + BAD} == {p.name for p in ASSETS.rglob("*") if p.is_file()}
    captions = captioner.caption(GOOD, num_beams=2, max_new_tokens=6, min_new_tokens=2)
    assert len(captions) == len(GOOD)
    for c in captions:  # a random tiny model: real words from the vocab, the requested length, no specials
        assert isinstance(c, str) and len(c.split()) >= 1 and "[" not in c
    for bad in BAD:
        with pytest.raises(ImageDecodeError) as err:
            captioner.caption([GOOD[0], bad], max_new_tokens=4)
        assert bad.name in str(err.value)


def test_caption_options(captioner):
    img = [str(ASSETS / "cat.jpg")]
    one = captioner.caption(img, num_beams=1, max_new_tokens=8, min_new_tokens=8)
    ids = captioner.generate(captioner._pixels(img), torch.tensor([[30522, 1037, 3861, 1997]]), max_new_tokens=8,
                             min_new_tokens=8)
    assert ids.shape == (1, 12)
    by_tokens = captioner.caption(img, num_beams=1, max_new_tokens=8, min_new_tokens=8, strip_prompt="tokens")
    assert by_tokens == [captioner.tokenizer.decode(ids[0, 4:], skip_special_tokens=True).strip()]
    assert one[0] == captioner.tokenizer.decode(ids[0], skip_special_tokens=True)[len("a picture of "):]
    g = [torch.Generator().manual_seed(s) for s in (1, 1)]
    a, b = (captioner.caption(img, do_sample=True, top_p=0.9, max_new_tokens=8, generator=x) for x in g)
    assert a == b
    with pytest.raises(TypeError, match="max_length"):   # one keyword contract: lengths are new tokens
        captioner.caption(img, max_length=12)


def test_original_pretrain_checkpoint_loads_into_pretrain_and_task_models(tmp_path):
    """BlipPretrain weights written in the original BLIP key layout (``image_queue``, ``text_encoder_m.encoder...``,
    ``text_decoder.bert...``) load back into BlipPretrain and, by name, into a caption model."""
    from blip.convert.blip import ours_to_original
    torch.manual_seed(0)
    pre = create("blip_tiny", "pretrain")
    for p in pre.parameters():
        p.data.normal_(0, 0.5)
    ours = pre.state_dict()
    original = ours_to_original(ours)
    original.update({"temp": ours["temp"], "image_queue": torch.randn_like(ours["queue.image_queue"]),
                     "text_queue": torch.randn_like(ours["queue.text_queue"]), "queue_ptr": ours["queue.queue_ptr"],
                     "text_encoder.embeddings.position_ids": torch.arange(512)[None]})
    assert any(k.startswith("text_encoder_m.encoder.layer.") for k in original)
    torch.save({"model": original}, tmp_path / "model_base.pth")
    back = blip.load(tmp_path / "model_base.pth", task="pretrain", arch="blip_tiny")
    assert back.load_report.expected_missing == ["queue.idx_queue"]
    for k, v in back.state_dict().items():
        ref = original["image_queue"] if k == "queue.image_queue" else ours[k]
        if k not in ("queue.text_queue", "queue.idx_queue"):
            assert torch.equal(v, ref), k
    cap = blip.load(tmp_path / "model_base.pth", task="caption", arch="blip_tiny")
    expected = create("blip_tiny", "caption")
    pre.export_to(expected)
    for k, v in expected.state_dict().items():
        assert torch.equal(v, cap.state_dict()[k]), k
    assert "image_queue" not in cap.load_report.unused and "queue.image_queue" in cap.load_report.unused


def test_answer_and_match_string_api_shapes():
    torch.manual_seed(0)
    vqa = create("blip_tiny", "vqa").eval()
    cat = str(ASSETS / "cat.jpg")
    two = vqa.answer(cat, ["what is this?", "what color is the cat?"], max_new_tokens=5)
    assert len(two) == 2 and all(isinstance(a, str) for a in two)
    ranked = vqa.answer(cat, "what animal is it?", method="rank", answer_list=["cat", "dog", "a red car"], k=2)
    assert ranked[0] in ("cat", "dog", "a red car")
    with pytest.raises(ValueError, match="answer_list"):
        vqa.answer(cat, "what?", method="rank")
    ret = create("blip_tiny", "retrieval").eval()
    res = ret.match(cat, ["a cat", "a rocket launch", "coffee"])
    assert res.itm_prob.shape == res.itc_sim.shape == (1, 3)   # images x texts
    assert ((res.itm_prob >= 0) & (res.itm_prob <= 1)).all() and (res.itc_sim.abs() <= 1 + 1e-5).all()
    with torch.no_grad():  # the string API equals the tensor API with BLIP's tokens ([ENC] for ITM, [CLS] for ITC)
        ids = ret.tokenizer(["a cat"], return_tensors="pt")["input_ids"]
        px = ret._pixels(cat)
        enc = ids.clone()
        enc[:, 0] = 30523
        assert torch.allclose(ret.itm_logits(px, enc).softmax(-1)[0, 1], res.itm_prob[0, 0], atol=1e-6)
        assert torch.allclose(ret.itc_similarity(px, ids)[0, 0], res.itc_sim[0, 0], atol=1e-6)


def test_image_size_with_arch_follows_the_checkpoint_kind(tmp_path):
    """With arch=: a fine-tuned task checkpoint keeps its resolution, a pretraining one takes the arch's."""
    from blip.convert.blip import ours_to_original
    model = create("blip_tiny", "caption", image_size=224)
    torch.save({"model": ours_to_original(model.state_dict())}, tmp_path / "caption224.pth")
    assert blip.load(tmp_path / "caption224.pth", arch="blip_tiny").cfg.image_size == 224
    assert blip.load(tmp_path / "caption224.pth", arch="blip_tiny", image_size=64).cfg.image_size == 64
    pre = ours_to_original(create("blip_tiny", "pretrain", image_size=224).state_dict())
    torch.save({"model": pre}, tmp_path / "pre224.pth")
    cap = blip.load(tmp_path / "pre224.pth", arch="blip_tiny", task="caption")
    assert cap.cfg.image_size == 64 and cap.load_report.resized
