"""Every shipped Hydra config composes, resolves, and uses only keys the code knows (no typo can land)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from blip.train.run import quote_stage_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ("model", "data", "trainer", "task")
# the keys each group's configs may have: a misspelt key in any config fails the schema check below
REFERENCE = {"model": "blip_tiny", "data": "synthetic", "trainer": "blip_pretrain"}
OPTIONAL_KEYS = {
    "data": {"synthetic", "root", "eval"},
    "trainer": {"llm_warmup_steps", "llm_warmup_lr"},
    "model": {"freeze_vit"},   # BLIP-2 only (BLIP's ViT always trains)
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=quote_stage_override(overrides) + ["run_dir=unused"])
    return cfg


def resolved(cfg) -> dict:
    """Resolve every interpolation; `???` (required at launch, e.g. a task's init_from) is allowed to stay."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def key_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and v and k not in ("overrides", "objective", "synthetic"):
            out |= key_paths(v, prefix + k + ".")
    return out


def test_every_group_has_options():
    for group in GROUPS + ("stage",):
        assert options(group), group
    assert options("stage") == ["1", "2", "finetune"]   # finetune: what task=custom selects


# the custom model and data groups belong to task=custom (tests/test_custom_run.py composes and runs them)
@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "trainer") for o in options(g)
                                          if o != "custom"])
def test_each_option_composes_with_the_schema_of_its_group(group, option):
    stage = "2" if option.startswith("blip2") else "1"
    cfg = resolved(compose_cfg([f"stage={stage}", f"{group}={option}"]))
    reference = resolved(compose_cfg([f"stage={stage}", f"{group}={REFERENCE[group]}"]))[group]
    have, want = key_paths(cfg[group]), key_paths(reference)
    assert want - OPTIONAL_KEYS[group] <= have, f"{group}/{option} lacks {sorted(want - have)}"
    unknown = {k for k in have - want if k.split(".")[0] not in OPTIONAL_KEYS[group]}
    assert not unknown, f"{group}/{option} has keys the code does not read: {sorted(unknown)}"


# BLIP-2 recipes train a stage's objective (model.task) and are evaluated on a benchmark of another kind
BLIP2_TASKS = {"blip2_caption_coco": ("stage2", "caption"), "blip2_retrieval_coco": ("stage1", "retrieval"),
               "blip2_vqa": ("instruct", "vqa"), "instruct": ("instruct", None)}


@pytest.mark.parametrize("task", [t for t in options("task") if t != "custom"])   # custom: test_custom_run.py
def test_each_task_composes(task):
    cfg = compose_cfg(["stage=1", f"task={task}"])
    out = resolved(cfg)
    model_task, kind = BLIP2_TASKS.get(task, (out["model"]["task"], out["model"]["task"]))
    assert out["model"]["task"] == model_task in ("caption", "retrieval", "vqa", "nlvr", "stage1", "stage2", "instruct")
    # the benchmark evaluated at the end of the run (instruction tuning has none)
    assert (out["eval_task"] or {}).get("kind") == kind
    assert "init_from" in out
    assert set(out["eval"]) == set(resolved(compose_cfg(["stage=1"]))["eval"])
    assert key_paths(out["trainer"]) == key_paths(resolved(compose_cfg(["stage=1",
                                                                        "trainer=blip_pretrain"]))["trainer"])


def test_paper_recipes_are_the_config_values():
    blip = resolved(compose_cfg(["stage=1", "model=blip_base", "trainer=blip_pretrain"]))["trainer"]
    assert blip["optimizer"] | {} == {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05, "betas": [0.9, 0.999],
                                      "eps": 1e-8, "layer_decay": None, "weight_decay_exempt": "ours"}
    assert blip["schedule"] == {"name": "step", "warmup_steps": 3000, "warmup_lr": 1e-6, "min_lr": 1e-6,
                                "decay_rate": 0.9}
    assert blip["epochs"] == 20
    s1 = resolved(compose_cfg(["stage=1", "model=blip2_vitg_qformer", "trainer=blip2_stage1"]))
    assert s1["model"]["task"] == "stage1"
    assert s1["trainer"]["optimizer"]["betas"] == [0.9, 0.98] and s1["trainer"]["optimizer"]["lr"] == 1e-4
    assert s1["trainer"]["optimizer"]["weight_decay"] == 0.05
    assert s1["trainer"]["schedule"] | {} == {"name": "cosine", "warmup_steps": 2000, "warmup_lr": 1e-6,
                                              "min_lr": 1e-5, "decay_rate": 0.9}
    s2 = resolved(compose_cfg(["stage=2", "model=blip2_vitg_flant5xl", "trainer=blip2_stage2"]))
    assert s2["model"]["task"] == "stage2" and s2["trainer"]["schedule"]["min_lr"] == 5e-5
    assert s2["trainer"]["distributed"]["strategy"] == "fsdp"


def test_stage_defaults_and_command_line_overrides():
    one = resolved(compose_cfg(["stage=1"]))
    assert (one["stage"]["id"], one["model"]["arch"], one["data"]["name"]) == (1, "blip2_tiny_qformer", "synthetic")
    two = resolved(compose_cfg(["stage=2"]))
    assert (two["stage"]["id"], two["model"]["arch"], two["model"]["task"]) == (2, "blip2_tiny_opt", "stage2")
    assert two["init_from"] == f"latest:{one['name']}"   # the embedded stage 2 continues from the stage-1 default
    custom = resolved(compose_cfg(["stage=2", "model=blip2_vitg_opt2.7b", "trainer.optimizer.lr=2e-5",
                                   "trainer.grad_accum=4"]))
    assert custom["model"]["arch"] == "blip2_vitg_opt2.7b"  # the command line beats the stage's defaults
    assert custom["trainer"]["optimizer"]["lr"] == 2e-5 and custom["trainer"]["grad_accum"] == 4
    with pytest.raises(Exception):
        compose_cfg(["stage=1", "trainer.optimzer.lr=1"])  # a typo on the command line is an error too
    assert quote_stage_override(["train.py", "stage=2", "+stage=1", "stage.id=3"]) == [
        "train.py", "stage='2'", "+stage='1'", "stage.id=3"]


def test_the_script_composes_from_the_command_line():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "stage=1", "trainer.epochs=7",
                          "--cfg", "job"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.trainer.epochs == 7 and job.stage.id == 1 and job.model.arch == "blip2_tiny_qformer"


def test_uniform_itm_negatives_only_in_the_tiny_default():
    """The tiny CPU default warms ITM up on uniform negatives; every other model config mines them from step 0 (the
    papers)."""
    assert compose_cfg(["stage=1"]).model.objective.uniform_negative_epochs == 0.5
    for name in options("model"):
        if name != "blip2_tiny_qformer":
            objective = compose_cfg(["stage=1", f"model={name}"]).model.objective
            assert objective.get("uniform_negative_epochs", 0.0) == 0.0, name


@pytest.mark.parametrize("option", [o for o in options("model") if OmegaConf.load(CONFIGS / "model" / f"{o}.yaml")
                                    .get("stage1_arch")])
def test_stage2_models_take_the_vit_and_qformer_of_their_stage1_arch(option):
    """stage 2 starts from a stage-1 run of ``stage1_arch`` (init_from): every ViT / Q-Former weight of the stage-2
    model is in that run's model with its shape; ``vision_init`` names the frozen ViT file of that same arch."""
    import torch

    from blip.models.blip2_llm import create
    from blip.models.blip2_qformer import Blip2Qformer
    from blip.models.blip2 import QFORMER_ARCHS
    from blip.zoo import PRETRAINED
    model_cfg = OmegaConf.load(CONFIGS / "model" / f"{option}.yaml")
    tiny_llm = dict(model_type="t5", d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=8, vocab_size=8)
    with torch.device("meta"):
        stage1 = Blip2Qformer(QFORMER_ARCHS[model_cfg.stage1_arch]).state_dict()
        stage2 = create(model_cfg.arch, model_cfg.task, llm=tiny_llm).state_dict()
    handed_off = {k: v.shape for k, v in stage2.items() if k.startswith(("image_encoder.", "qformer."))}
    assert handed_off and all(k in stage1 and stage1[k].shape == shape for k, shape in handed_off.items())
    if model_cfg.vision_init in PRETRAINED:
        assert PRETRAINED[model_cfg.vision_init].arch == model_cfg.stage1_arch
