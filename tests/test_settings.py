"""The typed schema of the training settings (blip.train.settings): every shipped config validates, every key of the
trainer group is typed, and a wrong value is refused in one line naming the key, the value and the range, before
any data or model work (in the library and through scripts/train.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict
from test_configs import ROOT, compose_cfg, key_paths, options, resolved

from blip.train.settings import SCHEMA, SettingError, validate_settings


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "trainer") for o in options(g)
                                          if o != "custom"])
def test_every_group_option_validates(group, option):
    stages = {"2" if option.startswith("blip2") else "1"} | ({"1", "2"} if group == "trainer" else set())
    for stage in stages:
        validate_settings(compose_cfg([f"stage={stage}", f"{group}={option}"]))


@pytest.mark.parametrize("task", [t for t in options("task") if t != "custom"])
def test_every_task_validates(task):
    validate_settings(compose_cfg(["stage=1", f"task={task}"]))


def test_task_custom_validates_open_then_after_each_recipe_fills_it():
    """task=custom leaves settings null for its recipe: accepted by the first check only; once a recipe and the
    fine-tuning defaults fill them (as blip.train.custom.resolve_custom does), the strict check passes."""
    from blip.train.custom import RECIPE_DIR, fill_open, recipe_settings, trainer_defaults

    cfg = compose_cfg(["stage=1", "task=custom", "data.train=x", "init_from=y"])
    validate_settings(cfg, open_nulls=True)
    with pytest.raises(SettingError, match=r"=null: allowed: "):
        validate_settings(cfg)
    with pytest.raises(SettingError, match=r"^trainer\.batch_size=0: "):   # a given value is checked at once
        validate_settings(compose_cfg(["stage=1", "task=custom", "trainer.batch_size=0"]), open_nulls=True)
    for recipe in sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")):
        filled = compose_cfg(["stage=1", "task=custom", "data.train=x", "init_from=y"])
        fill_open(filled, OmegaConf.create({"trainer": {"precision": "fp32", "frozen_dtype": "fp32"}}))
        fill_open(filled, recipe_settings(recipe))
        fill_open(filled, trainer_defaults())
        validate_settings(filled)


def test_the_schema_types_exactly_the_keys_of_the_trainer_group():
    """No trainer key goes unchecked and the schema names no key that no config has."""
    have = set()
    for option in options("trainer"):
        have |= {f"trainer.{k}" for k in key_paths(resolved(compose_cfg(["stage=1", f"trainer={option}"]))["trainer"])}
    leaves = {k for k in have if not any(other.startswith(k + ".") for other in have)}
    assert leaves == {k for k in SCHEMA if k.startswith("trainer.")}


BAD = [   # (override, the message: key=value and the allowed range)
    ("trainer.batch_size=abc", "trainer.batch_size='abc': allowed: an integer >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0: allowed: an integer >= 1"),
    ("trainer.batch_size=2.5", "trainer.batch_size=2.5: allowed: an integer >= 1"),
    ("trainer.epochs=-1", "trainer.epochs=-1: allowed: an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: allowed: null (run all epochs) or an integer >= 1"),
    ("trainer.optimizer.lr=-1e-4", "trainer.optimizer.lr=-0.0001: allowed: a number > 0"),
    ("trainer.optimizer.lr=nan", "trainer.optimizer.lr=nan: allowed: a number > 0"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1: allowed: null (no clipping) or a number > 0"),
    ("trainer.keep_last=-1", "trainer.keep_last=-1: allowed: null (keep every checkpoint) or an integer >= 1"),
    ("trainer.optimizer.betas=[0.9]", "trainer.optimizer.betas=[0.9]: allowed: a list of 2 numbers in [0, 1)"),
    ("trainer.optimizer.betas=[0.9,1.5]", "trainer.optimizer.betas=[0.9, 1.5]: allowed: a list of 2 numbers in "
                                          "[0, 1)"),
    ("trainer.precision=fp8", "trainer.precision='fp8': allowed: one of fp32 | bf16 | fp16"),
    ("trainer.device=gpu", "trainer.device='gpu': allowed: one of auto | cpu | cuda | mps | cuda:<index>"),
    ("trainer.schedule.decay_rate=0", "trainer.schedule.decay_rate=0: allowed: a number in (0, 1]"),
    ("trainer.optimizer.layer_decay=1.5", "trainer.optimizer.layer_decay=1.5: allowed: null (no layer-wise decay) "
                                          "or a number in (0, 1]"),
    ("trainer.tensorboard=maybe", "trainer.tensorboard='maybe': allowed: true or false"),
    ("trainer.optimizer=abc", "trainer.optimizer='abc': allowed: a group of settings"),
    ("eval.batch_size=0", "eval.batch_size=0: allowed: an integer >= 1"),
    ("init_from_min_fraction=1.5", "init_from_min_fraction=1.5: allowed: a number in [0, 1]"),
    ("+trainer.optimizer.lr_scale=2", "trainer.optimizer.lr_scale: unknown setting (a typo?)"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_a_wrong_setting_is_refused_in_one_line(override, message):
    with pytest.raises(SettingError) as info:
        validate_settings(compose_cfg(["stage=1", override]))
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    assert info.value.key == message.split("=")[0].split(":")[0]


def test_a_missing_setting_is_named():
    cfg = compose_cfg(["stage=1"])
    with open_dict(cfg):
        del cfg.trainer.grad_accum
    with pytest.raises(SettingError, match=r"^trainer\.grad_accum is missing: allowed: an integer >= 1$"):
        validate_settings(cfg)


def test_run_refuses_before_any_data_or_model_work(monkeypatch):
    import blip.train.run as train_run

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    for name in ("init_distributed", "build_sources", "initialised_model", "claim_run_dir", "find_resume"):
        monkeypatch.setattr(train_run, name, no_work)
    with pytest.raises(SettingError, match=r"^trainer\.keep_last=-1: "):
        train_run.run(compose_cfg(["stage=1", "trainer.keep_last=-1"]))


@pytest.mark.parametrize("override,message", [BAD[0], BAD[7]], ids=["type", "range"])
def test_the_script_prints_one_line_and_exits_2(tmp_path, override, message):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "stage=1", override,
                          f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in out.stderr and not (tmp_path / "config.yaml").exists()   # no run directory claimed
