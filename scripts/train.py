"""Train BLIP / BLIP-2. `python scripts/train.py stage=1` runs the embedded CPU default; see configs/train.yaml.

Multi-GPU: `torchrun --nproc_per_node 8 scripts/train.py stage=1 model=blip_base data=pretrain_14m
trainer=blip_pretrain`; any config value can be overridden on the command line (key=value).
"""

import sys

import hydra
from omegaconf import DictConfig

from blip.cli import errors_as_one_line, hydra_help_argv
from blip.train.run import quote_stage_override, run


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    with errors_as_one_line():   # a named error (config, data, checkpoint): `error: ...`, exit 2
        run(cfg)


if __name__ == "__main__":
    sys.argv = quote_stage_override(hydra_help_argv(sys.argv, "stage", "1"))
    main()
