"""Recipe settings as the originals have them: BLIP's regularisation (configs/med_config.json, models/blip.py
create_vit, blip_vqa.py), the BLIP-2 evaluation conventions of LAVIS (predict_answers / generate defaults, the
COCO-finetuned caption checkpoints' prompt and lengths)."""


import pytest
import torch

import blip
from blip import create_model as create
from blip.zoo import PRETRAINED, Pretrained
from conftest import FIXTURES

LAVIS = FIXTURES / "lavis"


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
    coco_captioner.complete = lambda images, prompts, **kw: seen.update(prompts=prompts, **kw) or prompts
    coco_captioner.answer(torch.randn(1, 3, 56, 56), "What's (in) the Picture?")
    assert seen["prompts"] == ["Question: what's in the picture? Short answer:"]
    settings = (seen["length_penalty"], seen["min_new_tokens"], seen["num_beams"], seen["max_new_tokens"])
    assert settings == (0.0, 1, 5, 10)
    del coco_captioner.complete
    t5 = blip.create_model("blip2_tiny_t5", "stage2")
    t5.complete = lambda images, prompts, **kw: seen.update(prompts=prompts, **kw)
    t5.answer(torch.randn(1, 3, 56, 56), "Is it red?")
    assert (seen["length_penalty"], seen["min_new_tokens"]) == (-1.0, 0)   # T5's min_length counts the start token
    assert t5.caption_defaults()["min_new_tokens"] == 0 and coco_captioner.caption_defaults()["min_new_tokens"] == 8


def test_cosine_epoch_schedule_is_blips_cosine_lr_schedule():
    """BLIP train_caption.py: at the start of epoch e, lr = (init - min) * 0.5 * (1 + cos(pi * e / max_epoch)) + min."""
    import math

    from blip.train.schedule import IterationSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = IterationSchedule(opt, name="cosine_epoch", lr=1e-5, total_steps=50, steps_per_epoch=10, min_lr=1e-7)
    for step in range(50):
        epoch = step // 10
        assert sched.lr_at(step) == pytest.approx((1e-5 - 1e-7) * 0.5 * (1 + math.cos(math.pi * epoch / 5)) + 1e-7)


@pytest.mark.parametrize("exclude", [True, False])
def test_pretrain_negatives_switch(monkeypatch, exclude):
    """exclude_same_image=False: only the pair itself is excluded from the ITM negatives, as BLIP pretraining."""
    import blip.objectives.blip_pretrain as bp

    seen = {}

    def spy(*args):
        seen["ids"] = args[7].tolist()
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(bp, "itm_hard_negatives", spy)
    model = create("blip_tiny", "pretrain", image_size=32)
    model.exclude_same_image = exclude
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "text": ["a red dog", "a red dog", "a cat"],
             "image_ids": torch.tensor([7, 7, 9])}
    model(batch)
    assert seen["ids"] == ([7, 7, 9] if exclude else [0, 1, 2])
