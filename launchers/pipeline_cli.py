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
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the summary table and report of the run already in run_dir")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help="write the summary (machine, commit, stage times, table, paired gain) between the "
                             "'nrr pipeline --readme' markers of FILE (e.g. README.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="pipeline overrides; executor.key=value for the executor profile")
    # Options may follow overrides (`nrr pipeline a=1 --dryrun`): parse positionals intermixed.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def print_summary(cfg, profile, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from launchers.pipeline import gain_cell, summary_values

    if cfg.summary is None or not cfg.summary.rows:
        return
    values = summary_values(cfg, profile)  # once, for this table and the report files

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}" if value <= 1 else f"{value:g}"

    levels = {label: row["levels"] for label, row in values["rows"].items()}
    names = sorted({lvl for per in levels.values() for lvl in per}, key=lambda x: (len(x), x))
    console = Console(file=file or sys.stdout, width=140)
    table = Table("model", cfg.summary.key, *(f"L{n}" for n in names), "from", title=cfg.summary.title)
    for label, row in values["rows"].items():
        table.add_row(label, cell(row["all"]), *(cell(levels[label].get(n)) for n in names), row["file"])
    gains = list(values["gains"].values())
    for gain in gains:
        table.add_row(f"{gain['b']} − {gain['a']} (points)", gain_cell(gain["all"]),
                      *(gain_cell(gain["by_level"].get(n)) for n in names),
                      f"paired on the same {gain['all']['problems']} problems; * beyond 2 standard errors")
    console.print(table)
    for gain in gains:
        if "practised" in gain:
            levels_text = ", ".join(f"L{v}" for v in gain["practised_levels"])
            console.print(f"{gain['b']} − {gain['a']} on the practised levels ({levels_text}): "
                          f"{gain_cell(gain['practised'])} points", markup=False)
    if cfg.summary.report:
        from launchers.pipeline import substitute, write_pipeline_report
        from launchers.profiles import run_path

        run_dir = run_path(profile, cfg.run_dir)
        dirs = {s.name: f"{run_dir}/{s.name}" for s in cfg.steps}
        report = substitute(cfg.summary.report, dirs, None, run_dir, "summary.report")
        write_pipeline_report(cfg, profile, report, values)
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
                 dryrun: bool = False, detach: bool = False, only: list[str] | None = None,
                 report_only: bool = False, readme: str | None = None) -> int:
    from launchers import experiment
    from launchers.pipeline import PipelineConfig, plan, splice_readme
    from launchers.preflight import check_tasks
    from launchers.profiles import load_profile, run_path
    from recipes.config import load_config, save_config

    cfg = load_config(PipelineConfig, config, overrides)
    profile = load_profile(executor or cfg.executor, list(cfg.executor_overrides) + list(executor_overrides))
    if report_only:
        print_summary(cfg, profile)
        if readme:
            splice_readme(readme, cfg, profile)
        return 0
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
    info = run_info(profile) if not dryrun and not detach else None  # the commit as launched
    results: list = []
    t0 = time.time()
    rc = experiment.execute(title, tasks, profile, dryrun, detach, checked, results_out=results)
    if info is not None:
        write_run_info(cfg, profile, info, results, time.time() - t0)
        print_summary(cfg, profile)
        if readme and rc == 0:
            splice_readme(readme, cfg, profile)
    return rc


def run_info(profile) -> dict:
    """The commit and, for local runs, the machine the stages run on (elsewhere only the cluster knows)."""
    from pathlib import Path

    from recipes.bench.machine import commit, describe_machine

    info = {"commit": commit(Path(__file__).resolve().parents[1]), "started": time.strftime("%Y-%m-%d %H:%M %Z")}
    if profile.kind == "local":
        info["machine"] = describe_machine()
    return info


def write_run_info(cfg, profile, info: dict, results: list, wall_s: float) -> None:
    import json
    from pathlib import Path

    from launchers.pipeline import RUN_INFO
    from launchers.profiles import run_path

    run_dir = Path(run_path(profile, cfg.run_dir))
    if not run_dir.is_dir():
        return
    info = {**info, "wall_s": round(wall_s, 1),
            "stages": {r.name: {"state": r.state, "seconds": None if r.seconds is None else round(r.seconds, 1)}
                       for r in results}}
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def cli(args: argparse.Namespace) -> int:
    from launchers.experiment import split_overrides

    overrides, executor_overrides = split_overrides(args.overrides)
    return run_pipeline(args.config, overrides, args.executor, executor_overrides, dryrun=args.dryrun,
                        detach=args.detach, only=args.only.split(",") if args.only else None,
                        report_only=args.report_only, readme=args.readme)
