"""`nrr bench <stage>`: speed and quality-of-implementation benchmarks, reported as ratios from one run.

Each stage's benchmark is a module of this package (`recipes/bench/<stage>.py`, a `bench_<stage>(**kwargs) -> dict`
function); this module only dispatches and prints the result as JSON (and writes it with --output).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from recipes.stages import STAGES

HELP = STAGES["bench"].help
BENCHES = ("sft", "curate", "eval", "grpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bench", choices=BENCHES, help="which stage to benchmark")
    parser.add_argument("--output", help="also write the result JSON here")
    parser.add_argument("options", nargs="*", metavar="key=value", help="keyword arguments of bench_<stage>()")


def _parse_options(options: list[str]) -> dict:
    import yaml

    out = {}
    for text in options:
        if "=" not in text:
            raise SystemExit(f"nrr bench: option '{text}' must look like key=value")
        key, raw = text.split("=", 1)
        out[key] = yaml.safe_load(raw)
    return out


def cli(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"recipes.bench.{args.bench}")
    result = getattr(module, f"bench_{args.bench}")(**_parse_options(args.options))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0

