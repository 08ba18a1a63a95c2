"""`nrr curate`: turn a set of problems into a training-ready long chain-of-thought corpus.

Runs the NeMo Curator pipeline of `curator_pipelines.pipeline` (read -> generate with a teacher ->
parse -> filters -> dedup -> decontaminate -> select -> write + report) as configured by a YAML
under `nemo_configs/curate/`.
"""

from __future__ import annotations

import argparse
import sys

from recipes.config import add_config_arguments, load_config
from recipes.stages import STAGES

HELP = STAGES["curate"].help
DEFAULT_CONFIG = STAGES["curate"].default_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli(args: argparse.Namespace) -> int:
    from curator_pipelines.config import CurateConfig
    from curator_pipelines.generate import GenerationError
    from curator_pipelines.pipeline import root_cause, run_curation
    from curator_pipelines.read import BadRecordError

    cfg = load_config(CurateConfig, args.config, args.overrides)
    try:
        report = run_curation(cfg, show_progress=not args.no_progress)
    except Exception as err:  # noqa: BLE001 - Ray wraps the stage's error; show the real one
        cause = root_cause(err)
        if isinstance(cause, (BadRecordError, GenerationError)):
            print(f"nrr curate: {cause}", file=sys.stderr)
            return 1
        raise
    for s in report["stages"]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items())
        if s.get("errors"):  # failed requests by class, within generation.max_failed_fraction
            reasons += " (" + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) + ")"
        print(f"{s['stage']:>18}: {s['in']:>6} -> {s['out']:>6}  {reasons}")
    print(f"corpus: {report['corpus']} records from {report['problems']} problems "
          f"({report['pipeline_seconds']:.1f} s); report in {cfg.output_dir}/report.md")
    return 0
