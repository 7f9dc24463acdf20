"""Throughput of blip vs HF transformers, side by side in one run, on the same random weights.

Each HF model is built from a config of the real size (``--size real``: BLIP-base at 384 px, BLIP-2 ViT-g + OPT-2.7b)
or a tiny one (``--size tiny``, a CPU sanity run), saved with ``save_pretrained`` and loaded into blip with
``blip.load`` — so both sides hold identical weights. Generation runs a fixed number of new tokens on both sides
(min = max new tokens), so the work is equal. Results are images/s and the ratio blip / HF, printed as JSON.

    python scripts/benchmark.py --device cuda --dtype bf16 --size real --batch 64
    python scripts/benchmark.py                       # tiny, CPU, float32: checks that everything runs
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import blip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def blip_config(size: str):
    from transformers import BlipConfig
    if size == "real":  # Salesforce/blip-image-captioning-base
        return BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(initializer_range=0.02))
    return BlipConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=64, patch_size=16, initializer_range=0.02),
                      text_config=dict(vocab_size=30524, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4))


def blip2_config(size: str):
    from transformers import Blip2Config, OPTConfig
    if size == "real":  # Salesforce/blip2-opt-2.7b sizes
        opt = OPTConfig(vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                        word_embed_proj_dim=2560, eos_token_id=50118)
        return Blip2Config(text_config=opt.to_dict(), num_query_tokens=32, image_token_index=50265)
    opt = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, eos_token_id=50)
    return Blip2Config(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=56, patch_size=14),
                       qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, encoder_hidden_size=64),
                       text_config=opt.to_dict(), num_query_tokens=8, image_token_index=511)


def timed(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def pair(hf_cls, config, tmp: Path, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    hf = hf_cls(config).eval()
    hf.save_pretrained(tmp)
    ours = blip.load(tmp, device=device, dtype=dtype)
    return hf.to(device=device, dtype=dtype), ours


def bench_caption(args, tmp: Path, out: dict) -> None:
    from transformers import BlipForConditionalGeneration
    cfg = blip_config(args.size)
    hf, ours = pair(BlipForConditionalGeneration, cfg, tmp / "blip", args.device, DTYPES[args.dtype])
    size = cfg.vision_config.image_size
    px = torch.randn(args.batch, 3, size, size, device=args.device, dtype=DTYPES[args.dtype])
    prompt = torch.tensor([[30522, 1037, 3861, 1997]], device=args.device).expand(args.batch, -1)  # [DEC] a picture of
    hf_prompt = torch.cat([prompt, torch.full_like(prompt[:, :1], 102)], 1)  # HF drops a trailing [SEP]
    n = args.new_tokens
    for beams in (1, 3):
        kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams)
        with torch.inference_mode():
            t_hf = timed(lambda: hf.generate(pixel_values=px, input_ids=hf_prompt, do_sample=False, **kw),
                         args.device, args.iters)
            t_us = timed(lambda: ours.generate(px, prompt, **kw), args.device, args.iters)
        out[f"blip_caption_beam{beams}"] = dict(hf_img_s=args.batch / t_hf, blip_img_s=args.batch / t_us,
                                                 ratio=t_hf / t_us)
    labels = torch.cat([prompt, torch.randint(1000, 30000, (args.batch, 16), device=args.device)], 1)
    out["blip_caption_train_step"] = train_step_pair(args, hf, ours, px, labels)


def train_step_pair(args, hf, ours, px, ids) -> dict:
    """One LM fine-tuning step (forward, backward, AdamW) under autocast, same batch for both."""
    from blip.losses import lm_loss
    amp = dict(device_type=args.device.split(":")[0], dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    labels = ids.masked_fill(ids == 0, -100)
    results = {}
    for name, model, fwd in (
            ("hf", hf, lambda: hf(pixel_values=px, input_ids=ids, labels=labels).loss),
            ("blip", ours, lambda: lm_loss(ours(px, ids).logits, labels))):
        model.float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(**amp):
                loss = fwd()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[name] = timed(step, args.device, args.iters)
    return dict(hf_img_s=args.batch / results["hf"], blip_img_s=args.batch / results["blip"],
                ratio=results["hf"] / results["blip"])


def bench_blip2(args, tmp: Path, out: dict) -> None:
    from transformers import Blip2ForConditionalGeneration
    cfg = blip2_config(args.size)
    hf, ours = pair(Blip2ForConditionalGeneration, cfg, tmp / "blip2", args.device, DTYPES[args.dtype])
    size = cfg.vision_config.image_size
    px = torch.randn(args.batch, 3, size, size, device=args.device, dtype=DTYPES[args.dtype])
    prompt = torch.full((args.batch, 1), 2, device=args.device)  # OPT bos only: plain captioning
    hf_ids = torch.cat([torch.full((args.batch, cfg.num_query_tokens), cfg.image_token_index, device=args.device),
                        prompt], 1)
    n = args.new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n)
    with torch.inference_mode():
        t_hf = timed(lambda: hf.generate(pixel_values=px, input_ids=hf_ids, do_sample=False, **kw), args.device,
                     args.iters)
        t_us = timed(lambda: ours.generate(px, prompt, **kw), args.device, args.iters)
    out["blip2_opt_greedy"] = dict(hf_img_s=args.batch / t_hf, blip_img_s=args.batch / t_us, ratio=t_hf / t_us)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--size", choices=("tiny", "real"), default="real" if torch.cuda.is_available() else "tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--only", choices=("caption", "blip2"), default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    out: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "dtype": args.dtype, "size": args.size, "batch": args.batch}
    import transformers
    out["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "caption"):
            bench_caption(args, Path(tmp), out)
        if args.only in (None, "blip2"):
            bench_blip2(args, Path(tmp), out)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
