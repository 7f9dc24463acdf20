"""The `blip` command on tiny BLIP and BLIP-2 models: every subcommand, JSON output, and every expected failure as
one line on stderr with exit status 2."""
import json

import pytest
import torch

import blip
from blip.cli import main
from blip.convert.blip import save_safetensors
from blip.predictor import question_prompt
from tiny_weights import randomize


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = {}
    for task in ("caption", "vqa", "retrieval"):
        model = blip.create_model("blip_tiny", task)
        randomize(model, seed=3)
        out[task] = save_safetensors(model, d / f"{task}.safetensors")
    return out


@pytest.fixture
def images(fixtures):
    return fixtures / "images"


def test_blip_caption_ask_match_convert_models(models, images, tmp_path, capsys, one_thread):
    cat, rocket, bad = images / "cat.jpg", images / "rocket.jpg", images / "unusual" / "truncated.jpg"
    assert main(["caption", str(cat), str(bad), str(rocket), "--model", str(models["caption"]), "--beams", "2",
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.strip().splitlines()]
    model = blip.load(models["caption"])
    assert lines == [[str(p), model.caption(p, num_beams=2, max_new_tokens=6, min_new_tokens=1)[0]]
                     for p in (cat, rocket)]
    assert "truncated.jpg" in err   # reported and skipped, the others captioned

    assert main(["ask", str(cat), "what is this?", "--model", str(models["vqa"]), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row == {"path": str(cat), "question": "what is this?",
                   "answer": blip.load(models["vqa"]).answer(cat, "what is this?")[0]}

    assert main(["match", str(cat), "a cat", "a rocket", "--model", str(models["retrieval"]), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = blip.load(models["retrieval"]).match(cat, ["a cat", "a rocket"])
    assert [r["text"] for r in rows] == ["a cat", "a rocket"]
    assert [r["itm"] for r in rows] == pytest.approx(ref.itm_prob[0].tolist(), abs=1e-6)

    assert main(["convert", str(models["caption"]), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    capsys.readouterr()
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "blip_base" in table and "blip2-pretrain-opt2.7b" in table and "model_base_capfilt_large.pth" in table
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "caption" in listing["architectures"]["blip_tiny"] and listing["pretrained"]["blip-base"]["task"]


def test_blip2_caption_ask_match(fixtures, images, capsys, one_thread):
    opt = fixtures / "lavis" / "blip2_opt"
    eva = fixtures / "lavis" / "eva_vit_tiny.pth"
    source = ["--model", str(opt / "checkpoint_trainable_only.pth"), "--llm", str(opt / "opt_llm"),
              "--vision-weights", str(eva)]
    cat = images / "cat.jpg"
    assert main(["caption", str(cat), *source, "--prompt", "a photo of", "--max-new-tokens", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    model = blip.load(opt / "checkpoint_trainable_only.pth", llm=opt / "opt_llm", vision_weights=eva)
    assert row["caption"] == model.caption(cat, prompt="a photo of", max_new_tokens=5)[0]

    context = "Question: what is it? Answer: a cat."
    assert main(["ask", str(cat), "what colour?", *source, "--context", context, "--sample", "--seed", "5",
                 "--temperature", "2", "--max-new-tokens", "5"]) == 0
    prompt = question_prompt("what colour?", context)
    expected = model.complete(cat, [prompt], do_sample=True, temperature=2.0, top_p=0.9, num_beams=1,
                              max_new_tokens=5, min_new_tokens=1, generator=[torch.Generator().manual_seed(5)])[0]
    assert capsys.readouterr().out.strip() == expected.strip()

    assert main(["ask", str(cat), "what is it?", *source, "--dtype", "bf16", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()   # frozen ViT and LLM in bf16, the Q-Former in fp32

    stage1 = fixtures / "lavis" / "blip2_qformer" / "checkpoint.pth"   # the Q-Former matches and captions
    assert main(["match", str(cat), "a cat", "a rocket", "--model", str(stage1), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    qformer = blip.load(stage1)
    assert [r["itm"] for r in rows] == pytest.approx(qformer.match(cat, ["a cat", "a rocket"]).itm_prob[0].tolist(),
                                                       abs=1e-6)
    assert main(["caption", str(cat), "--model", str(stage1), "--max-new-tokens", "6", "--min-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.strip().split("\t")[1]
    assert out == qformer.caption(cat, max_new_tokens=6, min_new_tokens=2)[0]


def test_expected_failures_are_one_line_and_exit_2(models, images, fixtures, tmp_path, capsys, monkeypatch):
    cat = str(images / "cat.jpg")
    lavis = fixtures / "lavis"
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (["caption", cat, "--model", str(models["vqa"])], "cannot caption"),
        (["ask", cat, "what?", "--model", str(models["caption"])], "cannot answer"),
        (["match", cat, "a cat", "--model", str(models["caption"])], "cannot match"),
        (["ask", cat, "what?", "--model", str(models["vqa"]), "--context", "Question: a? Answer: b."], "BLIP-2"),
        (["caption", cat, "--model", str(models["caption"]), "--device", "cuda"], "no CUDA GPU"),
        (["caption", cat, "--model", str(models["caption"]), "--device", "toaster"], "not a device"),
        (["caption", cat, "--model", str(models["caption"]), "--beams", "0"], "num_beams must be >= 1"),
        (["caption", cat, "--model", str(models["caption"]), "--top-p", "1.5"], "top_p"),
        (["caption", cat, "--model", str(models["caption"]), "--temperature", "0"], "temperature"),
        (["caption", cat, "--model", str(models["caption"]), "--batch-size", "0"], "must be >= 1"),
        (["caption", cat, "--model", str(models["caption"]), "--beams", "two"], "invalid"),
        (["caption", cat, "--model", str(lavis / "blip2_t5" / "checkpoint_trainable_only.pth"), "--vision-weights",
          str(lavis / "eva_vit_tiny.pth")], "--llm"),
        (["caption", cat, "--model", str(tmp_path / "missing.pth")], "no such file"),
        (["caption", cat, "--model", str(corrupt)], "corrupt.pth"),
        (["caption", str(images / "unusual" / "empty.jpg"), "--model", str(models["caption"])], "empty.jpg"),
        (["serve", "--model", str(models["caption"]), "--port", "70000"], "out of range"),
        (["serve", "--model", str(models["caption"]), "--max-queue", "0"], "--max-queue: must be >= 1, got 0"),
        (["serve", "--model", str(models["caption"]), "--batch-size", "0"], "--batch-size: must be >= 1"),
        (["serve", "--model", str(models["caption"]), "--timeout-s", "0"], "--timeout-s: must be > 0"),
        (["serve", "--model", str(models["caption"]), "--max-wait-ms", "-1"], "--max-wait-ms: must be >= 0"),
        (["serve", "--model", str(models["caption"]), "--max-pixels", "0"], "--max-pixels: must be >= 1"),
        (["serve", "--model", str(models["caption"]), "--shutdown-timeout-s", "nan"], "--shutdown-timeout-s"),
        # a question the tiny OPT's 64 positions cannot hold with the image queries and the new tokens
        (["ask", cat, " ".join(["word"] * 40), "--model", str(lavis / "blip2_opt" / "checkpoint.pth"), "--llm",
          str(lavis / "blip2_opt" / "opt_llm")], "the LLM has 64 (max_position_embeddings)"),
        (["caption", cat, "--model", str(models["caption"]), "--temperature", "2", "--beams", "3"],
         "sampling with 3 beams is not supported"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, needle in cases:
        try:
            status = main(argv)
        except SystemExit as e:  # argparse's own errors
            status = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, (argv, err)
        assert len([line for line in err if line.startswith("blip")]) == 1 and needle in err[-1], (argv, err)
