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


# ---------------------------------------------------------------------------------------------------------------
# docs/recipes.md "Deliberate differences": every switch in the "restore with" column composes as printed with its
# recipe, and the value it sets reaches what training builds (the objective, precision policy, optimizer, schedule).
TINY_BLIP = ["model.arch=blip_tiny", "model.image_size=48"]
TINY_BLIP2 = ["model.arch=blip2_tiny_qformer", "model.image_size=56"]
BLIP_PRETRAIN = ["stage=1", "model=blip_base", "data=pretrain_14m", "trainer=blip_pretrain"] + TINY_BLIP
BLIP2_STAGE1 = ["stage=1", "model=blip2_vitg_qformer", "data=blip2_pretrain", "trainer=blip2_stage1"] + TINY_BLIP2
PRINTED_AS = {"trainer.grad_clip=<norm>": "trainer.grad_clip=1.0"}   # a placeholder in the table


def compose_eval(overrides: list[str]):
    """scripts/evaluate.py's config (configs/evaluate/evaluate.yaml) with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from test_configs import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS / "evaluate"), version_base=None):
        return compose("evaluate", overrides=overrides + ["checkpoint=unused"])


def caption_settings(task) -> dict:
    """The generation keywords the caption benchmark passes to a BLIP model under ``task``'s protocol."""
    from blip.evaluation.caption import caption_images
    from blip.evaluation.common import protocol_for

    model = create("blip_tiny", "caption", image_size=32)
    seen = {}
    model.caption = lambda pixels, **kw: seen.update(kw) or ["a"] * len(pixels)
    family, protocol = protocol_for(task, model)
    caption_images(model, family, protocol, torch.zeros(1, 3, 32, 32))
    return seen


def _built(cfg, tmp_path):
    """What scripts/train.py builds from ``cfg``: the objective, the precision policy, the trainer (optimizer and
    schedule) — through the same functions (blip.runs.build_model, blip.train.run.build_trainer)."""
    from types import SimpleNamespace

    from blip.runs import build_model
    from blip.train.distributed import DistInfo
    from blip.train.precision import PrecisionPolicy
    from blip.train.run import build_trainer

    with torch.device("cpu" if "tiny" in cfg.model.arch else "meta"):   # a real size: shapes only
        objective = build_model(cfg.model)
    policy = PrecisionPolicy(cfg.trainer.precision, cfg.trainer.frozen_dtype, device_type="cpu")
    trainer = build_trainer(objective, cfg, DistInfo(), policy, SimpleNamespace(batches_per_epoch=10), tmp_path)
    return SimpleNamespace(objective=objective, policy=policy, trainer=trainer, optimizer=trainer.optimizer,
                           schedule=trainer.schedule)


def _wd(built, suffix: str) -> float:
    """The weight decay the built optimizer applies to the first parameter whose name ends with ``suffix``."""
    param = next(p for n, p in built.objective.named_parameters() if n.endswith(suffix))
    return next(g["weight_decay"] for g in built.optimizer.param_groups if any(q is param for q in g["params"]))


def built_recipe(recipe: list[str], tmp_path):
    """A recipe's built run: scripts/train.py's, or for ["evaluate", ...] the generation settings of
    scripts/evaluate.py's caption benchmark."""
    from types import SimpleNamespace

    from test_configs import compose_cfg

    if recipe[0] == "evaluate":
        return SimpleNamespace(generation=caption_settings(compose_eval(recipe[1:]).task))
    return _built(compose_cfg(recipe), tmp_path)


# row ("where" column) -> (recipe overrides, {switch as printed: what it must set, read from the built run})
SWITCHES = {
    "all training": (BLIP_PRETRAIN, {
        "trainer.precision=fp32": lambda b: b.policy.precision == "fp32",
        "trainer.precision=fp16": lambda b: b.policy.precision == "fp16" and b.trainer.scaler is not None}),
    "frozen towers (BLIP-2)": (BLIP2_STAGE1, {"trainer.frozen_dtype=fp16": lambda b: b.policy.frozen_dtype == "fp16"}),
    "BLIP pretraining ITC / ITM": (BLIP_PRETRAIN, {
        "model.objective.world_batch=false": lambda b: b.objective.world_batch is False}),
    "BLIP pretraining ITM": (BLIP_PRETRAIN, {
        "model.objective.exclude_same_image=false": lambda b: b.objective.exclude_same_image is False}),
    "BLIP retrieval ITC": (["stage=1", "task=retrieval_coco"] + TINY_BLIP, {
        "model.objective.itc_world_batch=false": lambda b: b.objective.itc_world_batch is False}),
    "BLIP fine-tuning LR": (["stage=1", "task=caption_coco"] + TINY_BLIP, {
        "trainer.schedule.name=cosine_epoch": lambda b: b.schedule.name == "cosine_epoch"}),
    "BLIP-2 LR": (BLIP2_STAGE1, {"trainer.schedule.name=cosine_epoch": lambda b: b.schedule.name == "cosine_epoch"}),
    "BLIP-2 AdamW β2": (BLIP2_STAGE1, {
        "trainer.optimizer.betas=[0.9,0.999]": lambda b: all(g["betas"] == (0.9, 0.999)
                                                             for g in b.optimizer.param_groups)}),
    "BLIP pretraining LR decay": (BLIP_PRETRAIN, {
        "trainer.schedule.decay_rate=0.85": lambda b: b.schedule.decay_rate == 0.85}),
    "weight decay": (BLIP_PRETRAIN, {
        "trainer.optimizer.weight_decay_exempt=none": lambda b: _wd(b, "temp") > 0 and _wd(b, "proj.bias") > 0,
        "trainer.optimizer.weight_decay_exempt=lavis": lambda b: _wd(b, "embeddings.word.weight") > 0
                                                              and _wd(b, "temp") == 0}),
    "gradient clipping": (BLIP_PRETRAIN, {"trainer.grad_clip=<norm>": lambda b: b.trainer.grad_clip == 1.0}),
    "regularisation": (["stage=1", "model=blip_large", "trainer=blip_pretrain"], {   # the tiny arch has none
        "+model.overrides.text.hidden_dropout=0.0": lambda b: b.objective.cfg.text.hidden_dropout == 0.0,
        "+model.overrides.text.attention_dropout=0.0": lambda b: b.objective.cfg.text.attention_dropout == 0.0,
        "+model.overrides.vision.drop_path=0.0": lambda b: b.objective.cfg.vision.drop_path == 0.0}),
    "BLIP NoCaps evaluation": (["evaluate", "task=caption_nocaps"], {
        "task.protocol.blip.repetition_penalty=1.1": lambda b: b.generation["repetition_penalty"] == 1.1}),
    "BLIP-2 stage-1 ITC on batches with image ids (LAVIS's COCO / VG batches)": (BLIP2_STAGE1, {
        "model.objective.image_id_targets=true": lambda b: b.objective.image_id_targets is True}),
    "BLIP-2 stage-2 OPT loss (no prompt)": (["stage=2"], {   # the tiny OPT default
        "+model.objective.bos_target=true": lambda b: b.objective.bos_target is True}),
    "BLIP-2 fine-tuning ViT layer decay (`task=blip2_retrieval_coco`, `task=blip2_vqa`)": (
        ["stage=1", "task=blip2_retrieval_coco"] + TINY_BLIP2, {
            "trainer.optimizer.layer_decay=null": lambda b: {g["lr_scale"] for g in b.optimizer.param_groups} == {1.0},
        }),
    "BLIP-2 stage-1 warm-up (`trainer=blip2_stage1`)": (BLIP2_STAGE1, {
        "trainer.schedule.warmup_steps=5000": lambda b: b.schedule.warmup_steps == 5000}),
    "BLIP-2 stage-1 ITM in the tiny CPU default only (`model=blip2_tiny_qformer`; the paper-size configs mine from "
    "step 0)": (["stage=1"], {
        "model.objective.uniform_negative_epochs=0": lambda b: b.objective.uniform_negative_epochs == 0}),
}
# rows whose switch reaches something these builds do not make, checked (as printed) by the named test
CHECKED_ELSEWHERE = {
    "BLIP-2 pretraining VG images (`data=blip2_pretrain`)":
        "test_recipe_switches.py::test_stage1_lavis_vg_randaugment_switch_reaches_the_transform",
    "BLIP-2 zero-shot VQA / OK-VQA / GQA, OPT (`scripts/evaluate.py`)":
        "test_recipe_switches.py::test_zero_shot_vqa_paper_switch_reaches_generate",
}
NOT_COMPOSABLE = {
    "EMA and temperature clamp": "nothing to restore: identical without gradient accumulation",
    "data mixing": "a `weight:` key on every entry of the data config's list, not one command-line override",
}


def restore_table() -> dict[str, list[str]]:
    """{"where" cell: the overrides (backquoted, with "=") of its "restore with" cell} from docs/recipes.md."""
    import re

    from test_configs import ROOT

    text = (ROOT / "docs" / "recipes.md").read_text().split("## Deliberate differences")[1]
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]   # after the header and the rule
    return {cells[0]: re.findall(r"`([^`]*=[^`]*)`", cells[-1])
            for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)}


def test_every_row_of_the_restore_table_is_checked():
    table = restore_table()
    covered = set(SWITCHES) | set(NOT_COMPOSABLE) | set(CHECKED_ELSEWHERE)
    assert set(table) == covered, "a row of docs/recipes.md is not covered here"
    import importlib
    for ref in CHECKED_ELSEWHERE.values():
        module, test = ref.split("::")
        assert hasattr(importlib.import_module(module.removesuffix(".py")), test), ref
    for where, switches in table.items():
        if where in SWITCHES:
            assert switches == list(SWITCHES[where][1]), where   # the switches this test composes are the printed ones


@pytest.mark.parametrize("where,switch", [(w, s) for w, (_, checks) in SWITCHES.items() for s in checks])
def test_restore_switch_composes_and_reaches_the_run(where, switch, tmp_path):
    recipe, checks = SWITCHES[where]
    before = built_recipe(recipe, tmp_path)
    assert not checks[switch](before), f"{switch}: already the recipe's default"
    after = built_recipe(recipe + [PRINTED_AS.get(switch, switch)], tmp_path)
    assert checks[switch](after), switch


def _decayed(model, exempt):
    from blip.train.optim import param_groups

    ids = {id(p) for g in param_groups(model, lr=1.0, weight_decay=0.05, exempt=exempt) if g["weight_decay"] > 0
           for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("arch,task", [("blip2_tiny_qformer", "stage1"), ("blip_tiny", "pretrain")])
def test_weight_decay_exempt_switch(arch, task):
    """ours: no decay on biases, norms, embeddings, query tokens, temp; lavis (runner_base: ``p.ndim < 2`` or a
    bias / ln / bn name): every parameter of 2+ dims decays, embeddings and query_tokens included; none: BLIP
    (``AdamW(model.parameters())``) decays every trainable parameter, temp included."""
    model = create(arch, task)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert _decayed(model, "none") == set(trainable)
    assert _decayed(model, "lavis") == {n for n, p in trainable.items() if p.ndim >= 2}
    embeddings = {n for n in trainable if ".embeddings.word." in n or ".embeddings.position." in n
                  or n.endswith(("query_tokens", "pos_embed", "cls_token"))}
    ours = _decayed(model, "ours")
    assert embeddings and embeddings <= _decayed(model, "lavis") and not embeddings & ours
    assert ours == _decayed(model, "lavis") - embeddings
    temp = next(n for n in trainable if n.endswith("temp"))
    assert temp in _decayed(model, "none") and temp not in _decayed(model, "lavis") | ours
    with pytest.raises(ValueError, match="weight_decay_exempt"):
        _decayed(model, "all")


def test_nocaps_repetition_penalty_is_lavis_and_blips_is_an_override():
    """BLIP's eval_nocaps.py generates with repetition_penalty=1.1, LAVIS (nocaps_eval.yaml through the captioning
    task) with the default 1.0: the protocol is LAVIS's, BLIP's is one override away; COCO has 1.0 in both."""
    assert caption_settings(compose_eval(["task=caption_nocaps"]).task)["repetition_penalty"] == 1.0
    blips = compose_eval(["task=caption_nocaps", "task.protocol.blip.repetition_penalty=1.1"]).task
    assert caption_settings(blips)["repetition_penalty"] == 1.1
    assert caption_settings(compose_eval(["task=caption_coco"]).task)["repetition_penalty"] == 1.0
