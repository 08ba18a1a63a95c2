"""`nrr distill`: on-policy distillation, the GRPO loop (vLLM rollouts, refit, the Megatron trainer) with a frozen
teacher scoring the student's own samples (`distill.*`, `recipes/distillation.py`).

    nrr distill --config nemo_configs/grpo/opd_tiny_cpu.yaml distill.mode=topk distill.top_k=64

The same run as `nrr grpo` with a teacher, which this command requires: `distill.teacher` (a checkpoint or HF
folder, held in the student's TP/PP layout) or `distill.teacher_url` (a vLLM server's prompt log-probs). Modes:
`on_policy` (each sampled token's advantage is log p_teacher - log p_student), `topk` (forward / reverse / mixed
KL on the teacher's top-k tokens), `kdrl` (GRPO's reward plus a scheduled KL to the teacher).
"""

from __future__ import annotations

from recipes.stages import STAGES

HELP = STAGES["distill"].help
DEFAULT_CONFIG = STAGES["distill"].default_config


def check_config(cfg) -> None:
    from recipes.config import ConfigError
    from recipes.grpo import check_config as check_grpo

    if not (cfg.distill.teacher or cfg.distill.teacher_url):
        raise ConfigError("nrr distill needs a teacher: set distill.teacher=<Megatron checkpoint or HF folder> or "
                          "distill.teacher_url=<a vLLM server's /v1> (GRPO without a teacher is `nrr grpo`)")
    if cfg.mode != "train":
        raise ConfigError(f"mode={cfg.mode}: nrr distill trains; rejection sampling is `nrr grpo rejection-sample`")
    check_grpo(cfg)


def add_arguments(parser) -> None:
    from recipes.config import add_config_arguments

    add_config_arguments(parser, DEFAULT_CONFIG)


def cli(args) -> int:
    from recipes.grpo import GRPOConfig, run
    from recipes.trainer import run_stage

    # ranks beyond the first start as `python -m recipes.grpo` with the same config: the loop is GRPO's
    return run_stage("recipes.grpo", GRPOConfig, args.config, list(args.overrides), check_config, run)
