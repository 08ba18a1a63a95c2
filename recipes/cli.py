"""`nrr`: one subcommand per stage. A thin layer: it resolves the config and calls the recipe.

    nrr <stage> [--config FILE.yaml] [key.sub=value ...]

Stages come from the one stage table (`recipes.stages`: module, help line, default config, launcher, output key).
Each stage module exposes `add_arguments(parser)` and `cli(args)` and is only imported when used, so
`nrr --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from recipes.stages import STAGES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nrr",
        description="NeMo Reasoning Recipes: curate long chain-of-thought data, distill it into a student "
        "with megatron-core, reinforce with GRPO on vLLM rollouts, evaluate, export, launch.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, stage in STAGES.items():
        sub.add_parser(name, help=stage.help, add_help=False)
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
    stage = STAGES[argv[0]]
    module = importlib.import_module(stage.module)
    stage_parser = argparse.ArgumentParser(prog=f"nrr {argv[0]}", description=stage.help)
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
