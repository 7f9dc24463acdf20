"""The `blip` command on a tiny model: real images in, one caption per image out; bad input -> exit 2 with the file."""
from pathlib import Path

import torch

import blip
from blip.cli import main
from blip.convert.blip import save_safetensors

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "images"


def test_caption_match_convert_and_errors(tmp_path, capsys):
    torch.manual_seed(0)
    cap = save_safetensors(blip.create_model("blip_tiny", "caption"), tmp_path / "cap.safetensors")
    images = [str(IMAGES / "cat.jpg"), str(IMAGES / "rocket.jpg")]
    assert main(["caption", *images, "--model", str(cap), "--beams", "2", "--max-length", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images

    ret = save_safetensors(blip.create_model("blip_tiny", "retrieval"), tmp_path / "ret.safetensors")
    assert main(["match", images[0], "a cat", "a rocket", "--model", str(ret)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[2] for r in rows] == ["a cat", "a rocket"] and all(0.0 <= float(r[0]) <= 1.0 for r in rows)

    assert main(["convert", str(cap), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").exists()

    bad = str(IMAGES / "unusual" / "truncated.jpg")
    assert main(["caption", bad, "--model", str(tmp_path / "hf")]) == 2
    assert "truncated.jpg" in capsys.readouterr().err
    assert main(["caption", images[0], "--model", str(tmp_path / "missing.pth")]) == 2
