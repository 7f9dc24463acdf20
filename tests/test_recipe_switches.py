"""The switches of docs/recipes.md's "Deliberate differences" table compose exactly as printed there and reach the
objective / generation call / schedule / transform they restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from blip.evaluation.vqa import answer_questions
from blip.models.blip2_llm import create
from blip.models.family import Family
from blip.objectives.blip2_stage2 import Blip2Stage2Objective
from blip.train.run import quote_stage_override
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = " ".join((ROOT / "docs" / "recipes.md").read_text().split())   # a code span may wrap a line
OPT_DIR = FIXTURES / "lavis" / "blip2_opt" / "opt_llm"


def documented(switch: str) -> list[str]:
    """The switch / variant as printed in recipes.md (in backticks), split into overrides as a shell would."""
    import shlex
    assert f"`{switch}`" in RECIPES, switch
    return shlex.split(switch)


def train_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=quote_stage_override(overrides) + ["run_dir=unused"])


def eval_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS / "evaluate"), version_base=None):
        return compose("evaluate", overrides=overrides + ["checkpoint=unused"])


def test_stage2_lavis_bos_target_switch_reaches_the_objective():
    cfg = train_cfg(["stage=2", "model=blip2_vitg_opt2.7b", *documented("+model.objective.bos_target=true")])
    model = create("blip2_tiny_opt", "stage2", tokenizer=OPT_DIR)
    objective = Blip2Stage2Objective(model, **OmegaConf.to_container(cfg.model.objective))
    assert objective.bos_target is True
    assert Blip2Stage2Objective(model, **OmegaConf.to_container(train_cfg(["stage=2"]).model.objective)) \
        .bos_target is False


def test_zero_shot_vqa_paper_switch_reaches_generate():
    model = create("blip2_tiny_opt", "stage2", tokenizer=OPT_DIR).eval()
    seen = []
    model.generate = lambda pixels, **kw: seen.append(kw) or kw["input_ids"]
    switch = documented("'task.protocol.blip2_llm.prompt=\"Question: {} Answer:\"' "
                        "task.protocol.blip2_llm.length_penalty=-1")
    for task in ("vqa_v2", "okvqa", "gqa"):
        seen.clear()
        for overrides in ([], switch):
            p = eval_cfg([f"task={task}", *overrides]).task.protocol.blip2_llm
            answer_questions(model, Family.BLIP2_LLM, p, torch.zeros(1, 3, 56, 56), ["What is (it)?"], None)
        lavis, paper = seen
        for kw, prompt, penalty in ((lavis, "Question: what is it? Short answer:", 0.0),
                                    (paper, "Question: what is it? Answer:", -1.0)):
            assert model.tokenizer.decode(kw["input_ids"][0], skip_special_tokens=True) == prompt
            assert (kw["length_penalty"], kw["num_beams"], kw["max_new_tokens"], kw["min_new_tokens"]) == (
                penalty, 5, 10, 1)


STAGE1 = ["stage=1", "model=blip2_vitg_qformer", "data=blip2_pretrain", "trainer=blip2_stage1"]


def test_stage1_lavis_warmup_switch_reaches_the_schedule(tmp_path):
    from types import SimpleNamespace
    from blip.train.distributed import DistInfo
    from blip.train.precision import PrecisionPolicy
    from blip.train.run import build_trainer

    for overrides, warmup in (([], 2000), (documented("trainer.schedule.warmup_steps=5000"), 5000)):
        cfg = train_cfg(STAGE1 + overrides)
        trainer = build_trainer(torch.nn.Linear(2, 2), cfg, DistInfo(), PrecisionPolicy("fp32", "fp32"),
                                SimpleNamespace(batches_per_epoch=10_000), tmp_path)
        schedule = trainer.schedule
        assert schedule.warmup_steps == warmup
        assert schedule.lr_at(warmup // 2) == pytest.approx((1e-6 + 1e-4) / 2)   # halfway up the linear warm-up


def test_stage1_lavis_vg_randaugment_switch_reaches_the_transform():
    from types import SimpleNamespace
    from blip.data.transforms import BlipRandAugment
    from blip.train.distributed import DistInfo
    from blip.train.run import build_train_data

    def randaugment(transform) -> bool:
        return any(isinstance(t, BlipRandAugment) for t in transform.transforms)

    sources = [SimpleNamespace(num_samples=1000), SimpleNamespace(num_samples=1000)]
    for overrides, vg in (([], False), (documented("data.datasets.1.transform=blip"), True)):
        cfg = train_cfg(STAGE1 + overrides)
        coco_t, vg_t = build_train_data(cfg, DistInfo(), sources, [0.5, 0.5]).dataset.transforms
        assert (randaugment(coco_t), randaugment(vg_t)) == (False, vg)


# variants the configs leave to overrides: (base command, override as recipes.md prints it, expected values, source)
VARIANTS = [
    (["stage=1", "model=blip_base", "data=pretrain_14m", "trainer=blip_pretrain"],   # BLIP paper §4.1: 2400 / 2e-4
     "model=blip_large trainer.batch_size=75 trainer.optimizer.lr=2e-4 trainer.activation_checkpointing=true",
     {"model.arch": "blip_large", "trainer.batch_size": 75, "trainer.optimizer.lr": 2e-4}),
    (["stage=1", "task=caption_coco"],   # BLIP configs/caption_coco.yaml, vit: 'large' lines
     "model=blip_large trainer.batch_size=16 trainer.optimizer.lr=2e-6 trainer.activation_checkpointing=true",
     {"model.arch": "blip_large", "model.image_size": 384, "trainer.batch_size": 16, "trainer.optimizer.lr": 2e-6,
      "trainer.activation_checkpointing": True}),
    (["stage=1", "task=retrieval_flickr"],   # BLIP configs/retrieval_flickr.yaml (and _coco), vit: 'large' lines
     "model=blip_large trainer.batch_size=16 trainer.optimizer.lr=5e-6",
     {"model.arch": "blip_large", "trainer.batch_size": 16, "trainer.optimizer.lr": 5e-6,
      "model.objective.negative_all_rank": False}),
    (["stage=1", "task=retrieval_coco"], "model=blip_large trainer.batch_size=16 trainer.optimizer.lr=5e-6",
     {"model.arch": "blip_large", "trainer.batch_size": 16, "trainer.optimizer.lr": 5e-6}),
    (STAGE1, "model=blip2_vitL_qformer trainer.batch_size=145",   # BLIP-2 paper §3.4: 2320 for ViT-L
     {"model.arch": "blip2_vitL_qformer", "trainer.batch_size": 145}),
    (["stage=2", "data=blip2_pretrain", "trainer=blip2_stage2"],   # BLIP-2 paper §3.4: 1520 for FlanT5
     "model=blip2_vitg_flant5xl trainer.batch_size=95",
     {"model.arch": "blip2_vitg_flant5xl", "trainer.batch_size": 95, "trainer.max_steps": 80000}),
    (["stage=2", "data=blip2_pretrain", "trainer=blip2_stage2"],   # the paper's ViT-L FlanT5-XL: ViT-L stage 1 first
     "model=blip2_vitL_flant5xl trainer.batch_size=95",
     {"model.arch": "blip2_vitL_flant5xl", "model.vision_init": "blip2-clip-vit-l", "trainer.batch_size": 95,
      "init_from": "latest:stage1_blip2_vitL_qformer_blip2_pretrain"}),
]


@pytest.mark.parametrize("base,variant,expected", VARIANTS, ids=[v[1].split()[0] + "-" + v[0][-1] for v in VARIANTS])
def test_paper_variants_compose_as_documented(base, variant, expected):
    cfg = train_cfg(base + documented(variant))
    assert {k: OmegaConf.select(cfg, k) for k in expected} == expected


def test_blip2_default_batches_are_the_papers():
    # the defaults: ViT-g stage 1 1680, OPT stage 2 1920 (× 16 GPUs); the variants above: 2320 (ViT-L), 1520 (FlanT5)
    assert train_cfg(STAGE1).trainer.batch_size * 16 == 1680
    assert train_cfg(["stage=2", "model=blip2_vitg_opt2.7b", "trainer=blip2_stage2"]).trainer.batch_size * 16 == 1920
