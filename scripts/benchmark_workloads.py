"""The workloads of scripts/benchmark.py. Each is ``fn(args, directory, race) -> [row, ...]``: it builds both sides
on identical weights, checks their outputs agree, then races them (see benchmark_tools.Race)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import blip
from benchmark_tools import count_flops, row
from blip.losses import lm_loss, lm_loss_from_hidden

ROOT = Path(__file__).resolve().parents[1]


# ---- configs of both sides -------------------------------------------------------------------------------------

def blip_config(size: str, image_size: int = 384):
    from transformers import BlipConfig
    if size == "real":  # Salesforce/blip-image-captioning-base
        return BlipConfig(text_config=dict(num_attention_heads=12),
                          vision_config=dict(image_size=image_size, initializer_range=0.02))
    return BlipConfig(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=64, patch_size=16, initializer_range=0.02),
                      text_config=dict(vocab_size=30524, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4))


def llm_config(kind: str, size: str, device: str):
    """OPT / T5 text config: 2.7b / FlanT5-XL on a GPU, 125m / FlanT5-small sized on a CPU, tiny for tests."""
    from transformers import OPTConfig, T5Config
    if size == "tiny":
        if kind == "opt":
            return OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, eos_token_id=50)
        return T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                        eos_token_id=1)
    big = device.startswith("cuda")
    if kind == "opt":
        width, layers, heads = (2560, 32, 32) if big else (768, 12, 12)
        return OPTConfig(vocab_size=50304, hidden_size=width, ffn_dim=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, word_embed_proj_dim=width, eos_token_id=50118)
    width, ff, layers, heads = (2048, 5120, 24, 32) if big else (512, 1024, 8, 6)
    return T5Config(vocab_size=32128, d_model=width, d_kv=64, d_ff=ff, num_layers=layers, num_decoder_layers=layers,
                    num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def blip2_config(kind: str, size: str, device: str):
    from transformers import Blip2Config
    text = llm_config(kind, size, device).to_dict()
    image_token = text["vocab_size"] - 1
    if size == "real":  # ViT-g/14 at 224 and the BLIP-2 Q-Former (32 queries): the transformers defaults
        return Blip2Config(text_config=text, num_query_tokens=32, image_token_index=image_token)
    return Blip2Config(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=56, patch_size=14),
                       qformer_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, encoder_hidden_size=64),
                       text_config=text, num_query_tokens=8, image_token_index=image_token)


def pair(hf_cls, config, directory: Path, args):
    """HF model with random weights, saved; blip's model loaded from the same directory."""
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = hf_cls(config)
    hf = hf.to(args.torch_dtype).eval()
    hf.save_pretrained(directory)
    return hf, blip.load(directory, device=args.device, dtype=args.torch_dtype)


def pixels(args, batch: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g).to(args.device, args.torch_dtype)


def logits_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 2e-3 if dtype == torch.float32 else 0.1
    return bool((a.float() - b.float()).abs().max() <= tol * max(1.0, float(b.float().abs().max())))


# ---- generation ---------------------------------------------------------------------------------------------

def race_generation(name, args, race, batch, models, hf_fn, blip_fn) -> dict:
    """Check ids, then time HF, blip (and with ``--compile`` a second blip loaded with ``compile=True``: compiled
    ViT blocks, decode loop in CUDA graphs) generating the same ids. blip_fn(model) generates with that model."""
    ours, compiled = models
    with torch.inference_mode():
        ref, got = hf_fn(), blip_fn(ours)
        sides = {"hf": hf_fn, "blip": lambda: blip_fn(ours)}
        extra = {}
        if compiled is not None:
            sides["blip_compiled"] = lambda: blip_fn(compiled)
            extra["compiled_outputs_equal"] = torch.equal(sides["blip_compiled"](), ref)
        timing = race(sides)
        flops = count_flops(sides["blip"], ours)
    return row(name, batch, torch.equal(got, ref), timing, flops, **extra)


def compiled_copy(directory: Path, args):
    """With ``--compile``: the same weights loaded again with ``compile=True``."""
    return blip.load(directory, device=args.device, dtype=args.torch_dtype, compile=True) if args.compile else None


def best_batch_rows(name, args, race, make) -> list[dict]:
    """For every batch of ``--best-batches``, a row; then which batch was fastest for each side."""
    rows = [make(b) for b in args.best_batches]
    if not rows:
        return []
    best = {side: max(rows, key=lambda r: r.get(f"{side}_img_s", 0))["batch"] for side in ("hf", "blip")}
    for r in rows:
        r["workload"], r["best_for"] = f"{name}@sweep", [s for s, b in best.items() if b == r["batch"]]
    return rows


def caption(args, directory: Path, race) -> list[dict]:
    from transformers import BlipForConditionalGeneration
    cfg = blip_config(args.size)
    hf, ours = pair(BlipForConditionalGeneration, cfg, directory, args)
    models = (ours, compiled_copy(directory, args))
    n, size = args.new_tokens, cfg.vision_config.image_size

    def make(batch: int, beams: int) -> dict:
        px = pixels(args, batch, size)
        prompt = torch.tensor([[30522, 1037, 3861, 1997]], device=args.device).expand(batch, -1)  # [DEC] a picture of
        hf_prompt = torch.cat([prompt, torch.full_like(prompt[:, :1], 102)], 1)  # HF drops a trailing [SEP]
        kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams)
        return race_generation(f"caption_{'greedy' if beams == 1 else f'beam{beams}'}", args, race, batch, models,
                               lambda: hf.generate(pixel_values=px, input_ids=hf_prompt, do_sample=False, **kw),
                               lambda model: model.generate(px, prompt, **kw))
    rows = [make(args.batch, 1), make(args.batch, 3)]
    return rows + best_batch_rows("caption_greedy", args, race, lambda b: make(b, 1))


def retrieval(args, directory: Path, race) -> list[dict]:
    from transformers import BlipForImageTextRetrieval
    cfg = blip_config(args.size)
    hf, ours = pair(BlipForImageTextRetrieval, cfg, directory, args)
    b = args.batch
    px = pixels(args, b, cfg.vision_config.image_size)
    ids = torch.randint(1000, 30000, (b, 30), generator=torch.Generator().manual_seed(1)).to(args.device)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    rows = []
    for name, hf_fn, blip_fn in (
            ("itm", lambda: hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score,
             lambda: ours.itm_logits(px, ids, mask)),
            ("itc", lambda: hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score,
             lambda: ours.itc_similarity(px, ids, mask))):
        with torch.inference_mode():
            equal = logits_close(blip_fn(), hf_fn(), args.torch_dtype)
            timing = race({"hf": hf_fn, "blip": blip_fn})
            rows.append(row(name, b, equal, timing, count_flops(blip_fn, ours)))
    return rows


def blip2(kind: str):
    def workload(args, directory: Path, race) -> list[dict]:
        from transformers import Blip2ForConditionalGeneration
        cfg = blip2_config(kind, args.size, args.device)
        hf, ours = pair(Blip2ForConditionalGeneration, cfg, directory, args)
        models = (ours, compiled_copy(directory, args))
        b, n, nq = args.batch, args.new_tokens, cfg.num_query_tokens
        px = pixels(args, b, cfg.vision_config.image_size)
        g = torch.Generator().manual_seed(2)
        prompts = {"caption": torch.full((b, 1), 2) if kind == "opt" else torch.tensor([[37, 1]] * b),
                   "vqa": torch.cat([torch.full((b, 1), 2) if kind == "opt" else torch.empty(b, 0, dtype=torch.long),
                                     torch.randint(100, 400, (b, 12), generator=g)]
                                    + ([] if kind == "opt" else [torch.ones(b, 1, dtype=torch.long)]), 1)}
        rows = []
        for task, prompt in prompts.items():
            prompt = prompt.to(args.device)
            hf_ids = torch.cat([torch.full((b, nq), cfg.image_token_index, device=args.device), prompt], 1)
            kw = dict(max_new_tokens=n, min_new_tokens=n)
            strip = nq if kind == "opt" else 0  # decoder-only HF outputs carry the image placeholders
            rows.append(race_generation(
                f"blip2_{kind}_{task}", args, race, b, models,
                lambda: hf.generate(pixel_values=px, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                                    do_sample=False, **kw)[:, strip:],
                lambda model: model.generate(px, prompt, **kw)))
        return rows
    return workload


# ---- training steps -------------------------------------------------------------------------------------------

def train_step(model, loss_fn, lr: float = 1e-5):
    """forward + backward + fused AdamW (where available) on the trainable parameters; returns the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=lr, fused=fused or None)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def autocast(args):
    return torch.autocast(args.device.split(":")[0], dtype=args.torch_dtype, enabled=args.dtype != "fp32")


def caption_train_step(args, directory: Path, race) -> list[dict]:
    """BLIP caption fine-tuning step (LM loss with label smoothing 0.1, as HF's BLIP loss), fp32 weights."""
    from transformers import BlipForConditionalGeneration
    cfg = blip_config(args.size)
    hf, ours = pair(BlipForConditionalGeneration, cfg, directory, args)
    hf.float().train(), ours.float().train()
    b = args.batch
    px = pixels(args, b, cfg.vision_config.image_size).float()
    ids = torch.cat([torch.full((b, 1), 30522), torch.randint(1000, 30000, (b, 19))], 1).to(args.device)

    def hf_loss():
        with autocast(args):
            return hf(pixel_values=px, input_ids=ids, labels=ids).loss

    def blip_loss():   # as blip's CaptionObjective: the LM head only where a target exists
        with autocast(args):
            hidden, _ = ours.decoder_states(px, ids)
            return lm_loss_from_hidden(hidden, ours.text_decoder.lm_head, ids, label_smoothing=0.1)
    equal = logits_close(blip_loss().detach(), hf_loss().detach(), args.torch_dtype)
    sides = {"hf": train_step(hf, hf_loss), "blip": train_step(ours, blip_loss)}
    return [row("caption_train_step", b, equal, race(sides), count_flops(sides["blip"]))]


def blip2_stage2_step(args, directory: Path, race) -> list[dict]:
    """BLIP-2 stage-2 step: frozen ViT and OPT, the Q-Former and projection train (same loss on both sides)."""
    from transformers import Blip2ForConditionalGeneration
    cfg = blip2_config("opt", args.size, args.device)
    hf, ours = pair(Blip2ForConditionalGeneration, cfg, directory, args)
    b, nq = args.batch, cfg.num_query_tokens
    px = pixels(args, b, cfg.vision_config.image_size)
    ids = torch.cat([torch.full((b, 1), 2), torch.randint(100, 400, (b, 19))], 1).to(args.device)
    hf_ids = torch.cat([torch.full((b, nq), cfg.image_token_index, device=args.device), ids], 1)
    for model, frozen in ((hf, (hf.vision_model, hf.language_model)), (ours, (ours.image_encoder, ours.llm))):
        model.train().requires_grad_(True)
        for part in frozen:
            part.eval().requires_grad_(False)

    def hf_loss():
        with autocast(args):
            return lm_loss(hf(pixel_values=px, input_ids=hf_ids).logits[:, nq:], ids)

    def blip_loss():
        with autocast(args):
            return lm_loss(ours(px, ids).logits, ids)
    equal = logits_close(blip_loss().detach(), hf_loss().detach(), args.torch_dtype)
    sides = {"hf": train_step(hf, hf_loss), "blip": train_step(ours, blip_loss)}
    return [row("blip2_stage2_step", b, equal, race(sides), count_flops(sides["blip"]))]


def blip_only_step(name: str, arch: dict, task: str, image_size: int | None):
    """A pretraining step with no HF counterpart (HF has no BLIP / BLIP-2 pretraining objective): blip alone."""
    def workload(args, directory: Path, race) -> list[dict]:
        overrides = {"image_size": image_size} if image_size and args.size == "real" else {}
        model = blip.create_model(arch[args.size], task, **overrides).to(args.device).train()
        size = (model.cfg if hasattr(model, "cfg") else model.model.cfg).vision.image_size  # stage 1: an objective
        b = args.batch
        batch = {"pixel_values": pixels(args, b, size).float(), "image_ids": torch.arange(b),
                 "text": [f"a picture of {i} red shapes on a table" for i in range(b)]}

        def loss():
            with autocast(args):
                return model(batch)["loss"]
        step = train_step(model, loss)
        return [row(name, b, None, race({"blip": step}), count_flops(step))]
    return workload


def finetune_memory(args, directory: Path, race) -> list[dict]:
    """One BLIP-2 (OPT) fine-tuning step, full (the blip2_caption recipe: ViT, Q-Former and projection train, the LLM
    frozen) and LoRA (r 8 on the LLM's q_proj / v_proj through peft, everything else frozen), HF and blip alike.
    Each side is built, measured and freed alone (two ViT-g with optimizer state would not fit a 24 GB CPU box):
    peak memory above the model's own weights over the first step (gradients, AdamW state, activations), and the
    median time of ``--iters`` steps (the first included)."""
    import gc
    import statistics
    import time

    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Blip2ForConditionalGeneration

    from benchmark_tools import PeakMemory, release_free_heap, sync
    from blip.models.blip2_finetune import set_vit_trainable
    from blip.models.lora import LoraSettings, apply_lora

    cfg = blip2_config("opt", args.size, args.device)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(directory)
    b, nq = args.batch, cfg.num_query_tokens
    px = pixels(args, b, cfg.vision_config.image_size)
    ids = torch.cat([torch.full((b, 1), 2), torch.randint(100, 400, (b, 19))], 1).to(args.device)
    hf_ids = torch.cat([torch.full((b, nq), cfg.image_token_index, device=args.device), ids], 1)

    def hf_side(mode: str):
        model = Blip2ForConditionalGeneration.from_pretrained(directory, local_files_only=True,
                                                              trust_remote_code=False).to(args.device).train()
        model.requires_grad_(mode == "full")
        model.language_model.requires_grad_(False).eval()
        if mode == "lora":
            inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                               target_modules=["q_proj", "v_proj"]), model.language_model)
        return model, lambda: lm_loss(model(pixel_values=px, input_ids=hf_ids).logits[:, nq:], ids)

    def blip_side(mode: str):
        model = blip.load(directory).to(args.device).train()
        if mode == "full":
            set_vit_trainable(model)
        else:
            apply_lora(model, LoraSettings(r=8, towers=("llm",)))
        return model, lambda: lm_loss(model(px, ids).logits, ids)

    rows = []
    for mode in ("full", "lora"):
        timing, trainable = {}, {}
        for side, build in (("hf", hf_side), ("blip", blip_side)):
            model, loss_fn = build(mode)
            trainable[side] = sum(p.numel() for p in model.parameters() if p.requires_grad)

            def loss(fn=loss_fn):
                with autocast(args):
                    return fn()
            step = train_step(model, loss)
            times = []
            with PeakMemory(args.device) as mem:   # the first step: gradients and AdamW state appear
                sync(args.device)
                t0 = time.perf_counter()
                step()
                sync(args.device)
                times.append(time.perf_counter() - t0)
            for _ in range(args.iters - 1):   # more steps only refine the time (one ViT-g step is minutes on a CPU)
                sync(args.device)
                t0 = time.perf_counter()
                step()
                sync(args.device)
                times.append(time.perf_counter() - t0)
            timing[side] = {"s": statistics.median(times), "peak_mb": mem.peak / 2 ** 20}
            del model, step, loss_fn
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            release_free_heap()
        rows.append(row(f"blip2_finetune_{mode}_step", b, None, timing, None, hf_trainable=trainable["hf"],
                        blip_trainable=trainable["blip"]))
    return rows


# ---- loading ------------------------------------------------------------------------------------------------

LOAD_PROBE = """
import gc, json, sys, time
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/scripts"]
import torch, transformers, blip
from benchmark_tools import PeakMemory
side, path, warm = sys.argv[1:4]

def load(path):
    if side == "blip":  # its NaN/inf check runs at the first call (the weights stay memory-mapped until then)
        return blip.load(path)
    cls = getattr(transformers, json.load(open(path + "/config.json"))["architectures"][0])
    return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)

load(warm)  # a tiny model of the same class first: imports are not part of loading
gc.collect()
with PeakMemory("cpu") as mem:
    t0 = time.perf_counter()
    model = load(path)
    seconds = time.perf_counter() - t0
print(json.dumps({"s": seconds, "peak_mb": mem.peak / 2 ** 20}))
"""


def loading(args, directory: Path, race) -> list[dict]:
    """``blip.load`` vs ``from_pretrained`` of the same HF directory (fp32, CPU), each in a fresh process. Both map
    the weights file without reading it; blip's NaN/inf check reads the weights at the model's first call."""
    from transformers import Blip2ForConditionalGeneration, BlipForConditionalGeneration
    rows = []
    for name, cls, cfg, tiny in (
            ("load_blip_caption", BlipForConditionalGeneration, blip_config(args.size), blip_config("tiny")),
            ("load_blip2_opt", Blip2ForConditionalGeneration, blip2_config("opt", args.size, "cpu"),
             blip2_config("opt", "tiny", "cpu"))):
        path, warm = directory / name, directory / f"{name}_warm"
        torch.manual_seed(0)
        cls(cfg).save_pretrained(path)
        cls(tiny).save_pretrained(warm)
        weights_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2 ** 20
        runs = {side: [] for side in ("hf", "blip")}
        for _ in range(max(1, args.iters)):  # interleaved: a busy machine slows every side alike
            for side, done in runs.items():
                probe = [sys.executable, "-c", LOAD_PROBE, side, str(path), str(warm), str(ROOT)]
                done.append(json.loads(subprocess.run(probe, check=True, capture_output=True,
                                                      text=True).stdout.splitlines()[-1]))
        timing = {side: {"s": sorted(r["s"] for r in done)[len(done) // 2], "peak_mb": max(r["peak_mb"] for r in done)}
                  for side, done in runs.items()}
        r = row(name, 1, None, timing, None, weights_mb=round(weights_mb, 1))
        r["blip_peak_over_weights"] = timing["blip"]["peak_mb"] / weights_mb
        r["hf_peak_over_weights"] = timing["hf"]["peak_mb"] / weights_mb
        rows.append(r)
    return rows


WORKLOADS = {
    "caption": caption,
    "retrieval": retrieval,
    "blip2_opt": blip2("opt"),
    "blip2_t5": blip2("t5"),
    # "caption_dir": the `blip caption-dir` end-to-end row lives in its own function, registered here
    "caption_train_step": caption_train_step,
    "blip_pretrain_step": blip_only_step("blip_pretrain_step", {"real": "blip_base", "tiny": "blip_tiny"},
                                         "pretrain", 224),
    "blip2_stage1_step": blip_only_step("blip2_stage1_step", {"real": "blip2_vitg_qformer",
                                                              "tiny": "blip2_tiny_qformer"}, "stage1", None),
    "blip2_stage2_step": blip2_stage2_step,
    "finetune_memory": finetune_memory,
    "load": loading,
}
