"""Recipe settings as the originals have them: BLIP's regularisation (configs/med_config.json, models/blip.py
create_vit, blip_vqa.py), the BLIP-2 evaluation conventions of LAVIS (predict_answers / generate defaults, the
COCO-finetuned caption checkpoints' prompt and lengths)."""

from pathlib import Path

import pytest
import torch

import blip
from blip import create_model as create
from blip.zoo import PRETRAINED, Pretrained

LAVIS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lavis"


@pytest.mark.parametrize("arch,task,drop_path", [("blip_base", "pretrain", 0.0), ("blip_base", "caption", 0.0),
                                                 ("blip_base", "vqa", 0.1), ("blip_large", "caption", 0.1),
                                                 ("blip_large", "retrieval", 0.1), ("blip_large", "pretrain", 0.1)])
def test_blip_regularisation(arch, task, drop_path):
    with torch.device("meta"):
        model = create(arch, task)
    assert model.cfg.vision.drop_path == drop_path
    assert (model.cfg.text.hidden_dropout, model.cfg.text.attention_dropout) == (0.1, 0.1)
    rates = [b.drop_path.p for b in model.visual_encoder.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(drop_path)   # timm's linear stochastic-depth rule
    with torch.device("meta"):
        off = create(arch, task, vision={"drop_path": 0.0}, text={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    assert off.cfg.vision.drop_path == 0.0 and off.cfg.text.hidden_dropout == 0.0


@pytest.fixture(scope="module")
def coco_captioner(tmp_path_factory):
    """The OPT fixture loaded through a zoo entry that carries the COCO-finetuned models' options."""
    return blip.load("fixture-coco", llm=LAVIS / "blip2_opt" / "opt_llm")


@pytest.fixture(scope="module", autouse=True)
def fixture_zoo_entry():
    mp = pytest.MonkeyPatch()
    entry = PRETRAINED["blip2-caption-coco-opt2.7b"]
    mp.setitem(PRETRAINED, "fixture-coco", Pretrained("https://example.invalid/checkpoint.pth", "blip2_tiny_opt",
                                                      "stage2", 56, options=entry.options))
    mp.setenv("BLIP_HOME", str(LAVIS / "blip2_opt"))
    yield
    mp.undo()


def test_coco_caption_zoo_entries_carry_lavis_eval_settings(coco_captioner):
    for name, min_new in (("blip2-caption-coco-opt2.7b", 8), ("blip2-caption-coco-flant5xl", 7)):
        assert PRETRAINED[name].options == {"prompt": "a photo of", "generation": {
            "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": min_new}}
    assert coco_captioner.config.prompt == "a photo of"
    seen = {}
    real = coco_captioner.generate

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    coco_captioner.generate = spy
    images = torch.randn(1, 3, 56, 56)
    coco_captioner.caption(images)
    assert {k: seen[k] for k in ("num_beams", "max_new_tokens", "min_new_tokens")} == {
        "num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
    prompt_ids = coco_captioner.tokenizer(["a photo of"], return_tensors="pt").input_ids
    assert torch.equal(seen["input_ids"].cpu(), prompt_ids)
    coco_captioner.caption(images, num_beams=1)
    assert seen["num_beams"] == 1   # explicit options win


def test_blip2_answer_cleans_questions_and_uses_lavis_lengths(coco_captioner):
    seen = {}
    coco_captioner._run = lambda images, prompts, **kw: seen.update(prompts=prompts, **kw) or prompts
    coco_captioner.answer(torch.randn(1, 3, 56, 56), "What's (in) the Picture?")
    assert seen["prompts"] == ["Question: what's in the picture? Short answer:"]
    assert (seen["length_penalty"], seen["min_new_tokens"], seen["num_beams"], seen["max_new_tokens"]) == (0.0, 1, 5, 10)
    del coco_captioner._run
    t5 = blip.create_model("blip2_tiny_t5", "stage2")
    t5._run = lambda images, prompts, **kw: seen.update(prompts=prompts, **kw)
    t5.answer(torch.randn(1, 3, 56, 56), "Is it red?")
    assert (seen["length_penalty"], seen["min_new_tokens"]) == (-1.0, 0)   # T5's min_length counts the start token
    assert t5.caption_defaults()["min_new_tokens"] == 0 and coco_captioner.caption_defaults()["min_new_tokens"] == 8
