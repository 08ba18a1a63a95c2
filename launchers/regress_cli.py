"""`nrr regress`: run the regression configs and compare their metrics with the goldens.

    nrr regress                                   # the CI configs, locally
    nrr regress --executor slurm --all executor.account=myacct
    nrr regress --compare-only --runs runs/regress   # re-check existing runs, no launch

Writes `<runs>/regression.md` (a pass/fail table) and returns 1 if any check failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recipes.stages import STAGES

HELP = STAGES["regress"].help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--goldens", default=None, help="goldens YAML (default: tests/regression/goldens.yaml)")
    parser.add_argument("--executor", default="local", help="executor profile for the runs")
    parser.add_argument("--only", default=None, help="comma-separated config names")
    parser.add_argument("--all", action="store_true", help="also the cluster configs (ci: false)")
    parser.add_argument("--runs", default="runs/regress", help="where each config's run writes its outputs")
    parser.add_argument("--compare-only", action="store_true", help="compare existing runs, launch nothing")
    parser.add_argument("--record", action="store_true", help="write observed values into missing goldens")
    parser.add_argument("overrides", nargs="*", metavar="executor.key=value")
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def cli(args: argparse.Namespace) -> int:
    from launchers import regression
    from recipes.metrics import read_metrics

    goldens_path = Path(args.goldens) if args.goldens else regression.GOLDENS
    goldens = regression.load_goldens(goldens_path)
    names = args.only.split(",") if args.only else [n for n, c in goldens.configs.items() if c.ci or args.all]
    runs = Path(args.runs)
    if not args.compare_only:
        rc = _launch(names, goldens, runs, args)
        if rc not in (0, None):
            print(f"nrr regress: a run failed (exit {rc}); comparing what was written", file=sys.stderr)
    outcomes = []
    for name in names:
        metrics = runs / name / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.exists() else []
        outcomes += regression.evaluate(name, goldens.configs[name], rows, runs / name)
    table = regression.table_markdown(outcomes)
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "regression.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"table: {runs / 'regression.md'}")
    if args.record:
        regression.record(goldens_path, outcomes)
    return 0 if all(o.passed for o in outcomes) else 1


def _launch(names, goldens, runs: Path, args) -> int:
    from launchers.pipeline import PipelineConfig, StepConfig
    from launchers.experiment import split_overrides
    from launchers.pipeline_cli import run_pipeline

    _, executor_overrides = split_overrides(args.overrides)
    from launchers.stages import stage_spec

    def output_override(stage: str) -> list[str]:
        key = stage_spec(stage).output_key
        return [f"{key}=${{dir}}"] if key else []

    # whole pipelines (e.g. the demo) run one after another, each into its own run_dir; the stage configs as one
    rc = 0
    for name in [n for n in names if goldens.configs[n].stage == "pipeline"]:
        entry = goldens.configs[name]
        rc = run_pipeline(entry.config, [*entry.overrides, f"run_dir={(runs / name).resolve()}"], args.executor,
                          executor_overrides) or rc
    steps = [StepConfig(name=n, stage=goldens.configs[n].stage, config=goldens.configs[n].config,
                        overrides=[*goldens.configs[n].overrides, *output_override(goldens.configs[n].stage)])
             for n in names if goldens.configs[n].stage != "pipeline"]
    if not steps:
        return rc
    import json
    import tempfile

    import dataclasses

    cfg = PipelineConfig(name="regress", run_dir=str(runs.resolve()), executor=args.executor, steps=steps)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(dataclasses.asdict(cfg), f)
    return run_pipeline(f.name, [], args.executor, executor_overrides) or rc
