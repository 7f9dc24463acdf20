"""Labelling throughput: ``blip caption-dir`` against HF transformers' pipeline called in a loop, on the same images
and identical weights (a BLIP captioner of the real or a tiny size with random weights, saved in HF layout and loaded
by both). Both decode the files they are given, caption with the prompt "a picture of", 3 beams and a fixed number of
new tokens (min = max), so the work is equal; caption-dir batches and decodes in data-loader workers, the pipeline
takes one image per call as it is usually driven. Prints images/s of both and their ratio as JSON.

    python scripts/benchmark_labeling.py --device cuda --dtype bf16 --size real --images photos/ --num-images 512
    python scripts/benchmark_labeling.py             # tiny, CPU: checks that everything runs
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark import DTYPES, blip_config

PROMPT = "a picture of"


def make_images(directory: Path, n: int, source: str | None) -> list[Path]:
    """n JPEG files: copies of the photos under ``source`` or, without one, seeded noise at 640x480."""
    directory.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if source \
        else []
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = directory / f"{i:06d}.jpg"
        if photos:
            Image.open(photos[i % len(photos)]).convert("RGB").save(path, quality=90)
        else:
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def save_hf_captioner(size: str, directory: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from blip.data.tokenizer import get_tokenizer
    cfg = blip_config(size)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(directory)
    side = cfg.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                  tokenizer=get_tokenizer("blip")).save_pretrained(directory)


def run_caption_dir(args, model_dir: Path, images: Path, out: Path) -> float:
    import blip
    from blip.caption_dir import CaptionDirJob
    from blip.predictor import Decoding, Predictor
    model = blip.load(model_dir, device=args.device, dtype=DTYPES[args.dtype])
    job = CaptionDirJob(Predictor(model, str(model_dir)), Decoding(prompt=PROMPT + " ", num_beams=3,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
                        batch_size=args.batch, num_workers=args.workers, progress=False)
    start = time.perf_counter()
    counts = job.run(str(images), out)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    assert counts["captioned"] == args.num_images, counts
    return args.num_images / (time.perf_counter() - start)


def run_hf_pipeline(args, model_dir: Path, paths: list[Path]) -> float:
    from transformers import pipeline
    pipe = pipeline("image-text-to-text", model=str(model_dir), device=args.device, dtype=DTYPES[args.dtype],
                    trust_remote_code=False)
    gen = dict(num_beams=3, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    pipe(images=str(paths[0]), text=PROMPT, generate_kwargs=gen)   # warm-up
    start = time.perf_counter()
    for path in paths:
        pipe(images=str(path), text=PROMPT, generate_kwargs=gen)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--size", choices=("tiny", "real"), default="real" if torch.cuda.is_available() else "tiny")
    p.add_argument("--images", default=None, help="folder of photos to copy (default: generated noise images)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", args.num_images, args.images)
        save_hf_captioner(args.size, tmp / "model")
        ours = run_caption_dir(args, tmp / "model", tmp / "images", tmp / "captions.jsonl")
        hf = run_hf_pipeline(args, tmp / "model", paths)
    row = {"caption_dir_vs_hf_pipeline": {"blip_img_s": round(ours, 2), "hf_img_s": round(hf, 2),
                                          "speedup": round(ours / hf, 2), "images": args.num_images,
                                          "batch": args.batch, "workers": args.workers, "size": args.size,
                                          "device": args.device, "dtype": args.dtype}}
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
