"""Evaluate a checkpoint on a benchmark with its original protocol (configs/evaluate/; tasks in docs/data.md).

    python scripts/evaluate.py task=caption_coco split=test checkpoint=model_base_caption_capfilt_large.pth \
        data.root=/data/coco output_dir=outputs/eval/caption_coco
    torchrun --nproc_per_node 8 scripts/evaluate.py task=retrieval_coco checkpoint=... data.root=...

Tasks: caption_coco, caption_nocaps, vqa_v2, okvqa, gqa, retrieval_coco, retrieval_flickr. Missing data files are
listed (with where to get them) before the model loads; a killed evaluation re-run with the same output_dir skips
what was done.

Your own held-out split (caption, vqa or instruction rows; formats in blip/data/custom.py):

    python scripts/evaluate.py task=custom data.val=my_val.jsonl checkpoint=outputs/my_run output_dir=outputs/eval/my
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from blip.cli import errors_as_one_line, hydra_help_argv
from blip.data.eval_datasets import read_task_data


@hydra.main(config_path="../configs/evaluate", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    with errors_as_one_line():   # missing data, a bad checkpoint...: `error: ...`, exit 2
        evaluate_task(cfg)


def evaluate_task(cfg: DictConfig) -> None:
    from blip.data.custom import CustomDataError, read_custom
    if cfg.task.kind == "custom":   # read before the model loads, as the benchmarks' files are
        if not cfg.data.val:
            raise CustomDataError("task=custom needs data.val=<the split to evaluate>")
        data = read_custom(cfg.data.val, cfg.data.image_root, strict=bool(cfg.task.strict))
    else:
        data = read_task_data(cfg.task, cfg.split, cfg.data.root)   # lists every missing file
    import torch

    from blip.api import load_for_evaluation
    from blip.convert.formats import read_checkpoint
    from blip.evaluation.runner import context_settings, evaluate, own_prompt_protocol
    from blip.train.distributed import init_distributed

    info = init_distributed(cfg.device)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = load_for_evaluation(str(cfg.checkpoint), model_cfg, info.device, cfg.precision)
    label = {"checkpoint": str(cfg.checkpoint), "zero_shot": bool(cfg.zero_shot)}
    if cfg.task.kind == "custom":   # one process: a custom split is small next to the benchmarks
        if info.is_main:
            from blip.evaluation.custom import run_custom
            ctx = context_settings(cfg, info)
            run_custom(model, data, cfg.task, cfg.output_dir, device=info.device, batch_size=ctx["batch_size"],
                       autocast_dtype=ctx["autocast_dtype"], label={"checkpoint": label["checkpoint"]})
    else:
        task = cfg.task
        if read_checkpoint(str(cfg.checkpoint)).run is not None:   # a training run: the prompt it trained with
            task = own_prompt_protocol(task, model)
        evaluate(model, task, cfg.split, cfg.data.root, cfg.output_dir, context_settings(cfg, info), data=data,
                 label=label)
    if info.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.argv = hydra_help_argv(sys.argv, "task", "caption_coco")
    main()
