"""blip.load refuses broken weights instead of loading them silently: integer/bool tensors for float parameters,
NaN/inf values, files missing their last block, metadata that does not describe the tensors (checked before any
allocation), weight maps pointing outside their directory, config / tokenizer files that are binary, truncated or
nested too deeply (one line naming the file); head counts of metadata-less files come from the arch."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import blip
from blip.checkpoints import CheckpointError, read_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    model = blip.create_model("blip_tiny", "caption")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def save(tmp_path: Path, state: dict, name: str = "model.pth") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_tensors_for_float_parameters_are_refused(tmp_path, tiny_state, dtype):
    _, state = tiny_state
    key = "text_decoder.transformer.layers.0.ffn.fc1.weight"
    path = save(tmp_path, {**state, key: state[key].to(dtype)})
    with pytest.raises(CheckpointError, match=rf"{key}: file {dtype} for a torch.float32 tensor"):
        blip.load(path, arch="blip_tiny")


def test_non_finite_weights_raise_unless_allowed(tmp_path, tiny_state):
    model, state = tiny_state
    key = "visual_encoder.blocks.1.attn.qkv.weight"
    broken = state[key].clone()
    broken[0, 0] = float("nan")
    path = save(tmp_path, {**state, key: broken})
    refusal = rf"model\.pth: 1 weight tensors hold NaN or inf .*{key}.*allow_nonfinite"
    with pytest.raises(CheckpointError, match=refusal):  # converted to another dtype: the copy reads every weight
        blip.load(path, arch="blip_tiny", dtype=torch.bfloat16)
    mapped = blip.load(path, arch="blip_tiny")  # kept as loaded: refused at the first call, which reads the weights
    for model in (mapped, mapped, copy.deepcopy(mapped)):  # and at every call after it, and so is a copy
        with pytest.raises(CheckpointError, match=refusal):
            model.generate(pixels(model), max_new_tokens=2)
    loaded = blip.load(path, arch="blip_tiny", allow_nonfinite=True)
    assert torch.isnan(loaded.state_dict()[key][0, 0])
    assert loaded.generate(pixels(loaded), max_new_tokens=2).shape[0] == 1


def test_the_deferred_check_checks_each_copy_and_leaves_no_hook_behind(tmp_path, tiny_state):
    model, state = tiny_state
    loaded = blip.load(save(tmp_path, state), arch="blip_tiny")
    early_copy, broken_copy = copy.deepcopy(loaded), copy.deepcopy(loaded)
    with torch.no_grad():  # a copy checks its own weights, not the original's
        broken_copy.text_decoder.transformer.layers[0].ffn.fc1.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"text_decoder\.transformer\.layers\.0\.ffn\.fc1\.weight"):
        broken_copy.generate(pixels(broken_copy), max_new_tokens=3)
    assert any(m._forward_pre_hooks for m in loaded.modules())
    expected = model.eval().generate(pixels(model), max_new_tokens=3)
    for checked in (loaded, early_copy):
        assert torch.equal(checked.generate(pixels(checked), max_new_tokens=3), expected)
        assert not any(m._forward_pre_hooks for m in checked.modules())


def pixels(model) -> torch.Tensor:
    size = model.visual_encoder.cfg.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("missing", ["visual_encoder.blocks.1", "text_decoder.transformer.layers.1"])
def test_a_file_missing_its_last_block_is_an_error_naming_it(tmp_path, tiny_state, missing):
    _, state = tiny_state
    path = save(tmp_path, {k: v for k, v in state.items() if not k.startswith(missing + ".")})
    with pytest.raises(CheckpointError, match=rf"model\.pth: {re.escape(missing)} is missing: .* 1 of the 2"):
        blip.load(path)


def test_metadata_less_files_take_head_counts_from_their_arch(tmp_path, tiny_state):
    model, state = tiny_state
    loaded = blip.load(save(tmp_path, state))
    assert (loaded.cfg.vision.heads, loaded.cfg.text.num_heads) == (4, 4)  # not 64 // 64 = 1
    pixels, ids = torch.randn(1, 3, 64, 64), torch.tensor([[30522, 1037, 4937]])
    torch.testing.assert_close(loaded(pixel_values=pixels, input_ids=ids).logits,
                               model.eval()(pixel_values=pixels, input_ids=ids).logits)
    odd = {k: v for k, v in state.items() if not k.startswith("visual_encoder.blocks.0.mlp")}
    odd["visual_encoder.blocks.0.mlp.fc1.weight"] = torch.zeros(200, 64)   # no arch has this width
    with pytest.raises(CheckpointError, match="head counts are unknown: pass arch="):
        blip.load(save(tmp_path, odd, "odd.pth"))


CRAFTED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))   # a build that allocates fails here, not the machine
import blip
from blip.checkpoints import CheckpointError
try:
    blip.load(sys.argv[1])
    print("loaded")
except CheckpointError as e:
    print("CheckpointError:", e)
except BaseException as e:
    print("other:", type(e).__name__, str(e)[:200])
"""


def test_crafted_metadata_fails_before_any_allocation(tmp_path, tiny_state):
    from safetensors.torch import save_file

    model, state = tiny_state
    config = asdict(model.cfg)
    config["text"]["vocab_size"] = 400_000_000     # 400M x 64 floats: a 102 GB word embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "crafted.safetensors"),
              metadata={"format": "pt", "blip_task": "caption", "blip_config": json.dumps(config)})
    assert (tmp_path / "crafted.safetensors").stat().st_size < 20 << 20
    out = subprocess.run([sys.executable, "-c", CRAFTED, str(tmp_path / "crafted.safetensors")], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.stdout.startswith("CheckpointError:"), out.stdout + out.stderr[-2000:]
    assert "crafted.safetensors: its config does not describe its tensors" in out.stdout
    assert "word.weight: file (30524, 64) vs config (400000000, 64)" in out.stdout


def test_weight_maps_stay_inside_their_directory(tmp_path, tiny_state):
    _, state = tiny_state
    from safetensors.torch import save_file

    outside = tmp_path / "elsewhere.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(outside))
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map points outside its directory"):
        read_state_dict(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": str(outside)}}))
    with pytest.raises(CheckpointError, match="outside its directory"):
        read_state_dict(model_dir)


@pytest.fixture(scope="module")
def hf_blip2_dir(tmp_path_factory) -> Path:
    """A tiny HF Blip2ForConditionalGeneration directory (save_pretrained; no tokenizer files)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    opt = OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    config = Blip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=28, patch_size=14),
                         qformer_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, max_position_embeddings=64),
                         text_config=opt.to_dict(), num_query_tokens=4, image_token_index=98)
    directory = tmp_path_factory.mktemp("hf_blip2")
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def deeply_nested(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["whole file", "inside the object"])
def test_a_deeply_nested_config_json_is_one_line_naming_the_file(tmp_path, hf_blip2_dir, capsys, where):
    from blip.cli import main
    directory = tmp_path / "model"
    shutil.copytree(hf_blip2_dir, directory)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(
        deeply_nested() if where == "whole file" else config.replace("{", '{"extra": ' + deeply_nested() + ",", 1))
    refusal = rf"{directory}/config\.json: not readable JSON config \(nested deeper than Python's JSON parser goes\)"
    with pytest.raises(CheckpointError, match=refusal):
        blip.load(directory)
    assert main(["caption", "x.jpg", "--model", str(directory), "--device", "cpu"]) == 2   # the CLI: one line, status 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"blip caption: error: {refusal}; re-download or re-export it\n", err), err


@pytest.mark.parametrize("name,content", [("tokenizer.json", b"\x89PNG\r\n\x1a\n\xff\xfe binary"),
                                          ("tokenizer.json", b'{"version": "1.0", "model": '),
                                          ("tokenizer.json", deeply_nested().encode()),
                                          ("vocab.txt", b"[PAD]\n\xff\xfe\xfa\n")],
                         ids=["binary tokenizer.json", "truncated tokenizer.json", "nested tokenizer.json",
                              "binary vocab.txt"])
def test_garbage_tokenizer_files_are_one_line_naming_the_file(tmp_path, hf_blip2_dir, name, content):
    directory = tmp_path / "model"
    shutil.copytree(hf_blip2_dir, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast"}))
    (directory / name).write_bytes(content)
    model = blip.load(directory)   # the LLM tokenizer is read when first used
    with pytest.raises(CheckpointError, match=rf"^{directory}/{name}: not (UTF-8 text|JSON) \(.*AutoTokenizer cannot "
                                              rf"load {directory}: re-download or re-export it$"):
        model.tokenizer


def test_a_binary_vocab_file_is_one_line_naming_it(tmp_path):
    from blip.data.tokenizer import get_tokenizer
    (tmp_path / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/vocab\.txt: not a vocab\.txt \(one UTF-8 token per line"):
        get_tokenizer("blip", tmp_path / "vocab.txt")
