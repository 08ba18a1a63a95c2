"""`nrr task`: show or export problems of the embedded arithmetic task (train or held-out split)."""

from __future__ import annotations

import argparse
import json
import sys

from recipes import task
from recipes.stages import STAGES

HELP = STAGES["task"].help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels", default="1,2,3", help="comma-separated levels (number of operations)")
    parser.add_argument("--n", type=int, default=5, help="problems per level")
    parser.add_argument("--split", choices=["train", "heldout"], default="train")
    parser.add_argument("--seed", type=int, default=0, help="train split only; held-out is fixed")
    parser.add_argument("--output", help="write JSONL here instead of printing a table")


def cli(args: argparse.Namespace) -> int:
    levels = [int(x) for x in args.levels.split(",") if x]
    if args.split == "heldout":
        problems = task.heldout_problems(levels, args.n)
    else:
        problems = task.train_problems(levels, args.n, seed=args.seed)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p.to_dict()) + "\n")
        print(f"wrote {len(problems)} problems to {args.output}", file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "level", "problem", "reasoning", "answer")
    for p in problems:
        table.add_row(p.id, str(p.level), p.question, task.cot_text(p), p.answer)
    Console().print(table)
    return 0
