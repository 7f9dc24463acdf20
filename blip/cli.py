"""The ``blip`` command: caption, ask, match, convert, models.

    blip caption cat.jpg rocket.jpg --model model_base_caption_capfilt_large.pth
    blip ask cat.jpg "what animal is this?" --model blip-vqa-base/
    blip match cat.jpg "a cat" "a rocket" --model model_base_retrieval_coco.pth
    blip convert model_base_caption_capfilt_large.pth out/ --to hf
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _load(args):
    import blip
    return blip.load(args.model, arch=args.arch, task=args.task, device=args.device)


def cmd_caption(args) -> None:
    model = _load(args)
    captions = model.caption(args.images, prompt=args.prompt, num_beams=args.beams, max_length=args.max_length,
                             min_length=args.min_length, do_sample=args.sample, top_p=args.top_p)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")


def cmd_ask(args) -> None:
    model = _load(args)
    for answer in model.answer([args.image], [args.question]):
        print(answer)


def cmd_match(args) -> None:
    model = _load(args)
    result = model.match(args.image, args.texts)
    for text, itm, itc in zip(args.texts, result.itm_prob.tolist(), result.itc_sim.tolist()):
        print(f"{itm:.4f}\t{itc:.4f}\t{text}")


def cmd_convert(args) -> None:
    import blip
    model = blip.load(args.source, arch=args.arch, task=args.task)
    family = "blip2" if type(model).__module__.startswith("blip.models.blip2") else "blip"
    out = Path(args.output)
    if args.to == "hf":
        if family == "blip":
            from .convert.blip import export_hf
        else:
            from .convert.blip2_stage1 import export_hf
        print(export_hf(model, out))
    else:
        from .convert.blip import save_safetensors
        print(save_safetensors(model, out))


def cmd_models(args) -> None:
    import blip
    from .zoo import PRETRAINED
    print(json.dumps({"architectures": sorted({a for a, _ in blip.list_models()}),
                      "tasks": sorted({t for _, t in blip.list_models()}),
                      "pretrained": {k: v.url for k, v in PRETRAINED.items()}}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_model(p):
        p.add_argument("--model", required=True, help="checkpoint file, HF directory or zoo name")
        p.add_argument("--arch", default=None)
        p.add_argument("--task", default=None)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        return p

    p = with_model(sub.add_parser("caption", help="caption images"))
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default="a picture of ")
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--min-length", type=int, default=5)
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, default=0.9)
    p.set_defaults(func=cmd_caption)

    p = with_model(sub.add_parser("ask", help="answer a question about an image"))
    p.add_argument("image")
    p.add_argument("question")
    p.set_defaults(func=cmd_ask)

    p = with_model(sub.add_parser("match", help="image-text matching scores (ITM probability, ITC cosine)"))
    p.add_argument("image")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("convert", help="convert a checkpoint to HF layout or blip safetensors")
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--to", choices=("hf", "safetensors"), default="hf")
    p.add_argument("--arch", default=None)
    p.add_argument("--task", default=None)
    p.set_defaults(func=cmd_convert)

    sub.add_parser("models", help="list architectures, tasks and named checkpoints").set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .data.images import ImageDecodeError
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ImageDecodeError, CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"blip {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
