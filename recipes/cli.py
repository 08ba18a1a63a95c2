"""`nrr`: one subcommand per stage. A thin layer: it resolves the config and calls the recipe.

    nrr <stage> [--config FILE.yaml] [key.sub=value ...]

Each stage module exposes `HELP` (one line), `add_arguments(parser)` (optional) and `cli(args)`.
Subcommands are listed here by module path and only imported when used, so `nrr --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A stage appears here when it lands.
STAGES: dict[str, tuple[str, str]] = {
    "task": ("recipes.task_cli", "Show or export problems of the embedded arithmetic reasoning task."),
    "sft": ("recipes.sft", "Supervised fine-tuning (reasoning-trace distillation) with megatron-core."),
    "kd": ("recipes.kd", "Logit knowledge distillation from a teacher checkpoint (forward/reverse KL, top-k)."),
    "curate": ("recipes.curate", "Curate a long chain-of-thought corpus with NeMo Curator (teacher, filters, dedup, decontam)."),
    "data": ("recipes.data_cli", "List the shipped datasets (benchmarks, GSM8K train) or prepare them from a local copy or the hub."),
    "teacher": ("recipes.teacher.cli", "Serve the embedded OpenAI-compatible teacher (R1-style traces, labelled defects)."),
    "grpo": ("recipes.grpo", "GRPO / Dr.GRPO / DAPO with vLLM rollouts on the Megatron policy; rejection sampling."),
    "convert": ("recipes.convert", "Convert checkpoints: HF -> Megatron, Megatron -> HF, random-init base."),
    "eval": ("recipes.eval", "Evaluate reasoning on math benchmarks and the embedded task; grade files; compare runs."),
    "bench": ("recipes.bench", "Benchmarks per stage, reported as ratios measured in one run."),
    "launch": ("recipes.launch", "Run a stage or the whole pipeline through NeMo-Run (local, Slurm, Kubernetes)."),
    "pipeline": ("recipes.pipeline", "Run the whole pipeline (curate, SFT, GRPO, eval, export) as one NeMo-Run experiment."),
    "regress": ("recipes.regress", "Run the regression suite against golden metrics and write a pass/fail table."),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nrr",
        description="NeMo Reasoning Recipes: curate long chain-of-thought data, distill it into a student "
        "with megatron-core, reinforce with GRPO on vLLM rollouts, evaluate, export, launch.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, (module, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\nnrr: unknown stage '{argv[0]}'", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    module_name, help_text = STAGES[argv[0]]
    module = importlib.import_module(module_name)
    stage_parser = argparse.ArgumentParser(prog=f"nrr {argv[0]}", description=help_text)
    module.add_arguments(stage_parser)
    args = stage_parser.parse_args(argv[1:])
    from recipes.config import ConfigError

    try:
        return int(module.cli(args) or 0)
    except ConfigError as err:
        print(f"nrr {argv[0]}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
