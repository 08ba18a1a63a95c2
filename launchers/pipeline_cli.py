"""`nrr pipeline`: the whole chain (curate -> sft -> grpo -> eval -> export) as one NeMo-Run Experiment.

    nrr pipeline --config nemo_configs/pipeline/embedded.yaml            # local, then a summary table
    nrr pipeline --config nemo_configs/pipeline/cluster.yaml --executor slurm --dryrun

Positional overrides change the pipeline config (`run_dir=runs/try2`); `executor.key=value`
changes the executor profile.
"""

from __future__ import annotations

import argparse
import sys
import time

from recipes.stages import STAGES

HELP = STAGES["pipeline"].help
DEFAULT_CONFIG = STAGES["pipeline"].default_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--executor", default=None, help="executor profile (default: the config's 'executor')")
    parser.add_argument("--only", default=None, help="comma-separated steps to run (others must have run before)")
    parser.add_argument("--dryrun", action="store_true", help="print what would be submitted, submit nothing")
    parser.add_argument("--detach", action="store_true", help="submit and return (Slurm, Kubernetes)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="pipeline overrides; executor.key=value for the executor profile")
    # Options may follow overrides (`nrr pipeline a=1 --dryrun`): parse positionals intermixed.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def print_summary(cfg, profile, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from launchers.pipeline import level_values, summary_rows

    rows = summary_rows(cfg, profile)
    if not rows:
        return

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}" if value <= 1 else f"{value:g}"

    levels = {label: level_values(path, cfg.summary.key) for label, path, _ in rows}
    names = sorted({lvl for per in levels.values() for lvl in per}, key=lambda x: (len(x), x))
    console = Console(file=file or sys.stdout, width=140)
    table = Table("model", cfg.summary.key, *(f"L{n}" for n in names), "from", title=cfg.summary.title)
    for label, path, value in rows:
        table.add_row(label, cell(value), *(cell(levels[label].get(n)) for n in names), path)
    console.print(table)
    if cfg.summary.report:
        from launchers.pipeline import substitute, write_pipeline_report
        from launchers.profiles import run_path

        run_dir = run_path(profile, cfg.run_dir)
        dirs = {s.name: f"{run_dir}/{s.name}" for s in cfg.steps}
        report = substitute(cfg.summary.report, dirs, None, run_dir, "summary.report")
        write_pipeline_report(cfg, profile, report)
        console.print(f"report: {report}", markup=False)


def mark_origins(tasks, cfg, config: str) -> None:
    """Each task's step in the pipeline file (file:line), so that a step's error points at the step."""
    from recipes.config import read_yaml

    _, where = read_yaml(config) if config else ({}, {})
    index = {step.name: i for i, step in enumerate(cfg.steps)}
    for task in tasks:
        i = index[task.name]
        line = where.get(f"steps[{i}].overrides") or where.get(f"steps[{i}].name") or config
        task.origin = f"{line}, steps[{i}]"


def run_pipeline(config: str, overrides: list[str], executor: str | None, executor_overrides: list[str],
                 dryrun: bool = False, detach: bool = False, only: list[str] | None = None) -> int:
    from launchers import experiment
    from launchers.pipeline import PipelineConfig, plan
    from launchers.preflight import check_tasks
    from launchers.profiles import load_profile, run_path
    from recipes.config import load_config, save_config

    cfg = load_config(PipelineConfig, config, overrides)
    profile = load_profile(executor or cfg.executor, list(cfg.executor_overrides) + list(executor_overrides))
    tasks = plan(cfg, profile, only)
    mark_origins(tasks, cfg, config)
    checked = check_tasks(tasks, profile)  # every step, before NeMo-Run's store or any script is written
    experiment.use_nemorun_home(profile)
    if not dryrun:
        from pathlib import Path

        run_dir = Path(run_path(profile, cfg.run_dir))
        if profile.kind == "local" or run_dir.parent.exists():
            save_config(cfg, run_dir / "pipeline.yaml")
    title = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rc = experiment.execute(title, tasks, profile, dryrun, detach, checked)
    if not dryrun and not detach:
        print_summary(cfg, profile)
    return rc


def cli(args: argparse.Namespace) -> int:
    from launchers.experiment import split_overrides

    overrides, executor_overrides = split_overrides(args.overrides)
    return run_pipeline(args.config, overrides, args.executor, executor_overrides, dryrun=args.dryrun,
                        detach=args.detach, only=args.only.split(",") if args.only else None)
