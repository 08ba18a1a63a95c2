"""`nrr launch`: run a stage or the whole pipeline through NeMo-Run on local, Slurm or Kubernetes.

    nrr launch sft --executor slurm --config nemo_configs/sft/qwen2.5-7b_h100.yaml \\
        executor.account=ACC executor.nodes=2 training.max_steps=100 --dryrun
    nrr launch pipeline --executor local --config nemo_configs/pipeline/embedded.yaml
    nrr launch --status <experiment id>        nrr launch --logs <experiment id> [--task sft]

Overrides starting with `executor.` change the executor profile; all others go to the stage
(or, for `pipeline`, to the pipeline config). Every stage's config is loaded and checked before anything is
written or submitted (launchers/preflight.py): an unknown key, or a layout (tp*pp*cp*dp, parallel.nodes) that is
not what the profile starts (nodes x GPUs), stops the launch with the key and where it was set.
"""

from __future__ import annotations

import argparse
import sys
import time

from recipes.stages import STAGES

HELP = STAGES["launch"].help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="a stage (curate, sft, kd, grpo, eval, convert, task) or 'pipeline'")
    parser.add_argument("--executor", default=None, help="profile in nemo_configs/executors/ or a YAML path "
                        "(default: local; for a pipeline, the one its config names)")
    parser.add_argument("--config", default=None, help="the stage's YAML (or the pipeline's, for 'pipeline')")
    parser.add_argument("--launcher", choices=["torchrun", "ray", "python"], help="replace the stage's launcher")
    parser.add_argument("--name", default=None, help="experiment title (default: the target)")
    parser.add_argument("--only", default=None, help="pipeline: comma-separated steps to run")
    parser.add_argument("--dryrun", action="store_true", help="print the sbatch scripts / manifests / commands only")
    parser.add_argument("--detach", action="store_true", help="submit and return (Slurm, Kubernetes)")
    parser.add_argument("--status", metavar="EXP_ID", help="show the state of an earlier experiment")
    parser.add_argument("--logs", metavar="EXP_ID", help="print the logs of an earlier experiment")
    parser.add_argument("--task", default=None, help="with --logs: only this task")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="stage/pipeline overrides; executor.key=value for the executor profile")
    # Options may follow overrides (`nrr launch sft a=1 --dryrun`): parse positionals intermixed.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def stage_tasks(args: argparse.Namespace, profile, stage_overrides: list[str]):
    from launchers.executors import StageTask
    from launchers.profiles import code_path, run_path
    from launchers.stages import stage_args, stage_spec

    spec = stage_spec(args.target, args.launcher)
    config = args.config or spec.default_config
    name = args.name or args.target
    stage_dir = run_path(profile, f"runs/launch/{name}")
    # the stage writes its outputs next to its status marker unless the user named another place
    if spec.output_key and not any(o.startswith(f"{spec.output_key}=") for o in stage_overrides):
        stage_overrides = [*stage_overrides, f"{spec.output_key}={stage_dir}"]
    return [StageTask(
        name=args.target,
        spec=spec,
        nrr_args=stage_args(args.target, code_path(profile, config) if config else None, stage_overrides),
        stage_dir=stage_dir,
    )]


def cli(args: argparse.Namespace) -> int:
    from launchers import experiment
    from launchers.profiles import load_profile

    stage_overrides, executor_overrides = experiment.split_overrides(args.overrides)
    if args.status or args.logs:
        profile = load_profile(args.executor or "local", executor_overrides)
        experiment.use_nemorun_home(profile)
        if args.status:
            for name, info in experiment.experiment_status(args.status).items():
                print(f"{name}: {info.get('status')}  {info.get('local_dir', '')}")
        else:
            experiment.experiment_logs(args.logs, args.task)
        return 0
    if not args.target:
        print("nrr launch: give a stage or 'pipeline' (or --status/--logs EXP_ID)", file=sys.stderr)
        return 2
    if args.target == "pipeline":
        from launchers import pipeline_cli

        return pipeline_cli.run_pipeline(args.config or pipeline_cli.DEFAULT_CONFIG, stage_overrides, args.executor,
                                     executor_overrides, dryrun=args.dryrun, detach=args.detach,
                                     only=args.only.split(",") if args.only else None)
    from launchers.preflight import check_tasks

    profile = load_profile(args.executor or "local", executor_overrides)
    tasks = stage_tasks(args, profile, stage_overrides)
    checked = check_tasks(tasks, profile)  # before NeMo-Run's store or any script is written
    experiment.use_nemorun_home(profile)
    title = args.name or f"{args.target}-{time.strftime('%Y%m%d-%H%M%S')}"
    return experiment.execute(title, tasks, profile, args.dryrun, args.detach, checked)
