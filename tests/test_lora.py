"""LoRA adapters (blip.models.lora, through peft) on every family: BLIP-2 with a tiny OPT and a tiny T5,
InstructBLIP, BLIP captioning. Only adapters train and the real training objectives' gradients reach exactly them;
peft's zero-initialised B leaves the base model's outputs unchanged; an adapter directory is small, loads back through
``blip.load`` to the same logits and merges into plain weights that HF transformers' own Blip2ForConditionalGeneration
reads to the same logits; gradient checkpointing (ours and HF's) gives the same gradients."""
import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration

import blip
from blip.checkpoints import CheckpointError
from blip.cli import main
from blip.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, apply_lora, has_lora, lora_state_dict,
                              merge_lora, read_adapters, save_adapters)
from blip.registry import create_objective
from tiny_weights import randomize
from conftest import FIXTURES

pytestmark = pytest.mark.usefixtures("one_thread")

LAVIS = FIXTURES / "lavis"
OPT_DIR, T5_DIR = LAVIS / "blip2_opt" / "opt_llm", LAVIS / "blip2_t5" / "t5_llm"
BLIP2_CASES = {   # name: (arch, task, objective overrides, LLM tokenizer)
    "opt": ("blip2_tiny_opt", "stage2", {}, OPT_DIR),
    "t5": ("blip2_tiny_t5", "stage2", {}, T5_DIR),
    "instruct": ("blip2_tiny_opt", "instruct", {}, OPT_DIR),
}


def pixels(n=2, size=56, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def objective_of(case: str) -> torch.nn.Module:
    """The real training objective of a tiny model (weights large enough that outputs depend on the image)."""
    torch.manual_seed(0)
    if case == "caption":
        objective = create_objective("blip_tiny", "caption", image_size=32)
    else:
        arch, task, _, tokenizer = BLIP2_CASES[case]
        objective = create_objective(arch, task, tokenizer=tokenizer)
    randomize(objective.model, 3)
    return objective


def batch_of(case: str) -> dict:
    if case == "caption":
        return {"pixel_values": pixels(2, 32, 1), "text": ["a dog on a bench", "two red cars"]}
    return {"pixel_values": pixels(2, 56, 1), "text_input": ["a photo of", "what is this?"],
            "text_output": ["a dog sitting on a bench", "two red cars"]}


def logits_of(model: torch.nn.Module, case: str) -> torch.Tensor:
    """Inference logits of the model's tensor API on a fixed input (eval mode, no grad)."""
    with torch.no_grad():
        if case == "caption":
            return model(pixels(2, 32, 2), torch.tensor([[30522, 1037, 3899, 2006], [30522, 2048, 2417, 102]])).logits
        start = model.start_token_id
        prompt = torch.tensor([[start, 5, 6, 7], [start, 8, 9, 10]])
        extra = {}
        if model.is_seq2seq:
            extra["decoder_input_ids"] = torch.tensor([[0, 11, 12], [0, 13, 14]])
        if model.instruct:
            q_ids = torch.tensor([[101, 2054, 2003, 102], [101, 2129, 102, 0]])
            extra.update(qformer_input_ids=q_ids, qformer_attention_mask=(q_ids != 0).long())
        return model(pixels(2, 56, 2), prompt, **extra).logits


def train_steps(objective: torch.nn.Module, case: str, steps: int = 3) -> None:
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(batch_of(case))["loss"].backward()
        optimizer.step()
    objective.eval()


def settings_for(case: str, **kw) -> LoraSettings:
    towers = ("vit", "text") if case == "caption" else ("llm",)
    return LoraSettings(**{"r": 4, "towers": towers, **kw})


# ---- what trains, what gradients reach ------------------------------------------------------------------------

@pytest.mark.parametrize("case,towers", [("opt", ("llm",)), ("t5", ("llm",)), ("instruct", ("llm", "qformer")),
                                         ("opt", ("qformer", "vit")), ("caption", ("vit", "text"))])
def test_only_adapters_train_and_the_objective_reaches_every_one(case, towers):
    objective = objective_of(case)
    adapted = apply_lora(objective, LoraSettings(r=4, towers=towers))
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    # peft's names: <module>.lora_A.default.weight / <module>.lora_B.default.weight for each adapted module
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in adapted for ab in "AB"}
    assert len(adapted) >= 4 and has_lora(objective)
    prefixes = {"llm": "model.llm.", "qformer": "model.qformer.", "vit": ("model.image_encoder.visual_encoder.",
                                                                         "visual_encoder."),
                "text": "text_decoder."}
    assert all(any(n.startswith(prefixes[t]) for n in adapted) for t in towers), adapted
    objective.train()
    objective(batch_of(case))["loss"].backward()
    reached = {n for n, p in objective.named_parameters() if p.grad is not None}
    assert reached == trainable
    # B starts at zero, so A's first gradient is zero; B's is not
    assert all(p.grad.abs().sum() > 0 for n, p in objective.named_parameters() if ".lora_B." in n)


def test_a_frozen_tower_keeps_no_activations():
    """LoRA on the LLM only: the ViT and Q-Former run without autograd (nothing of theirs needs a gradient)."""
    objective = objective_of("opt")
    apply_lora(objective, settings_for("opt"))
    seen = []
    model = objective.model
    for module in (model.image_encoder, model.qformer):
        module.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    objective.train()
    objective(batch_of("opt"))["loss"].backward()
    assert seen == [False, False]
    assert model.llm.training and not model.image_encoder.visual_encoder.training  # the LLM with adapters trains


@pytest.mark.parametrize("case", ["opt", "t5", "instruct", "caption"])
def test_zero_b_leaves_the_base_outputs(case):
    base = objective_of(case).model.eval()
    adapted = copy.deepcopy(base)
    apply_lora(adapted, settings_for(case, towers=("vit", "text") if case == "caption" else ("llm", "qformer", "vit")))
    assert all(not p.any() for n, p in adapted.named_parameters() if ".lora_B." in n)
    assert torch.equal(logits_of(adapted.eval(), case), logits_of(base, case))
    with torch.no_grad():   # a nonzero B changes them: the comparison is not vacuous
        next(p for n, p in adapted.named_parameters() if ".lora_B." in n).fill_(0.5)
    assert not torch.allclose(logits_of(adapted, case), logits_of(base, case), atol=1e-4)


# ---- adapter directories: save, load, merge, export -----------------------------------------------------------

def save_base(model: torch.nn.Module, path):
    from blip.convert.formats import exporter_of
    return exporter_of(model).save_safetensors(model, path)


@pytest.mark.parametrize("case", ["opt", "t5", "instruct", "caption"])
def test_trained_adapters_load_back_and_merge(tmp_path, case):
    objective = objective_of(case)
    base_file = save_base(objective.model, tmp_path / "base.safetensors")
    base_keys = list(objective.model.state_dict())
    settings = settings_for(case, towers=("vit", "text") if case == "caption" else ("llm", "qformer"))
    apply_lora(objective, settings)
    train_steps(objective, case)
    model = objective.model
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    trained = logits_of(model, case)

    directory = save_adapters(objective, tmp_path / "adapters", base=str(base_file), settings=settings)
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved_settings, base, tensors = read_adapters(directory)
    assert saved_settings == settings and base == str(base_file)
    assert tensors.keys() == lora_state_dict(model).keys()
    # the adapters are a small fraction of the weights they adapt
    ratio = (directory / ADAPTER_WEIGHTS).stat().st_size / base_file.stat().st_size
    assert ratio < 0.1, ratio

    loaded = blip.load(directory)
    assert has_lora(loaded) and not loaded.training
    assert torch.equal(logits_of(loaded, case), trained)

    merged = blip.load(directory, merge=True)
    assert not has_lora(merged) and list(merged.state_dict()) == base_keys
    torch.testing.assert_close(logits_of(merged, case), trained, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(blip.load(base_file), case), trained, atol=1e-4)   # training changed them
    merge_lora(model)   # merging in place: the same plain names and logits
    assert list(model.state_dict()) == base_keys
    torch.testing.assert_close(logits_of(model, case), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["opt", "t5"])
def test_merged_export_reads_in_transformers(tmp_path, case, capsys):
    """``blip convert <adapters> --merge --to hf``: HF's own Blip2ForConditionalGeneration gives our logits."""
    objective = objective_of(case)
    base_file = save_base(objective.model, tmp_path / "base.safetensors")
    settings = settings_for(case, towers=("llm", "qformer", "vit"))
    apply_lora(objective, settings)
    train_steps(objective, case)
    trained = logits_of(objective.model, case)
    directory = save_adapters(objective, tmp_path / "adapters", base=base_file, settings=settings)

    token = objective.model.llm.config.vocab_size - 1   # the image placeholder HF needs in the LLM vocabulary
    out = tmp_path / "hf"
    assert main(["convert", str(directory), str(out), "--to", "hf", "--image-token-id", str(token)]) == 2
    assert "pass --merge" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(directory), str(out), "--to", "hf", "--merge", "--image-token-id", str(token)]) == 0
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    model = objective.model
    nq = model.qformer.num_queries
    prompt = torch.tensor([[model.start_token_id, 5, 6, 7], [model.start_token_id, 8, 9, 10]])
    dec = torch.tensor([[0, 11, 12], [0, 13, 14]]) if model.is_seq2seq else None
    with torch.no_grad():
        ref = hf(pixel_values=pixels(2, 56, 2), input_ids=torch.cat([torch.full((2, nq), token), prompt], 1),
                 decoder_input_ids=dec).logits
    ref = ref if model.is_seq2seq else ref[:, nq:]
    assert (ref - trained).abs().max() < 1e-4 and trained.std() > 1e-2

    assert main(["convert", str(directory), str(tmp_path / "merged.safetensors"), "--to", "safetensors",
                 "--merge"]) == 0
    torch.testing.assert_close(logits_of(blip.load(tmp_path / "merged.safetensors"), case), trained, atol=1e-5,
                               rtol=0)
    assert main(["convert", str(base_file), str(tmp_path / "x.safetensors"), "--to", "safetensors", "--merge"]) == 2
    assert "no LoRA adapters to merge" in capsys.readouterr().err


def test_adapter_directory_is_loaded_strictly(tmp_path):
    objective = objective_of("caption")
    base_file = save_base(objective.model, tmp_path / "base.safetensors")
    settings = settings_for("caption")
    apply_lora(objective, settings)
    directory = save_adapters(objective.model, tmp_path / "adapters", base=base_file, settings=settings)
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    first = sorted(tensors)[0]

    save_file({k: v for k, v in tensors.items() if k != first}, directory / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"(?s)adapters.*missing.*{re.escape(first)}"):
        blip.load(directory)
    save_file({**tensors, "visual_encoder.blocks.0.attn.proj.lora_A.default.weight": torch.zeros(4, 64)},
              directory / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"(?s)adapters.*unexpected.*attn\.proj\.lora_A"):
        blip.load(directory)
    save_file(tensors, directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: not a blip LoRA directory"):
        blip.load(directory)


def test_base_beside_the_adapters_and_a_base_with_adapters(tmp_path, monkeypatch):
    """A relative base resolves from the adapter directory too (the two moved together)."""
    objective = objective_of("caption")
    save_base(objective.model, tmp_path / "base.safetensors")
    settings = settings_for("caption")
    apply_lora(objective, settings)
    directory = save_adapters(objective, tmp_path / "adapters", base="../base.safetensors", settings=settings)
    monkeypatch.chdir(tmp_path / "adapters")
    assert has_lora(blip.load(directory))
    monkeypatch.chdir("/")
    assert has_lora(blip.load(directory))
    stacked = save_adapters(objective, tmp_path / "stacked", base=directory, settings=settings)
    with pytest.raises(CheckpointError, match="already carries LoRA adapters.*--merge"):
        blip.load(stacked)


# ---- settings and towers --------------------------------------------------------------------------------------

def test_settings_from_the_hydra_block():
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"r": 8, "alpha": 32, "dropout": 0.1, "towers": ["qformer", "vit"],
                            "target_modules": ["qkv"]})
    assert LoraSettings.from_config(cfg) == LoraSettings(8, 32.0, 0.1, ("qformer", "vit"), ("qkv",))
    assert LoraSettings.from_config(None) == LoraSettings() and not LoraSettings().enabled
    assert LoraSettings.from_config({"r": 2, "towers": "vit"}).towers == ("vit",)
    for bad, match in [({"r": -1}, "r must be an integer >= 0"), ({"r": 1.5}, "r must be"),
                       ({"alpha": 0}, "alpha must be a number > 0"), ({"dropout": 1.0}, r"dropout must be .*\[0, 1\)"),
                       ({"towers": ["llm", "audio"]}, r"towers must be .*\['llm', 'qformer', 'vit', 'text'\]"),
                       ({"towers": []}, "towers must be"), ({"target_modules": []}, "target_modules must be"),
                       ({"rank": 8}, r"unknown keys \['rank'\]")]:
        with pytest.raises(ValueError, match=match):
            LoraSettings.from_config(bad)


def test_towers_a_model_lacks_and_targets_that_match_nothing():
    caption = blip.create_model("blip_tiny", "caption", image_size=32)
    with pytest.raises(ValueError, match=r"\['llm'\].*BlipCaption has no such tower; its towers: \['vit', 'text'\]"):
        apply_lora(caption, LoraSettings(r=4, towers=("llm",)))
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no module of the vit tower.*\['fc1', 'fc2', 'proj', "
                                         r"'qkv'\]"):
        apply_lora(caption, LoraSettings(r=4, towers=("vit",), target_modules=("q_proj",)))
    with pytest.raises(ValueError, match=r"\['kv'\] match no module of the vit tower"):   # the text tower has kv
        apply_lora(caption, LoraSettings(r=4, towers=("text", "vit"), target_modules=("kv",)))
    assert not has_lora(caption)   # nothing injected when any tower fails
    assert apply_lora(caption, LoraSettings(r=0)) == [] and not has_lora(caption)
    names = apply_lora(caption, LoraSettings(r=4, towers=("vit",), target_modules=("qkv", "fc2")))
    assert names == [f"visual_encoder.blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc2")]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(caption, LoraSettings(r=4, towers=("text",)))


def test_lora_on_a_low_precision_tower_trains_in_float32():
    model = blip.create_model("blip2_tiny_opt", "stage2", frozen_dtype="bf16")
    apply_lora(model, LoraSettings(r=4, towers=("llm", "vit")))
    adapters = lora_state_dict(model)
    assert adapters and all(v.dtype == torch.float32 for v in adapters.values())
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    model.train()
    start = model.start_token_id
    model(pixels(), torch.tensor([[start, 5, 6]] * 2)).logits.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_B." in n)


def test_retrieval_momentum_copies_follow_the_adapters():
    """BLIP retrieval's momentum encoders get the same (frozen) adapters: the EMA still pairs every parameter."""
    objective = create_objective("blip_tiny", "retrieval", image_size=32, objective={"queue_size": 8})
    apply_lora(objective, LoraSettings(r=4, towers=("vit", "text")))
    assert has_lora(objective.visual_encoder_m) and has_lora(objective.text_encoder_m)
    assert not any(p.requires_grad for p in objective.visual_encoder_m.parameters())
    with torch.no_grad():
        for n, p in objective.named_parameters():
            if ".lora_B." in n and not n.startswith(("visual_encoder_m.", "text_encoder_m.")):
                p.fill_(1.0)
    objective.after_optimizer_step()
    b_momentum = [p for n, p in objective.visual_encoder_m.named_parameters() if ".lora_B." in n]
    assert b_momentum and all(p.abs().sum() > 0 for p in b_momentum)


# ---- gradient checkpointing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case,towers", [("opt", ("llm", "qformer", "vit")), ("caption", ("vit", "text"))])
def test_gradient_checkpointing_gives_the_same_gradients(case, towers):
    objective = objective_of(case)
    apply_lora(objective, LoraSettings(r=4, towers=towers, dropout=0.1))
    with torch.no_grad():   # nonzero B: A gets gradients too
        for n, p in objective.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    # a module inside one layer of each checkpointed stack (HF hooks a layer's forward, not its __call__)
    if case == "opt":
        model = objective.model
        layers = [model.image_encoder.visual_encoder.blocks[0].attn, model.qformer.transformer.layers[0].self_attn,
                  model.llm.model.decoder.layers[0].self_attn]
    else:
        layers = [objective.visual_encoder.blocks[0].attn, objective.text_decoder.transformer.layers[0].self_attn]
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda m, i, o: calls.append(m))

    def grads(enable: bool) -> dict[str, torch.Tensor]:
        objective.set_grad_checkpointing(enable)
        objective.train()
        objective.zero_grad()
        calls.clear()
        torch.manual_seed(1)   # dropout (the LLM's and LoRA's): the same masks in both runs
        objective(batch_of(case))["loss"].backward()
        return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert len(calls) == len(layers)
    if case == "opt":   # the frozen ViT stays in eval mode; only its adapters' dropout follows train()
        qkv = objective.model.image_encoder.visual_encoder.blocks[0].attn.qkv
        assert not qkv.base_layer.training and qkv.lora_dropout.training
    checkpointed = grads(True)
    assert len(calls) == 2 * len(layers)   # each checkpointed layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(plain[n].abs().sum() > 0 for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)
