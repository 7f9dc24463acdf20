"""The ``blip`` command: caption, ask, match, caption-dir, serve, convert, models.

    blip caption cat.jpg rocket.jpg --model model_base_caption_capfilt_large.pth
    blip ask cat.jpg "what animal is this?" --model blip2_pretrained_opt2.7b.pth --llm opt-2.7b/ \\
        --vision-weights eva_vit_g.pth --context "Question: is it indoors? Answer: yes."
    blip match cat.jpg "a cat" "a rocket" --model model_base_retrieval_coco.pth
    blip caption-dir photos/ --out captions.jsonl --model model_base_caption_capfilt_large.pth
    blip serve --model model_base_caption_capfilt_large.pth --port 8000
    blip convert model_base_caption_capfilt_large.pth out/ --to hf
    blip convert my_adapters/ merged/ --to hf --merge        (LoRA adapters folded into plain weights)

--model takes a checkpoint file, an HF directory, a name from `blip models` or a run directory of scripts/train.py.
Every expected failure prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .dtypes import DTYPES

# the head a BLIP pretraining run loads as, per subcommand (its checkpoint holds them all; serve: the captioner)
RUN_TASK_FOR = {"caption": "caption", "answer": "vqa", "match": "retrieval", "any": "caption"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"   # argparse names the type in its message
    return parse


def _number_above(low: float, inclusive: bool = False):
    """argparse type: a finite number > ``low`` (>= with ``inclusive``)."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value
    parse.__name__ = f"number {'>=' if inclusive else '>'} {low:g}"
    return parse


def load_predictor(args, need: str):
    """Load ``--model`` with the shared options and check it can do ``need`` (caption / answer / match)."""
    from .api import check_device
    from .predictor import Predictor
    check_device(args.device)
    extra = {k: v for k, v in (("llm", args.llm), ("vision_weights", args.vision_weights)) if v}
    task = args.task
    if task is None and _run_task(args.model) == "pretrain":
        task = RUN_TASK_FOR[need]
    from .api import load
    model = load(args.model, arch=args.arch, task=task, device=args.device, **extra)
    if args.dtype != "fp32":   # BLIP-2: the frozen ViT and LLM in that dtype, the Q-Former fp32 (as LAVIS runs it)
        model = model.cast_frozen(DTYPES[args.dtype]) if hasattr(model, "cast_frozen") else model.to(DTYPES[args.dtype])
    predictor = Predictor(model, name=str(args.model))
    predictor.require(need)
    return predictor


def _run_task(source: str) -> str | None:
    """The task a scripts/train.py run trained (a run directory, a checkpoint of it, outputs/<name>/), or None for
    anything else."""
    from .run_layout import find_run
    run = find_run(source)
    if run is None:
        return None
    from omegaconf import OmegaConf
    return OmegaConf.load(run[0]).model.get("task")


def decoding_from(args):
    from .predictor import Decoding
    return Decoding(prompt=getattr(args, "prompt", None), num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, do_sample=args.sample, top_p=args.top_p, top_k=args.top_k,
                    temperature=args.temperature, repetition_penalty=args.repetition_penalty)


def _batches(paths: list[str], predictor, batch_size: int):
    """Decoded batches of the given files; unreadable ones are reported on stderr and skipped."""
    from torch.utils.data import DataLoader
    from .caption_dir import ImageFiles, collate
    for batch in DataLoader(ImageFiles(paths, predictor.transform()), batch_size=batch_size, collate_fn=collate):
        for err in batch["errors"]:
            print(f"blip: skipped {err['path']}: {err['reason']}", file=sys.stderr)
        if batch["pixels"] is not None:
            yield batch


def _emit(args, row: dict, text: str) -> None:
    print(json.dumps(row, ensure_ascii=False) if args.json else text, flush=True)


def cmd_caption(args) -> int:
    predictor, decoding = load_predictor(args, "caption"), decoding_from(args)
    n = 0
    for batch in _batches(args.images, predictor, args.batch_size):
        seeds = [args.seed] * len(batch["records"]) if args.seed is not None else None
        for rec, caption in zip(batch["records"], predictor.caption(batch["pixels"], decoding, seeds)):
            _emit(args, {"path": rec["path"], "caption": caption}, f"{rec['path']}\t{caption}")
            n += 1
    return 0 if n else 2


def cmd_ask(args) -> int:
    predictor, decoding = load_predictor(args, "answer"), decoding_from(args)
    for batch in _batches([args.image], predictor, 1):
        seeds = [args.seed] if args.seed is not None else None
        answer = predictor.answer(batch["pixels"], [args.question], decoding, [args.context], seeds)[0]
        _emit(args, {"path": args.image, "question": args.question, "answer": answer}, answer)
        return 0
    return 2


def cmd_match(args) -> int:
    predictor = load_predictor(args, "match")
    for batch in _batches([args.image], predictor, 1):
        for score in predictor.match(batch["pixels"], args.texts):
            _emit(args, {"path": args.image, **score}, f"{score['itm']:.4f}\t{score['itc']:.4f}\t{score['text']}")
        return 0
    return 2


def cmd_caption_dir(args) -> int:
    import logging

    from .api import check_device
    from .caption_dir import CaptionDirJob, default_errors_path
    from .train.distributed import all_reduce_sum_int, barrier, init_distributed
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    check_device(args.device)
    info = init_distributed(args.device)
    args.device = str(info.device)
    job = CaptionDirJob(load_predictor(args, "caption" if args.question is None else "answer"), decoding_from(args),
                        question=args.question, seed=args.seed, batch_size=args.batch_size,
                        chunk_size=args.chunk_size, flush_seconds=args.flush_seconds, num_workers=args.workers,
                        progress=info.is_main and not args.no_progress)
    try:
        counts = job.run(args.src, args.out, args.errors, rank=info.rank, world_size=info.world_size,
                         barrier=lambda: barrier(info),
                         all_reduce=lambda c: {k: all_reduce_sum_int(v, info) for k, v in c.items()})
    finally:
        if info.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if info.is_main:
        errors = args.errors or default_errors_path(args.out)
        print(f"captioned {counts['captioned']}, skipped {counts['skipped']} (unreadable: {errors}), "
              f"already done {counts['already_done']} -> {args.out}", flush=True)
    return 0


TOKEN_ENV = "BLIP_SERVE_API_TOKEN"   # blip serve's API token, where --api-token is not given


def bind_host(host: str | None, token: str | None) -> tuple[str, str]:
    """The address ``blip serve`` listens on, and what to say about it at start: without a token, loopback only
    unless --host names another address."""
    import ipaddress
    if host is None:
        host = "0.0.0.0" if token else "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name
        loopback = False
    if token:
        return host, f"requests need the API token; listening on {host}"
    if loopback:
        return host, (f"no API token (--api-token or ${TOKEN_ENV}): listening on {host} (loopback) only; give "
                      "--host and a token to serve other machines")
    return host, f"no API token (--api-token or ${TOKEN_ENV}): anyone who can reach {host} can use the model"


def cmd_serve(args) -> int:
    from .predictor import UsageError
    try:
        from .serve import ServeConfig
        from .serve_replicate import ApiConfig, ModelRef, serve
    except ModuleNotFoundError as e:
        raise UsageError(f"blip serve needs {e.name}: pip install -e '.[serve]'") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is out of range (1-65535)")
    try:
        ref = ModelRef.parse(args.model_ref) if args.model_ref else None
    except ValueError as e:
        raise UsageError(f"--model-ref: {e}") from None
    token = args.api_token or os.environ.get(TOKEN_ENV) or None
    host, note = bind_host(args.host, token)
    predictor = load_predictor(args, "any")
    cfg = ServeConfig(max_batch_size=args.batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      timeout_s=args.timeout_s, max_image_bytes=max(int(args.max_image_mb * 2**20), 1),
                      max_pixels=args.max_pixels, max_decodes=args.max_decodes,
                      shutdown_timeout_s=args.shutdown_timeout_s, decoding=decoding_from(args), api_token=token)
    api = ApiConfig(model_ref=ref, webhook_hosts=frozenset(args.webhook_host))
    print(f"blip serve: {note}", file=sys.stderr, flush=True)
    serve(predictor, host, args.port, cfg, api)
    return 0


def cmd_convert(args) -> int:
    from .checkpoints import CheckpointError
    from .convert.formats import exporter_of
    extra = {k: v for k, v in (("llm", args.llm), ("vision_weights", args.vision_weights)) if v}
    from .api import load
    from .models.lora import has_lora
    model = load(args.source, arch=args.arch, task=args.task, merge=args.merge, **extra)
    if has_lora(model):
        raise CheckpointError(f"{args.source}: the model has LoRA adapters; pass --merge to fold them into the "
                              "weights (the export holds plain weights only)")
    convert = exporter_of(model)
    if convert is None:
        raise CheckpointError(f"{args.source}: a {type(model).__name__} has no export format")
    out = Path(args.output)
    if args.to == "safetensors":
        print(convert.save_safetensors(model, out))
    else:
        token = {} if args.image_token_id is None else {"image_token_index": args.image_token_id}
        print(convert.export_hf(model, out, **token))
    return 0


def cmd_models(args) -> int:
    from .zoo import PRETRAINED
    tasks: dict[str, list[str]] = {}
    from .api import list_models
    for arch, task in list_models():
        tasks.setdefault(arch, []).append(task)
    if args.json:
        print(json.dumps({"architectures": tasks, "pretrained": {
            k: {"arch": v.arch, "task": v.task, "image_size": v.image_size, "source": v.url, "needs": list(v.needs)}
            for k, v in PRETRAINED.items()}}, indent=1))
        return 0
    rows = [("architecture", "tasks")] + [(a, ", ".join(t)) for a, t in tasks.items()]
    print(_table(rows) + "\n")
    rows = [("name", "arch", "task", "size", "source")]
    rows += [(k, v.arch, v.task, str(v.image_size), v.url.rsplit("/", 1)[-1] if "://" in v.url else v.url)
             for k, v in PRETRAINED.items()]
    print(_table(rows))
    print("\nnamed checkpoints load from $BLIP_HOME (default ~/.cache/blip); blip never downloads")
    return 0


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---- arguments -----------------------------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, batch_size: int = 16, json_output: bool = True
                   ) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="checkpoint file, HF directory, zoo name or training run directory")
    p.add_argument("--arch", default=None, help="architecture, where the checkpoint cannot tell")
    p.add_argument("--task", default=None, help="task, where the checkpoint cannot tell")
    p.add_argument("--llm", default=None, help="BLIP-2: HF directory of the language model the checkpoint lacks")
    p.add_argument("--vision-weights", default=None, help="BLIP-2: the frozen ViT file (e.g. eva_vit_g.pth)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="bf16 / fp16: BLIP in that dtype; BLIP-2 stores its frozen ViT and LLM in it")
    p.add_argument("--batch-size", type=_int_at_least(1), default=batch_size, help="images per forward pass")
    if json_output:
        p.add_argument("--json", action="store_true", help="one JSON object per result")
    return p


def _decoding_options(p: argparse.ArgumentParser, prompt: bool = True, seed: bool = True) -> None:
    if prompt:
        p.add_argument("--prompt", default=None, help='caption prompt (BLIP default "a picture of ", BLIP-2 e.g. '
                       '"a photo of")')
    p.add_argument("--beams", type=int, default=None, help="beam width (default BLIP 3, BLIP-2 5)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default BLIP 15 (caption), BLIP-2 30")
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--sample", action="store_true", default=None, help="nucleus sampling instead of beam search "
                   "(implied by --temperature other than 1, --top-p below 1 or --top-k above 0; one beam)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 0.9 when sampling)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1)")
    p.add_argument("--repetition-penalty", type=float, default=None)
    if seed:
        p.add_argument("--seed", type=int, default=None, help="makes --sample reproducible (caption-dir: per image, "
                       "whatever the batching)")


def _add_caption_dir(sub) -> None:
    """``blip caption-dir``: a folder, file list or shards -> JSONL (resumable)."""
    p = _model_options(sub.add_parser("caption-dir", help="caption a folder, file list or shards into JSONL"),
                       json_output=False)
    p.add_argument("src", help="folder, text file of image paths, or local shards ('shards/{000..009}.tar')")
    p.add_argument("--out", required=True, help="output JSONL (re-running the same command resumes)")
    p.add_argument("--errors", default=None, help="unreadable images (default: OUT.errors.jsonl)")
    p.add_argument("--question", default=None, help="answer this question about every image instead (VQA)")
    p.add_argument("--chunk-size", type=_int_at_least(1), default=1024, help="images per write to the output, or")
    p.add_argument("--flush-seconds", type=float, default=30.0, help="seconds between writes, whichever comes first "
                   "(Ctrl-C writes what is done and says how to resume)")
    p.add_argument("--workers", type=_int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="data-loader processes decoding images")
    p.add_argument("--no-progress", action="store_true")
    _decoding_options(p)
    p.set_defaults(func=cmd_caption_dir)


def _add_serve(sub) -> None:
    """``blip serve``: the HTTP server and its batching and limits."""
    p = _model_options(sub.add_parser("serve", help="HTTP server: the Replicate API (/v1), /predictions (hosted "
                                      "schema, Cog), /caption, /answer, /match, /health"), json_output=False)
    p.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1 without an API token, "
                   "0.0.0.0 with one)")
    p.add_argument("--port", type=int, default=8000, help="1-65535")
    p.add_argument("--api-token", default=None, help=f"requests must send it (Authorization: Bearer TOKEN); "
                   f"default ${TOKEN_ENV}, which keeps it out of the process list")
    p.add_argument("--model-ref", default=None, metavar="OWNER/NAME[:VERSION]", help="the model the Replicate API "
                   "answers as (default salesforce/blip-2, or salesforce/blip for BLIP, any version)")
    p.add_argument("--webhook-host", action="append", default=[], metavar="HOST", help="a host webhooks may go to "
                   "(repeatable; none by default: requests with a webhook are refused)")
    p.add_argument("--max-wait-ms", type=_number_above(0, inclusive=True), default=5.0,
                   help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=_int_at_least(1), default=256,
                   help="requests waiting beyond this get 503 with Retry-After")
    p.add_argument("--timeout-s", type=_number_above(0), default=60.0, help="per-request timeout (504 after it)")
    p.add_argument("--max-image-mb", type=_number_above(0), default=20.0, help="larger uploads get 413")
    p.add_argument("--max-pixels", type=_int_at_least(1), default=50_000_000,
                   help="images with more pixels (width x height, read from the header before decoding) get 413")
    p.add_argument("--max-decodes", type=_int_at_least(1), default=2,
                   help="images decoded at once (bounds memory: each holds up to 3 bytes per pixel)")
    p.add_argument("--shutdown-timeout-s", type=_number_above(0), default=10.0,
                   help="on SIGTERM, how long open requests may take before they are cut off")
    _decoding_options(p, seed=False)   # the defaults for requests that leave them out
    p.set_defaults(func=cmd_serve)


def _add_convert(sub) -> None:
    """``blip convert``: a checkpoint -> HF layout or blip safetensors."""
    p = sub.add_parser("convert", help="convert a checkpoint to HF layout or blip safetensors",
                       description="Load SOURCE as blip.load does and write it to OUTPUT: an HF directory "
                       "(transformers' Blip*/Blip2*/InstructBlip* classes load it) or one .safetensors file with "
                       "the config in its metadata (blip.load reads it back).")
    p.add_argument("source", help="checkpoint file, HF directory, zoo name, run directory or LoRA adapter directory")
    p.add_argument("output", help="--to hf: the directory to write; --to safetensors: the file (.safetensors is "
                   "appended when the name lacks it)")
    p.add_argument("--to", choices=("hf", "safetensors"), default="hf", help="output layout (default: hf)")
    p.add_argument("--arch", default=None, help="architecture, where the checkpoint cannot tell (see `blip models`)")
    p.add_argument("--task", default=None, help="task, where the checkpoint cannot tell (caption, vqa, retrieval...)")
    p.add_argument("--llm", default=None, help="HF directory of the language model (BLIP-2 files without LLM weights)")
    p.add_argument("--vision-weights", default=None,
                   help="the frozen ViT file, e.g. eva_vit_g.pth (BLIP-2 files saved without it)")
    p.add_argument("--image-token-id", type=int, default=None,
                   help="--to hf of BLIP-2 LLM models: the LLM vocabulary id that marks the image queries (default: "
                   "the model's own, else the first embedding row past the tokenizer's vocabulary, where HF's "
                   "processor puts <image>; reported)")
    p.add_argument("--merge", action="store_true",
                   help="fold LoRA adapters into the weights (a LoRA adapter directory, or a run trained with "
                        "model.lora): the export is the plain model")
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="blip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _model_options(sub.add_parser("caption", help="caption images"))
    p.add_argument("images", nargs="+")
    _decoding_options(p)
    p.set_defaults(func=cmd_caption)

    p = _model_options(sub.add_parser("ask", help="answer a question about an image"))
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--context", default=None, help='BLIP-2: previous turns, e.g. "Question: what is it? Answer: '
                   'a cat."')
    _decoding_options(p, prompt=False)
    p.set_defaults(func=cmd_ask)

    p = _model_options(sub.add_parser("match", help="image-text matching scores (ITM probability, ITC cosine)"))
    p.add_argument("image")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=cmd_match)

    _add_caption_dir(sub)
    _add_serve(sub)
    _add_convert(sub)

    p = sub.add_parser("models", help="list architectures, tasks and named checkpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


# usage, config, checkpoint, data, image and file errors: the library names them, and its messages name the fix
EXPECTED_ERRORS = (ValueError, KeyError, OSError)
FULL_ERROR_ENV = "BLIP_FULL_ERROR"   # set to 1: expected errors keep their traceback too (debugging)


def error_message(e: BaseException) -> str:
    """An expected error's message: on one line (a KeyError without its repr quotes), except a MissingDataError,
    whose message lists one missing file per line."""
    from .data.eval_datasets import MissingDataError
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    return text.strip() if isinstance(e, MissingDataError) else " ".join(text.split())


@contextmanager
def errors_as_one_line(prog: str | None = None, rewrite=lambda message: message) -> Iterator[None]:
    """The one error policy of the ``blip`` command and ``scripts/*.py``: an expected error (EXPECTED_ERRORS) becomes
    ``[prog: ]error: <message>`` on stderr and exit status 2, Ctrl-C one line (the exception's own text, e.g.
    caption-dir's count of saved results, else "interrupted") and status 130, a reader closing stdout (``| head``) a
    quiet exit 0; anything else, a bug, keeps its traceback. ``rewrite`` adapts a message (the CLI names its flags)."""
    try:
        yield
    except BrokenPipeError:   # e.g. `blip models | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except EXPECTED_ERRORS as e:
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"{prog + ': ' if prog else ''}error: {rewrite(error_message(e))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def hydra_help_argv(argv: list[str], group: str, example: str) -> list[str]:
    """A Hydra script's argv, made fit for ``--help``: Hydra composes the config to print its help and fails with a
    traceback on a group the config leaves mandatory (``stage: ???``), so a --help that does not choose ``group``
    gets ``group=example`` (the help then shows that option's config)."""
    if {"--help", "-h"} & set(argv) and not any(a.lstrip("+").startswith(f"{group}=") for a in argv):
        return [*argv, f"{group}={example}"]
    return argv


def _cli_flags(message: str) -> str:
    """Library keyword arguments in a message -> the CLI flags that set them."""
    for keyword, flag in (("llm=", "--llm "), ("vision_weights=", "--vision-weights "), ("device=", "--device "),
                          ("image_token_index=", "--image-token-id ")):
        message = message.replace(keyword, flag)
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with errors_as_one_line(f"blip {args.command}", _cli_flags):
            return args.func(args)
    except SystemExit as e:   # returned, not raised: main() is also called in-process (tests, other tools)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
