"""Named pretrained checkpoints: where the official files live and how to load them.

blip never downloads. ``blip.load("blip-base-caption")`` looks for the file under ``$BLIP_HOME`` (default
``~/.cache/blip``) and, when it's missing, raises an error with the URL to fetch it from.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

BLIP_GCS = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models"
LAVIS_GCS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models"


@dataclass(frozen=True)
class Pretrained:
    url: str              # original file (BLIP / LAVIS .pth) or HF hub repo id
    arch: str
    task: str
    image_size: int
    needs: tuple[str, ...] = ()   # other files the checkpoint relies on (frozen ViT, LLM directory)
    options: dict = field(default_factory=dict)  # how the original evaluates it (blip.load defaults)


def _coco_caption(min_new_tokens: int) -> dict:
    return {"prompt": "a photo of", "generation": {"num_beams": 5, "max_new_tokens": 30,
                                                   "min_new_tokens": min_new_tokens}}


PRETRAINED: dict[str, Pretrained] = {
    # BLIP (salesforce/BLIP releases)
    "blip-base": Pretrained(f"{BLIP_GCS}/model_base.pth", "blip_base", "pretrain", 224),
    "blip-base-capfilt-large": Pretrained(f"{BLIP_GCS}/model_base_capfilt_large.pth", "blip_base", "pretrain", 224),
    "blip-large": Pretrained(f"{BLIP_GCS}/model_large.pth", "blip_large", "pretrain", 224),
    "blip-base-caption": Pretrained(f"{BLIP_GCS}/model_base_caption_capfilt_large.pth", "blip_base", "caption", 384),
    "blip-large-caption": Pretrained(f"{BLIP_GCS}/model_large_caption.pth", "blip_large", "caption", 384),
    "blip-base-vqa": Pretrained(f"{BLIP_GCS}/model_base_vqa_capfilt_large.pth", "blip_base", "vqa", 480),
    "blip-base-retrieval-coco": Pretrained(f"{BLIP_GCS}/model_base_retrieval_coco.pth", "blip_base", "retrieval", 384),
    "blip-large-retrieval-coco": Pretrained(f"{BLIP_GCS}/model_large_retrieval_coco.pth",
                                            "blip_large", "retrieval", 384),
    "blip-base-retrieval-flickr": Pretrained(f"{BLIP_GCS}/model_base_retrieval_flickr.pth",
                                             "blip_base", "retrieval", 384),
    "blip-base-nlvr": Pretrained(f"{BLIP_GCS}/model_base_nlvr.pth", "blip_base", "nlvr", 384),   # LAVIS blip_nlvr too
    # unimodal weights BLIP pretraining starts from (model.vision_init / model.text_init)
    "deit-base-patch16-224": Pretrained("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
                                        "blip_base", "vision", 224),
    "vit-large-patch16-224-in21k": Pretrained(
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
        "jx_vit_large_patch16_224_in21k-606da67d.pth", "blip_large", "vision", 224),
    "bert-base-uncased": Pretrained("bert-base-uncased", "blip_base", "text", 224),
    # HF transformers ports
    "hf-blip-image-captioning-base": Pretrained("Salesforce/blip-image-captioning-base", "blip_base", "caption", 384),
    "hf-blip-image-captioning-large": Pretrained("Salesforce/blip-image-captioning-large",
                                                 "blip_large", "caption", 384),
    "hf-blip-vqa-base": Pretrained("Salesforce/blip-vqa-base", "blip_base", "vqa", 384),
    "hf-blip-itm-base-coco": Pretrained("Salesforce/blip-itm-base-coco", "blip_base", "retrieval", 384),
    # BLIP-2 (LAVIS releases: trainable parameters only; the ViT and the LLM come from elsewhere)
    "blip2-clip-vit-l": Pretrained(f"{LAVIS_GCS}/BLIP2/clip_vit_L.pth", "blip2_vitL_qformer", "vision", 224),
    "blip2-eva-vit-g": Pretrained(f"{LAVIS_GCS}/BLIP2/eva_vit_g.pth", "blip2_vitg_qformer", "vision", 224),
    "blip2-pretrain": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained.pth", "blip2_vitg_qformer", "qformer", 224,
                                 needs=("blip2-eva-vit-g",)),
    "blip2-pretrain-vitl": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_vitL.pth", "blip2_vitL_qformer", "qformer",
                                      224, needs=("blip2-clip-vit-l",)),
    "blip2-pretrain-opt2.7b": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_opt2.7b.pth", "blip2_vitg_opt2.7b",
                                         "stage2", 224, needs=("blip2-eva-vit-g", "facebook/opt-2.7b")),
    "blip2-pretrain-opt6.7b": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_opt6.7b.pth", "blip2_vitg_opt6.7b",
                                         "stage2", 224, needs=("blip2-eva-vit-g", "facebook/opt-6.7b")),
    "blip2-pretrain-flant5xl": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_flant5xl.pth", "blip2_vitg_flant5xl",
                                          "stage2", 224, needs=("blip2-eva-vit-g", "google/flan-t5-xl")),
    "blip2-pretrain-flant5xxl": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_flant5xxl.pth", "blip2_vitg_flant5xxl",
                                           "stage2", 224, needs=("blip2-eva-vit-g", "google/flan-t5-xxl")),
    "blip2-pretrain-flant5xl-vitl": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_pretrained_flant5xl_vitL.pth",
                                               "blip2_vitL_flant5xl", "stage2", 224,
                                               needs=("blip2-clip-vit-l", "google/flan-t5-xl")),
    # COCO-finetuned Q-Former (LAVIS blip2_coco: its retrieval model; ViT fine-tuned at 364 px, in the file)
    "blip2-finetune-coco": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_finetune_coco.pth", "blip2_vitg_qformer", "qformer",
                                      364),
    # COCO-finetuned captioners (ViT fine-tuned at 364 px, in the file): LAVIS caption_coco_* prompt "a photo of",
    # beam 5, max_len 30, min_len 8 (which counts T5's decoder start: 7 new tokens)
    "blip2-caption-coco-opt2.7b": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_caption_opt2.7b.pth", "blip2_vitg_opt2.7b",
                                             "stage2", 364, needs=("facebook/opt-2.7b",),
                                             options=_coco_caption(min_new_tokens=8)),
    "blip2-caption-coco-opt6.7b": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_caption_opt6.7b.pth", "blip2_vitg_opt6.7b",
                                             "stage2", 364, needs=("facebook/opt-6.7b",),
                                             options=_coco_caption(min_new_tokens=8)),
    "blip2-caption-coco-flant5xl": Pretrained(f"{LAVIS_GCS}/BLIP2/blip2_caption_flant5xl.pth", "blip2_vitg_flant5xl",
                                              "stage2", 364, needs=("google/flan-t5-xl",),
                                              options=_coco_caption(min_new_tokens=7)),
    "hf-blip2-opt-2.7b": Pretrained("Salesforce/blip2-opt-2.7b", "blip2_vitg_opt2.7b", "stage2", 224),
    "hf-blip2-flan-t5-xl": Pretrained("Salesforce/blip2-flan-t5-xl", "blip2_vitg_flant5xl", "stage2", 224),
    "hf-blip2-itm-vit-g": Pretrained("Salesforce/blip2-itm-vit-g", "blip2_vitg_qformer", "qformer", 224),
    "hf-instructblip-vicuna-7b": Pretrained("Salesforce/instructblip-vicuna-7b", "instructblip_vicuna7b",
                                            "instruct", 224),
}


def cache_dir() -> Path:
    return Path(os.environ.get("BLIP_HOME", Path.home() / ".cache" / "blip"))


# an HF hub repository id, "org/name" (HF allows letters, digits, "-", "_", "." in each part)
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's rule: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of HF hub repository ``repo_id`` ("org/name") that the local Hugging Face cache holds: the
    revision ``refs/main`` names, else its only snapshot; None when the cache does not hold one. Reads the cache
    folder only (no huggingface_hub call, never a download)."""
    if not HF_REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        return None
    repo = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() and snapshot.parent == repo / "snapshots" else None
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
    return snapshots[0] if len(snapshots) == 1 else None


def resolve(name: str) -> Path:
    """Local path of a named checkpoint (a file for .pth releases, a directory for HF repos: under ``$BLIP_HOME``,
    or the repository's snapshot in the Hugging Face cache)."""
    if name not in PRETRAINED:
        raise KeyError(f"unknown pretrained name {name!r}; known: {sorted(PRETRAINED)}")
    entry = PRETRAINED[name]
    is_hf = not entry.url.startswith("http")
    local = cache_dir() / (entry.url.replace("/", "--") if is_hf else entry.url.rsplit("/", 1)[-1])
    if not local.exists() and is_hf:
        local = hf_cache_snapshot(entry.url) or local
    if not local.exists():
        how = (f"`huggingface-cli download {entry.url} --local-dir {local}` (or into the Hugging Face cache, "
               f"{hf_cache_dir()})" if is_hf else f"`wget -P {cache_dir()} {entry.url}`")
        raise FileNotFoundError(f"{name}: {local} is not there and blip never downloads. Fetch it with {how}, "
                                f"or pass the path to blip.load directly.")
    return local
