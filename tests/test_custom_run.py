"""``scripts/train.py task=custom``: the user's rows fine-tune the model of ``init_from`` with the recipe of its family
and the rows' kind; the held-out rows are scored before and after; the run saves only what it trained and loads as a
model wherever one is taken (blip.load, caption-dir)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import blip
from blip.data.synthetic import render_sample
from blip.train.run import quote_stage_override, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["trainer.progress_bar=false", "trainer.threads=null", "trainer.tensorboard=false", "trainer.device=cpu",
          "trainer.precision=fp32"]


def compose_run(tmp: Path, name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("train", overrides=quote_stage_override(
            [f"run_dir={tmp}/outputs/{name}", f"output_root={tmp}/outputs", f"name={name}"] + COMMON + overrides))


def label(attrs: dict) -> str:
    """A caption style the synthetic stage-2 run never saw ("a small red circle in the top left" there)."""
    return f"{attrs['color']} {attrs['shape']} {attrs['position']}"


def write_rows(root: Path, split: str, n: int, seed: int, kind: str = "caption") -> Path:
    """``n`` rendered shapes and their rows in ``root/<split>.jsonl``: captions of the new style, a question with its
    answers, or an instruction with a response."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image, attrs = render_sample(rng)
        image.save(root / "images" / f"{split}_{i}.png")
        row = {"image": f"images/{split}_{i}.png"}
        if kind == "caption":
            row.update(caption=label(attrs))
        elif kind == "vqa":
            row.update(question="what colour is the shape?", answer=[attrs["color"]] * 3)
        else:
            row.update(instruction="name the shape and where it is", response=f"{attrs['shape']} {attrs['position']}")
        lines.append(json.dumps(row))
    path = root / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny stage-2 BLIP-2 run (Q-Former + frozen tiny OPT) to fine-tune."""
    tmp = tmp_path_factory.mktemp("base")
    run(compose_run(tmp, "stage2", [
        "stage=2", "init_from=null", f"data.synthetic.cache_dir={tmp}/cache", "data.synthetic.num_train=64",
        "data.synthetic.num_val=8", "data.synthetic.shard_size=32", "trainer.batch_size=16", "trainer.max_steps=2",
        "trainer.llm_warmup_steps=50", "eval.enabled=false", "model.vision_init=null"]))
    return tmp / "outputs" / "stage2"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rows")
    return write_rows(root, "train", 24, 0), write_rows(root, "val", 6, 1)


def custom(tmp: Path, name: str, base: Path, rows, extra: list[str]) -> tuple[dict, Path]:
    train, val = rows
    out = run(compose_run(tmp, name, ["task=custom", f"data.train={train}", f"data.val={val}", f"init_from={base}",
                                      "model.image_size=56", "model.objective.prompt=", "trainer.batch_size=8",
                                      "trainer.schedule.warmup_steps=0", "eval.num_beams=1", "eval.max_new_tokens=6",
                                      *extra]))
    return out, tmp / "outputs" / name


def test_custom_captions_fine_tune_a_stage2_run(tmp_path, base, rows):
    out, run_dir = custom(tmp_path, "ft", base, rows, ["trainer.max_steps=3", "trainer.optimizer.lr=1e-4"])
    assert out["steps"] == 3
    saved = json.loads((run_dir / "results.json").read_text())
    for when in ("before", "after"):
        assert saved[when]["kind"] == "caption" and saved[when]["num_items"] == 6
        assert {"bleu4", "cider"} <= saved[when].keys()
    config = (run_dir / "config.yaml").read_text()
    assert "recipe: blip2_caption" in config and "family: blip2_llm" in config and "kind: caption" in config
    # only what trained is saved: no frozen LLM or ViT tensors, every trainable one
    state = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)["model"]
    assert not any(k.startswith("model.llm.") for k in state)
    assert any(k.startswith("model.qformer.") for k in state) and any(k.startswith("model.llm_proj.") for k in state)
    # blip.load(run) = the base with the trained weights over it, ready to caption
    model = blip.load(run_dir)
    assert model.training is False
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key.removeprefix("model.")], value), key
    base_model = blip.load(base)
    llm_keys = [k for k in base_model.state_dict() if k.startswith("llm.")]
    assert llm_keys and all(torch.equal(model.state_dict()[k], base_model.state_dict()[k]) for k in llm_keys)
    assert model.config.prompt == ""


def test_the_command_line_wins_over_the_recipe(tmp_path, base, rows):
    from blip.train.custom import recipe_settings, resolve_custom

    train, val = rows
    cfg = compose_run(tmp_path, "r", ["task=custom", f"data.train={train}", f"init_from={base}",
                                      "trainer.optimizer.lr=0.5"])
    resolve_custom(cfg)
    recipe = recipe_settings("blip2_caption")
    assert cfg.trainer.optimizer.lr == 0.5                               # given: kept
    assert cfg.trainer.epochs == recipe.trainer.epochs                   # open: the recipe's
    assert cfg.model.objective.prompt == recipe.model.objective.prompt
    assert Path(cfg.init_from).is_absolute() and cfg.data.kind == "caption"


def test_every_recipe_value_reaches_a_custom_run(tmp_path):
    """Each value a recipe sets must be open (null or absent) in the composed task=custom config: otherwise a group
    default would silently win over the paper's value."""
    from blip.train.custom import RECIPE_DIR, leaves, recipe_settings
    from omegaconf import OmegaConf

    cfg = compose_run(tmp_path, "r", ["task=custom", "data.train=x", "init_from=y"])
    closed = [f"{path.stem}: {key}" for path in sorted(RECIPE_DIR.glob("*.yaml"))
              for key, _ in leaves(recipe_settings(path.stem))
              if key != "defaults" and OmegaConf.select(cfg, key, default=None) is not None]
    assert not closed, closed


def test_lora_run_saves_adapters_only_and_loads(tmp_path, base, rows):
    out, run_dir = custom(tmp_path, "lora", base, rows, ["trainer.max_steps=2", "model.lora.r=4",
                                                         "model.lora.towers=[llm,qformer]"])
    state = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)["model"]
    assert state and all("lora_" in k for k in state), sorted(state)[:5]
    model = blip.load(run_dir)
    own = model.state_dict()
    assert all(torch.equal(own[k.removeprefix("model.")], v) for k, v in state.items())
    full = sum(v.numel() for v in own.values())
    assert sum(v.numel() for v in state.values()) < 0.2 * full


@pytest.mark.parametrize("extra", [[], ["model.lora.r=8", "model.lora.towers=[llm,qformer]"]], ids=["full", "lora"])
def test_the_loss_falls_on_a_tiny_custom_set(tmp_path, base, rows, extra):
    """48 steps on 24 rows: the loss falls by more than 5% (the base's tiny LLM is frozen and barely warmed up, so the
    Q-Former and ViT, or the adapters, learn the new style slowly)."""
    out, run_dir = custom(tmp_path, "curve", base, rows, ["trainer.epochs=16", "trainer.max_steps=48",
                                                          "trainer.optimizer.lr=1e-3", "trainer.log_every=1",
                                                          "eval.enabled=false", *extra])
    losses = [h["loss"] for h in json.loads((run_dir / "loss_curve.json").read_text()) if "loss" in h]
    assert len(losses) == 48
    assert np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8]), losses


def test_rows_of_a_kind_the_family_cannot_learn_are_refused():
    from blip.finetune import RECIPES, recipe_for
    from blip.models.family import Family

    assert recipe_for("blip2_llm", "instruction") == "blip2_instruct"
    with pytest.raises(ValueError, match=r"blip model cannot be fine-tuned on instruction rows.*\['caption', 'vqa'\]"):
        recipe_for(Family.BLIP, "instruction")
    with pytest.raises(ValueError, match="blip2_qformer model cannot be fine-tuned on vqa rows"):
        recipe_for(Family.BLIP2_QFORMER, "vqa")
    assert {name for name in RECIPES.values()} == {p.stem for p in (CONFIGS / "recipe").glob("*.yaml")}


@pytest.mark.parametrize("kind, recipe, metric", [("vqa", "blip2_vqa", "vqa_accuracy"),
                                                  ("instruction", "blip2_instruct", "exact_match")])
def test_questions_and_instructions_fine_tune_a_question_aware_model(tmp_path, base, kind, recipe, metric):
    rows = write_rows(tmp_path, "train", 16, 0, kind), write_rows(tmp_path, "val", 4, 1, kind)
    out, run_dir = custom(tmp_path, kind, base, rows, ["trainer.max_steps=2"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["before"]["kind"] == kind and metric in saved["after"]
    assert f"recipe: {recipe}" in (run_dir / "config.yaml").read_text()
    model = blip.load(run_dir)
    assert model.instruct   # the question / instruction goes into the Q-Former too
    state = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)["model"]
    assert any(k.startswith("model.qformer.transformer.embeddings.word") for k in state)   # new text parts trained
    vit_trained = any(k.startswith("model.image_encoder.visual_encoder.") for k in state)
    assert vit_trained == (kind == "vqa")   # the VQA recipe trains the ViT, InstructBLIP's keeps it frozen


def test_a_blip_model_fine_tunes_on_captions(tmp_path, rows):
    """BLIP (v1) from a blip safetensors export: the BLIP caption recipe (everything trains)."""
    from blip.convert.formats import exporter_of

    model = blip.create_model("blip_tiny", "caption")
    exported = exporter_of(model).save_safetensors(model, tmp_path / "blip_tiny.safetensors")
    out, run_dir = custom(tmp_path, "blip", exported, rows, ["trainer.max_steps=2", "model.image_size=64"])
    assert "recipe: blip_caption" in (run_dir / "config.yaml").read_text()
    loaded = blip.load(run_dir)
    assert type(loaded) is type(model) and loaded.cfg.vision.image_size == 64
    state = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)["model"]
    assert len(state) == len(model.state_dict())   # BLIP's recipe trains every weight


def test_a_lora_run_merges_into_plain_weights(tmp_path, base, rows):
    from blip.cli import main

    out, run_dir = custom(tmp_path, "lora", base, rows, ["trainer.max_steps=2", "model.lora.r=4"])
    adapted = blip.load(run_dir)
    merged_file = tmp_path / "merged.safetensors"
    assert main(["convert", str(run_dir), str(merged_file), "--merge", "--to", "safetensors"]) == 0
    merged = blip.load(merged_file)
    pixels = torch.rand(2, 3, 56, 56)
    ids = torch.tensor([[2, 5, 6], [2, 7, 8]])
    torch.testing.assert_close(merged(pixels, ids).logits, adapted(pixels, ids).logits, atol=1e-5, rtol=1e-5)
    assert not any("lora_" in k for k in merged.state_dict())


def test_freeze_llm_false_trains_every_weight(tmp_path, base, rows):
    from blip.runs import custom_objective
    from blip.train.custom import resolve_custom

    def objective(extra):
        cfg = compose_run(tmp_path, "r", ["task=custom", f"data.train={rows[0]}", f"init_from={base}", *extra])
        resolve_custom(cfg)
        return custom_objective(cfg)

    default, everything = objective([]), objective(["model.freeze_llm=false"])
    assert not any(p.requires_grad for p in default.model.llm.parameters())      # the recipe: the LLM frozen
    assert all(p.requires_grad for p in everything.model.llm.parameters())
    assert everything.model.train().llm.training and not default.model.train().llm.training


def test_a_resumed_custom_run_equals_an_uninterrupted_one(tmp_path, base, rows):
    """Trainable-only checkpoints resume exactly: a copy of a 4-step run cut back to its step-2 checkpoint, resumed,
    ends with the same step-4 weights."""
    import shutil

    common = ["trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.keep_last=10", "trainer.epochs=2"]
    custom(tmp_path, "whole", base, rows, common)
    whole, cut = tmp_path / "outputs/whole", tmp_path / "outputs/cut"
    shutil.copytree(whole, cut)
    for later in ("step_00000003", "step_00000004"):
        shutil.rmtree(cut / "checkpoints" / later)
    (cut / "results.json").unlink()
    out, _ = custom(tmp_path, "resumed", base, rows, [*common, f"resume={cut}"])
    assert out["steps"] == 4

    def final(run: Path) -> dict:
        return torch.load(run / "checkpoints/step_00000004/state.pt", weights_only=True)["model"]
    a, b = final(whole), final(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((cut / "results.json").read_text())
    assert saved["before"] == json.loads((whole / "results.json").read_text())["before"]   # from the first start


def test_a_run_captions_and_is_evaluated_with_the_prompt_it_trained_with(tmp_path, base, rows):
    """One default prompt per checkpoint: the run records its training prompt; caption-dir / serve use it through
    the model, and the benchmark evaluation of a run puts it in place of the protocol's "a photo of"."""
    from hydra import compose as compose_task
    from blip.evaluation.runner import own_prompt_protocol

    out, run_dir = custom(tmp_path, "prompted", base, rows, ["trainer.max_steps=1", "model.objective.prompt=a",
                                                             "eval.enabled=false"])
    model = blip.load(run_dir)
    assert model.config.prompt == "a"
    with initialize_config_dir(config_dir=str(CONFIGS / "evaluate"), version_base=None):
        task = compose_task("evaluate", overrides=["task=caption_coco", "checkpoint=x"]).task
    own = own_prompt_protocol(task, model)
    assert own.protocol.blip2_llm.prompt == "a" and task.protocol.blip2_llm.prompt == "a photo of"
    assert own.protocol.blip2_llm.num_beams == task.protocol.blip2_llm.num_beams   # the rest of the protocol kept


def test_a_custom_run_exports_to_hf_layout(tmp_path, base, rows):
    """`blip convert <run> out --to hf`: HF's own Blip2ForConditionalGeneration gives the run's logits."""
    from transformers import Blip2ForConditionalGeneration
    from blip.cli import main

    out, run_dir = custom(tmp_path, "export", base, rows, ["trainer.max_steps=1", "eval.enabled=false"])
    assert main(["convert", str(run_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    ours = blip.load(run_dir)
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                       trust_remote_code=False).eval()
    pixels, ids = torch.rand(2, 3, 56, 56), torch.tensor([[2, 5, 6, 7], [2, 8, 9, 10]])
    nq = hf.config.num_query_tokens
    placeholders = torch.full((2, nq), hf.config.image_token_index)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=torch.cat([placeholders, ids], 1)).logits[:, nq:]
        torch.testing.assert_close(ours(pixels, ids).logits, theirs, atol=1e-4, rtol=1e-4)


def test_model_freeze_stops_the_named_parameters_in_both_paths(tmp_path, base, rows):
    """`model.freeze` regexes: one implementation for the recipe configs (runs.build_model) and task=custom."""
    from blip.runs import build_model, custom_objective
    from blip.train.custom import resolve_custom

    cfg = compose_run(tmp_path, "r", ["task=custom", f"data.train={rows[0]}", f"init_from={base}",
                                      "model.freeze=['^model.llm_proj[.]']"])
    resolve_custom(cfg)
    custom_one = custom_objective(cfg)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        stage2 = compose("train", overrides=["stage='2'", "run_dir=x", "model.freeze=['^model.llm_proj[.]']"])
    recipe_one = build_model(stage2.model)
    for objective in (custom_one, recipe_one):
        flags = {n: p.requires_grad for n, p in objective.named_parameters()}
        assert [n for n in flags if n.startswith("model.llm_proj.")] and not any(
            flags[n] for n in flags if n.startswith("model.llm_proj."))
        assert any(flags[n] for n in flags if n.startswith("model.qformer."))   # the rest still trains
