"""The switches of docs/recipes.md's "Deliberate differences" table compose exactly as printed there and reach the
objective / generation call / schedule / transform they restore."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from blip.models.blip2_llm import create
from blip.objectives.blip2_stage2 import Blip2Stage2Objective
from blip.train.run import quote_stage_override
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = (ROOT / "docs" / "recipes.md").read_text()
OPT_DIR = FIXTURES / "lavis" / "blip2_opt" / "opt_llm"


def documented(switch: str) -> list[str]:
    """The switch as printed in recipes.md (in backticks), split into overrides as a shell would."""
    import shlex
    assert f"`{switch}`" in RECIPES, switch
    return shlex.split(switch)


def train_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=quote_stage_override(overrides) + ["run_dir=unused"])


def test_stage2_lavis_bos_target_switch_reaches_the_objective():
    cfg = train_cfg(["stage=2", "model=blip2_vitg_opt2.7b", *documented("+model.objective.bos_target=true")])
    model = create("blip2_tiny_opt", "stage2", tokenizer=OPT_DIR)
    objective = Blip2Stage2Objective(model, **OmegaConf.to_container(cfg.model.objective))
    assert objective.bos_target is True
    assert Blip2Stage2Objective(model, **OmegaConf.to_container(train_cfg(["stage=2"]).model.objective)) \
        .bos_target is False

