"""Procedurally generated image–caption data: one coloured shape per image, described by its caption.

The embedded default run trains on it offline. Every image shows a single shape whose size, colour, kind and position
are all named in the caption ("a small red circle in the top left"), so a model that learns shows it in retrieval
recall and in the attribute accuracy of its captions. The data is written once as webdataset shards (the layout
img2dataset writes: `{key}.jpg`, `{key}.txt`, `{key}.json`) into a cache directory, so training reads it through the
same shard pipeline as real data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = ("small", "large")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
ATTRIBUTES = ("size", "color", "shape", "position")
FORMAT_VERSION = 2  # bump when rendering or metadata change, so stale caches are not reused


def scene_id(attrs: dict[str, str]) -> int:
    """One id per attribute combination. It is the sample's `image_id`: images with the same description count as
    the same image, so ITM never draws an identically described pair as a "negative" and ITC with id positives
    treats them as matches (the real datasets' convention: same id = same content)."""
    values = (SIZES, tuple(COLORS), SHAPES, POSITIONS)
    index = 0
    for name, options in zip(ATTRIBUTES, values):
        index = index * len(options) + options.index(attrs[name])
    return index


def caption_for(attrs: dict[str, str]) -> str:
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} in the {attrs['position']}"


def parse_attributes(text: str) -> dict[str, str | None]:
    """Attributes named in a (generated) caption; None where the caption names none or several."""
    text = " " + " ".join(text.lower().replace(",", " ").split()) + " "
    found: dict[str, str | None] = {}
    for name, values in (("size", SIZES), ("color", tuple(COLORS)), ("shape", SHAPES), ("position", POSITIONS)):
        hits = [v for v in values if f" {v} " in text]
        if name == "position" and len(hits) > 1:  # "top left" must not also count as e.g. "center"
            hits = [h for h in hits if h != "center"] or hits
        found[name] = hits[0] if len(hits) == 1 else None
    return found


def render_sample(rng: np.random.Generator, image_size: int = 64) -> tuple[Image.Image, dict[str, str]]:
    """One image [image_size, image_size] RGB and its attributes, drawn from `rng`."""
    attrs = {
        "size": SIZES[rng.integers(len(SIZES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }
    s = image_size
    background = rng.integers(0, 90, size=3)  # dark, varied backgrounds keep colour words meaningful
    noise = rng.integers(-12, 13, size=(s, s, 3))
    pixels = np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    radius = s * (0.11 if attrs["size"] == "small" else 0.21) * rng.uniform(0.9, 1.1)
    centers = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
               "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
    cx, cy = (c * s + rng.uniform(-0.04, 0.04) * s for c in centers[attrs["position"]])
    color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[attrs["color"]])
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if attrs["shape"] == "circle":
        draw.ellipse(box, fill=color)
    elif attrs["shape"] == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
    return image, attrs


@dataclass(frozen=True)
class SyntheticShards:
    """Where the shards of each split are, and how many samples each split holds."""

    root: Path
    train_urls: list[str]
    val_urls: list[str]
    num_train: int
    num_val: int


def default_cache_root() -> Path:
    return Path(os.environ.get("BLIP_CACHE", Path.home() / ".cache" / "blip")) / "synthetic"


def _write_split(directory: Path, split: str, num: int, shard_size: int, image_size: int, seed: int) -> list[str]:
    import webdataset as wds  # imported here: only writers need it

    names = []
    split_seed = {"train": 0, "val": 1}[split]
    for shard, start in enumerate(range(0, num, shard_size)):
        name = f"{split}-{shard:06d}.tar"
        rng = np.random.default_rng([seed, split_seed, shard])
        with wds.TarWriter(str(directory / name)) as sink:
            for index in range(start, min(num, start + shard_size)):
                image, attrs = render_sample(rng, image_size)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=92)
                key = f"{split_seed}{index:08d}"
                meta = dict(attrs, image_id=scene_id(attrs), caption=caption_for(attrs))
                sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption_for(attrs),
                            "json": json.dumps(meta).encode()})
        names.append(name)
    return names


def ensure_synthetic_shards(root: str | Path | None = None, *, num_train: int = 20000, num_val: int = 500,
                            shard_size: int = 1000, image_size: int = 64, seed: int = 0) -> SyntheticShards:
    """Write the shards on first use (atomically: a temp directory renamed into place) and return their paths.

    Parallel callers (e.g. the ranks of one job) may all write; the first rename wins and the others discard theirs.
    """
    params = dict(v=FORMAT_VERSION, num_train=num_train, num_val=num_val, shard_size=shard_size,
                  image_size=image_size, seed=seed)
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(root) if root is not None else default_cache_root()
    target = base / f"shapes-{tag}"
    if not (target / "meta.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".shapes-{tag}-", dir=base))
        try:
            train = _write_split(tmp, "train", num_train, shard_size, image_size, seed)
            val = _write_split(tmp, "val", num_val, shard_size, image_size, seed)
            (tmp / "meta.json").write_text(json.dumps(dict(params, train=train, val=val), indent=1))
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished first
                if not (target / "meta.json").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((target / "meta.json").read_text())
    return SyntheticShards(root=target, train_urls=[str(target / n) for n in meta["train"]],
                           val_urls=[str(target / n) for n in meta["val"]], num_train=num_train, num_val=num_val)


def caption_vocabulary() -> list[str]:
    """Every word a synthetic caption can contain."""
    words = {"a", "in", "the", *SIZES, *COLORS, *SHAPES}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


def synthetic_llm_tokenizer():
    """A word-level tokenizer over the caption vocabulary with OPT's conventions (pad 1, bos = eos = `</s>` 2,
    "\\n" as a token for the OPT caption eos, right padding): the tokenizer of the tiny stand-in LLM of the
    stage-2 default, which has no pretrained tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "\n"]
    vocab = {token: i for i, token in enumerate(specials + caption_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                 pre_tokenizers.Split(Regex(" +"), behavior="removed")])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")
