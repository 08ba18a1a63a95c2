"""Supervised fine-tuning (distillation of reasoning traces) on megatron-core.

    nrr sft --config nemo_configs/sft/tiny_cpu.yaml training.max_steps=200 parallel.tp=2

The shared trainer (`recipes.trainer`) does the work with its own cross-entropy loss: read the chat corpus ->
tokenize with an assistant-only loss mask -> pack rows -> AdamW over global batches -> checkpoints -> a Hugging
Face export in `<output_dir>/hf`. One process runs when tp*pp*dp == 1; otherwise the command re-launches itself
under `torch.distributed.run` with tp*pp*dp processes (per node).
"""

from __future__ import annotations

import sys

from recipes.stages import STAGES
from recipes.trainer import SFTConfig, check_config, run_stage, train

HELP = STAGES["sft"].help
DEFAULT_CONFIG = STAGES["sft"].default_config


def add_arguments(parser) -> None:
    from recipes.config import add_config_arguments

    add_config_arguments(parser, DEFAULT_CONFIG)


def cli(args) -> int:
    return run_stage("recipes.sft", SFTConfig, args.config, args.overrides, check_config, train)


def _main() -> int:
    from recipes.megatron import runtime

    return runtime.torchrun_main("recipes.sft", HELP, add_arguments, cli)


if __name__ == "__main__":
    sys.exit(_main())
