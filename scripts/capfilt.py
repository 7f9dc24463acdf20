"""CapFilt: caption + filter an image–text dataset into new webdataset shards; see configs/capfilt.yaml.

`torchrun --nproc_per_node N scripts/capfilt.py ...` shards the work by rank (no process group needed); re-running
the same command resumes after a crash.
"""

import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from blip.api import load_task_model
from blip.capfilt import CapFilt, CapFiltConfig, CapFiltInput
from blip.cli import errors_as_one_line

DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(spec: DictConfig, task: str, device: torch.device, dtype):
    model = load_task_model(spec.source, spec.arch, task, spec.get("image_size")).to(device)
    return (model.to(dtype) if dtype is not None else model).eval()


@hydra.main(config_path="../configs", config_name="capfilt", version_base=None)
def main(cfg: DictConfig) -> None:
    with errors_as_one_line():   # a bad source, settings or input: `error: ...`, exit 2
        capfilt(cfg)


def capfilt(cfg: DictConfig) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = DTYPES[cfg.dtype]
    source = CapFiltInput(urls=OmegaConf.to_container(cfg.input.urls) if OmegaConf.is_list(cfg.input.urls)
                          else cfg.input.urls, annotation=cfg.input.annotation, image_root=cfg.input.image_root,
                          images_per_unit=cfg.capfilt.images_per_unit)
    job = CapFilt(build(cfg.captioner, "caption", device, dtype), build(cfg.filter, "retrieval", device, dtype),
                  CapFiltConfig(**OmegaConf.to_container(cfg.capfilt)), device=device)
    provenance = {name: {"source": str(spec.source), "arch": spec.arch, "image_size": spec.get("image_size")}
                  for name, spec in (("captioner", cfg.captioner), ("filter", cfg.filter))}
    summary = job.run(source, cfg.output_dir, rank=rank, world_size=world, wait_timeout_s=cfg.wait_timeout_s,
                      provenance=provenance)
    if summary is not None:
        print(f"capfilt: {summary['images_in']} images in, {summary['images_skipped']} skipped, "
              f"{summary['num_samples']} samples in {len(summary['shards'])} shards; captions {summary['captions']}")


if __name__ == "__main__":
    main()
