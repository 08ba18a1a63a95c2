"""`nrr data`: the datasets in the data root, and how to build them again.

    nrr data list                              what is present, its source, license and checksum
    nrr data prepare math500 --from DIR|FILE   from a local copy in the upstream schema
    nrr data prepare all                       every dataset from the dataset hub (needs `datasets` and a hub)
"""

from __future__ import annotations

import argparse
import sys

from recipes.data import catalog
from recipes.stages import STAGES

HELP = STAGES["data"].help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="what the data root holds, where each file came from, its checksum")
    prep = sub.add_parser("prepare", help="write a dataset into the data root in the shipped schema")
    prep.add_argument("name", choices=[*catalog.DATASETS, "all"])
    prep.add_argument("--from", dest="source", help="a datasets folder, .parquet or .jsonl in the upstream "
                      "schema (default: the dataset hub)")
    for p in sub.choices.values():
        p.add_argument("--data-root", help=f"default: ${catalog.DATA_ROOT_ENV} or {catalog.REPOSITORY_DATA_ROOT}")


def cli(args: argparse.Namespace) -> int:
    if args.action == "list":
        from rich.console import Console
        from rich.table import Table

        table = Table("dataset", "state", "sha256", "source", "license", title=str(catalog.data_root(args.data_root)))
        for row in catalog.status(args.data_root):
            table.add_row(row["name"], row["state"], (row["sha256"] or "")[:16], row["source"], row["license"])
        Console(width=160).print(table)
        return 0
    names = list(catalog.DATASETS) if args.name == "all" else [args.name]
    if args.source and len(names) > 1:
        print("nrr data prepare: --from names one dataset's source; prepare them one at a time", file=sys.stderr)
        return 2
    for name in names:
        try:
            out = catalog.prepare(name, args.source, args.data_root)
        except (ValueError, FileNotFoundError) as err:
            print(f"nrr data prepare {name}: {err}", file=sys.stderr)
            return 2
        print(f"{name}: wrote {out} (sha256 {catalog.sha256(out)})")
    return 0
