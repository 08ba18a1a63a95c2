"""One NeMo-Run Experiment per launch: stages as tasks, dependencies between them.

`dryrun` renders what would be submitted (sbatch scripts, Kubernetes manifests, local commands)
without submitting; `run` submits, waits (unless detached) and reports every stage's state, with
the exit code and the end of the log of a stage that failed.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launchers.entry import MARKER_DIR, STATES, clear_state
from launchers.executors import StageTask, build_executor, build_script
from launchers.profiles import K8sProfile, LocalProfile, Profile, nemorun_home

LOG_TAIL_LINES = 40


def use_nemorun_home(profile: Profile) -> str:
    """Keep NeMo-Run's experiment store inside the run tree (never ~/.nemo_run).

    Must run before `nemo_run` is first imported: some of its modules read the home at import.
    """
    home = nemorun_home(profile)
    os.environ["NEMORUN_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    if "nemo_run" in sys.modules:
        from nemo_run.config import set_nemorun_home

        set_nemorun_home(home)
    return home


@dataclass
class Rendered:
    """What one stage would submit: an sbatch script, a manifest (YAML) or a command line."""

    name: str
    kind: str  # "sbatch" | "manifest" | "command"
    text: str
    after: list[str] = field(default_factory=list)  # upstream tasks (afterok on Slurm)


def _dependencies(tasks: list[StageTask]) -> dict[str, list[str]]:
    """Task name -> names of the tasks whose output dirs it requires."""
    by_dir = {t.stage_dir: t.name for t in tasks if t.stage_dir}
    return {t.name: [by_dir[d] for d in t.requires if d in by_dir] for t in tasks}


def build_experiment(title: str, tasks: list[StageTask], profile: Profile):
    """A NeMo-Run Experiment with one task per stage and the dependencies between them."""
    import nemo_run as run

    deps = _dependencies(tasks)
    exp = run.Experiment(title, log_level="WARN")
    exp.__enter__()
    handles: dict[str, str] = {}
    for task in tasks:
        executor = build_executor(task, profile)
        handles[task.name] = exp.add(
            build_script(task, profile), executor=executor, name=task.name, tail_logs=False,
            dependencies=[handles[d] for d in deps[task.name]] or None,
        )
    return exp


def dryrun(title: str, tasks: list[StageTask], profile: Profile, checked: dict | None = None) -> list[Rendered]:
    """Render every stage without submitting anything, each checked as its cluster would check it (a manifest
    against its CRD schema, an sbatch script by bash's parser) and headed by its per-GPU memory plan."""
    from launchers.preflight import plan_header

    checked = checked or {}
    headers = {t.name: plan_header(getattr(checked.get(t.name), "config", None)) for t in tasks}
    out = [_with_header(r, headers.get(r.name, [])) for r in _render(title, tasks, profile)]
    errors = [f"{r.name}: {e}" for r in out for e in validate_rendered(r)]
    if errors:
        from recipes.config import ConfigError

        raise ConfigError("the rendered jobs would be rejected:\n  " + "\n  ".join(errors))
    return out


def _with_header(item: Rendered, lines: list[str]) -> Rendered:
    """Comment lines at the top: after the shebang of a script, so `#SBATCH` directives stay where sbatch reads
    them (before the first command)."""
    if not lines:
        return item
    comment = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    text = item.text
    if text.startswith("#!"):
        first, _, rest = text.partition("\n")
        text = f"{first}\n{comment}{rest}"
    else:
        text = comment + text
    return Rendered(item.name, item.kind, text, item.after)


def validate_rendered(item: Rendered) -> list[str]:
    """What a cluster would reject: manifests by their CRD / core schema (launchers.k8s), sbatch scripts by `bash -n`."""
    import subprocess

    if item.kind == "manifest":
        import yaml

        from launchers import k8s

        return [e for doc in yaml.safe_load_all(item.text) if doc for e in k8s.validate(doc)]
    if item.kind == "sbatch":
        proc = subprocess.run(["bash", "-n"], input=item.text, capture_output=True, text=True, timeout=30)
        return [proc.stderr.strip()] if proc.returncode else []
    return []


def _render(title: str, tasks: list[StageTask], profile: Profile) -> list[Rendered]:
    if isinstance(profile, K8sProfile):
        from launchers import k8s

        deps = _dependencies(tasks)
        return [Rendered(t.name, "manifest", k8s.to_yaml(k8s.manifests_for([t], profile)), deps[t.name])
                for t in tasks]

    from nemo_run.run.torchx_backend.launcher import launch
    from nemo_run.run.torchx_backend.schedulers.api import get_executor_str

    deps = _dependencies(tasks)
    exp = build_experiment(title, tasks, profile)
    try:
        exp._prepare(exist_ok=True)
        out = []
        for job in exp.jobs:
            _, info = launch(executable=job._executable, executor_name=get_executor_str(job.executor),
                             executor=job.executor, dryrun=True, runner=exp._runner)
            request = info.request
            if hasattr(request, "materialize"):
                out.append(Rendered(job.id, "sbatch", request.materialize(), deps[job.id]))
            else:
                params = getattr(request, "role_params", {})
                lines = [shlex.join(p.args) for replicas in params.values() for p in replicas]
                out.append(Rendered(job.id, "command", "\n".join(lines) or str(info), deps[job.id]))
        return out
    finally:
        _close(exp, delete=True)


def _close(exp, delete: bool) -> None:
    import shutil

    exp._launched = False
    exp.__exit__(None, None, None)
    if delete:
        shutil.rmtree(exp._exp_dir, ignore_errors=True)


@dataclass
class StageResult:
    name: str
    state: str
    exit_code: int | None
    log: str | None  # path of the stage's log, when found
    log_tail: str
    resumes: str = ""  # a PREEMPTED stage: how its rerun continues
    seconds: float | None = None  # wall time, as the launching process watched it


def run(title: str, tasks: list[StageTask], profile: Profile, detach: bool = False) -> tuple[str, list[StageResult]]:
    """Submit the experiment; unless detached, wait and return each stage's result."""
    import contextlib

    from launchers.watch import StageWatcher, progress_path
    from recipes.metrics import PROGRESS_FILE_ENV

    for task in tasks:  # a stale SUCCEEDED from an earlier run must not unblock a downstream stage
        if task.stage_dir:
            clear_state(task.stage_dir)
            progress_path(task.stage_dir).unlink(missing_ok=True)
            task.env = {**task.env, PROGRESS_FILE_ENV: str(progress_path(task.stage_dir))}
    exp = build_experiment(title, tasks, profile)
    exp_id = exp._id
    watched = {t.name: t.stage_dir for t in tasks if t.stage_dir}
    watcher = StageWatcher(watched, _dependencies(tasks)) if watched and not detach else contextlib.nullcontext()
    try:
        with watcher:
            exp.run(detach=detach, tail_logs=False)
            if not detach and not getattr(exp, "_waited", False):
                exp._wait_for_jobs(jobs=exp.jobs)
                exp._waited = True
    finally:
        exp._skip_status_at_exit = True
        exp.__exit__(None, None, None)
    if detach:
        return exp_id, []
    results = collect_results(exp, tasks)
    if isinstance(watcher, StageWatcher):
        for r in results:
            if r.name in watcher.times:
                r.seconds = watcher.times[r.name].seconds
    return exp_id, results


def collect_results(exp, tasks: list[StageTask]) -> list[StageResult]:
    by_name = {t.name: t for t in tasks}
    results = []
    for job in exp.jobs:
        state = getattr(job.state, "name", str(job.state))
        task = by_name.get(job.id)
        exit_code = None
        marker_state, info = None, {}
        if task and task.stage_dir:
            for name in STATES:
                path = Path(task.stage_dir) / MARKER_DIR / name
                if path.exists():
                    marker_state = name
                    info = json.loads(path.read_text(encoding="utf-8"))
                    exit_code = info.get("exit_code")
                    break
        if state == "SUCCEEDED" and marker_state == "FAILED":
            state = "FAILED"  # the job itself ended cleanly, the stage inside it did not
        if marker_state == "PREEMPTED":  # stopped after saving its checkpoint: not a failure, it resumes
            state = "PREEMPTED"
        log = find_log(job.executor.job_dir)
        tail = ""
        if log and state != "SUCCEEDED":
            tail = log_excerpt(Path(log).read_text(encoding="utf-8", errors="replace").splitlines())
        results.append(StageResult(job.id, state, exit_code, log, tail, info.get("resumes", "")))
    return results


def log_excerpt(lines: list[str], tail: int = LOG_TAIL_LINES, errors: int = 20) -> str:
    """The error lines of a log (torchrun's failure summary can push them out of the tail) + its tail."""
    head = len(lines) - tail
    found = [line for line in lines[:max(head, 0)] if "error" in line.lower() or "Traceback" in line][-errors:]
    parts = (["[error lines]", *found, "[last lines]"] if found else []) + lines[-tail:]
    return "\n".join(parts)


def find_log(job_dir: str) -> str | None:
    """The newest job log under a NeMo-Run job dir (Slurm `log-*.out`, local `combined.log`)."""
    root = Path(job_dir)
    if not root.exists():
        return None
    for pattern in ("**/log-*.out", "**/combined.log", "**/stdout.log", "**/*.out"):
        candidates = [p for p in root.glob(pattern) if p.is_file()]
        if candidates:  # the job's own log before the batch script's
            return str(max(candidates, key=lambda p: p.stat().st_mtime))
    return None


def print_results(exp_id: str, results: list[StageResult], profile: Profile, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from launchers.watch import clock

    console = Console(file=file or sys.stdout, width=120)
    table = Table("stage", "state", "exit code", "time", "log", title=f"experiment {exp_id}")
    for r in results:
        table.add_row(r.name, r.state, "" if r.exit_code is None else str(r.exit_code),
                      "" if r.seconds is None else clock(r.seconds), r.log or "")
    console.print(table)
    for r in results:
        if r.resumes:
            console.print(f"--- {r.name}: preempted after saving its checkpoint; {r.resumes} ---", markup=False)
        elif r.state != "SUCCEEDED" and r.log_tail:
            console.print(f"--- {r.name}: last lines of {r.log} ---", markup=False)
            console.print(r.log_tail, markup=False, highlight=False)
    home = nemorun_home(profile)
    console.print(f"status/logs: NEMORUN_HOME={home} nemo experiment status {exp_id}  |  "
                  f"nrr launch --status {exp_id} --executor {_profile_arg(profile)}", markup=False)


def _profile_arg(profile: Profile) -> str:
    return getattr(profile, "kind", "local")


def experiment_status(exp_id: str) -> dict[str, Any]:
    import nemo_run as run

    exp = run.Experiment.from_id(exp_id)
    return exp.status(return_dict=True) or {}


def experiment_logs(exp_id: str, task: str | None) -> None:
    import nemo_run as run

    exp = run.Experiment.from_id(exp_id)
    names = [task] if task else [job.id for job in exp.jobs]
    for name in names:
        exp.logs(job_id=name)


def is_local(profile: Profile) -> bool:
    return isinstance(profile, LocalProfile)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(stage or pipeline overrides, executor overrides without their `executor.` prefix)."""
    stage, executor = [], []
    for text in overrides:
        if text.startswith("executor."):
            executor.append(text[len("executor."):])
        else:
            stage.append(text)
    return stage, executor


def print_rendered(rendered, file=None) -> None:
    out = file or sys.stdout
    for item in rendered:
        after = f" after: {', '.join(item.after)}" if item.after else ""
        if item.kind == "manifest":  # one YAML stream: `kubectl apply -f` takes the whole output
            print("---", file=out)
        print(f"# ---- {item.name} ({item.kind}){after} ----", file=out)
        print(item.text.rstrip("\n"), file=out)


def execute(title: str, tasks, profile, dry: bool, detach: bool, checked: dict | None = None,
            results_out: list | None = None) -> int:
    """Check, then dry-run or run the tasks; return 0 when every stage succeeded, else the first failure's code.
    `checked`: the tasks' `launchers.preflight.check_tasks`, when the caller ran it before writing anything;
    `results_out` receives each stage's StageResult."""
    if checked is None:
        from launchers.preflight import check_tasks

        checked = check_tasks(tasks, profile)
    for name, item in checked.items():
        for note in item.notes:
            print(f"nrr launch: {name}: not checked here: {note}", file=sys.stderr)
    if dry:
        print_rendered(dryrun(title, tasks, profile, checked))
        return 0
    exp_id, results = run(title, tasks, profile, detach=detach)
    if detach:
        print(f"submitted experiment {exp_id}; follow it with: nrr launch --status {exp_id}")
        return 0
    print_results(exp_id, results, profile)
    if results_out is not None:
        results_out.extend(results)
    for r in results:
        if r.state != "SUCCEEDED":
            return r.exit_code or 1
    return 0
