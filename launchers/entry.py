"""The command every launched stage runs: `python -m launchers.entry [options] -- <stage> ...`.

It runs `nrr <stage> --config X key=value ...` and adds what a pipeline needs around it:
- `--requires DIR`: refuse to start unless the upstream stage that writes DIR succeeded (executors
  without native job dependencies, local and Kubernetes, would otherwise run a stage on stale or
  missing inputs after its upstream failed);
- `--stage-dir DIR`: record SUCCEEDED / FAILED (with the exit code) under DIR/.nrr_stage/ (rank 0), or
  PREEMPTED (with the step saved) for a stage stopped by a signal once its checkpoint was saved: exit 75, or
  torchrun's 1 with a `preempted.json` it wrote in DIR; rerunning it resumes from that step;
- `--serve-cmd CMD`: start a server (a vLLM OpenAI endpoint) next to the stage, wait until it
  answers, put its URL where the stage arguments say `${endpoint}`, and stop it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from recipes.resume import PREEMPTED as PREEMPTED_FILE, REQUEUE_EXIT_CODE

MARKER_DIR = ".nrr_stage"
ENDPOINT_PLACEHOLDER = "${endpoint}"
STATES = ("SUCCEEDED", "FAILED", "PREEMPTED")


def marker(stage_dir: str | Path, state: str) -> Path:
    return Path(stage_dir) / MARKER_DIR / state


def stage_state(stage_dir: str | Path) -> str | None:
    """SUCCEEDED, FAILED, PREEMPTED (resumable) or None (never ran / still running) for a stage output dir."""
    for state in STATES:
        if marker(stage_dir, state).exists():
            return state
    return None


def clear_state(stage_dir: str | Path) -> None:
    for state in STATES:
        marker(stage_dir, state).unlink(missing_ok=True)


def _write_state(stage_dir: str, state: str, info: dict) -> None:
    path = marker(stage_dir, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def preempted_step(stage_dir: str | Path | None) -> int | None:
    """The step a stage saved when a signal stopped it (its `preempted.json`), None when there is none."""
    path = _preempted_file(stage_dir)
    if path is None or not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["step"])
    except (ValueError, KeyError, TypeError):  # a torn write: the stage still exited to be resumed
        return -1


def _preempted_file(stage_dir: str | Path | None) -> Path | None:
    return Path(stage_dir) / PREEMPTED_FILE if stage_dir else None


def preempted_stamp(stage_dir: str | Path | None) -> int | None:
    """The `preempted.json` as it is now (its mtime in ns, None: absent), to tell a new one from an old one
    without comparing the clock with a shared filesystem's."""
    path = _preempted_file(stage_dir)
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None


def outcome(stage_dir: str | None, rc: int, stamp_before: int | None) -> tuple[str, dict]:
    """The state a finished stage is recorded in, and what to add to its record. torchrun reports a rank's 75
    as 1, so a `preempted.json` the stage wrote (not the one it found: `stamp_before`) counts as well."""
    if rc == 0:
        return "SUCCEEDED", {}
    stamp = preempted_stamp(stage_dir)
    step = preempted_step(stage_dir) if stamp is not None and stamp != stamp_before else None
    if rc == REQUEUE_EXIT_CODE or step is not None:
        where = f"from step {step}" if step is not None and step >= 0 else "from its last checkpoint"
        return "PREEMPTED", {"step": step, "resumes": f"rerun the same command: it resumes {where}"}
    return "FAILED", {}


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _is_local_rank0() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server did not answer {url} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process group started with start_new_session (vLLM leaves worker children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("launchers.entry: expected `-- <stage> [args]` after the options")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m launchers.entry")
    parser.add_argument("--stage-dir", help="the stage's output dir; its state is recorded there")
    parser.add_argument("--requires", action="append", default=[], help="upstream stage output dir")
    parser.add_argument("--serve-cmd", help="server command; {port} is replaced by --serve-port")
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--serve-ready-path", default="/health")
    parser.add_argument("--serve-timeout", type=float, default=900.0)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    opts, stage_argv = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not stage_argv:
        print("launchers.entry: no stage given after --", file=sys.stderr)
        return 2
    for upstream in opts.requires:
        state = stage_state(upstream)
        if state != "SUCCEEDED":
            why = {"PREEMPTED": "PREEMPTED (resumable: rerun it first)"}.get(state, state)
            print(
                f"nrr {stage_argv[0]}: not starting, upstream stage output {upstream} is "
                f"{why or 'missing (the stage did not finish)'}",
                file=sys.stderr,
            )
            if opts.stage_dir and _is_rank0():
                _write_state(opts.stage_dir, "FAILED", {"stage": stage_argv[0], "exit_code": 3,
                                                        "reason": f"upstream {upstream} {state}"})
            return 3
    if opts.stage_dir and _is_rank0():
        clear_state(opts.stage_dir)
        resumed = preempted_step(opts.stage_dir)
        if resumed is not None:
            print(f"nrr {stage_argv[0]}: resuming after a preemption (step {resumed} saved in {opts.stage_dir})",
                  file=sys.stderr, flush=True)

    server = None
    if opts.serve_cmd:
        url = f"http://127.0.0.1:{opts.serve_port}"
        if _is_local_rank0():
            cmd = shlex.split(opts.serve_cmd.replace("{port}", str(opts.serve_port)))
            print(f"starting server: {' '.join(cmd)}", file=sys.stderr, flush=True)
            server = subprocess.Popen(cmd, start_new_session=True)
        try:
            _wait_ready(url + opts.serve_ready_path, server, opts.serve_timeout)
        except RuntimeError as err:
            print(f"nrr {stage_argv[0]}: {err}", file=sys.stderr)
            if server is not None:
                _stop(server)
            return 4
        stage_argv = [a.replace(ENDPOINT_PLACEHOLDER, url + "/v1") for a in stage_argv]

    started, stamp = time.time(), preempted_stamp(opts.stage_dir)
    child = subprocess.Popen([sys.executable, "-m", "recipes.cli", *stage_argv])
    # Forward a cancel (scancel, kubectl delete, Ctrl-C) to the stage so it can stop cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    rc = child.wait()
    if server is not None:
        _stop(server)
    state, extra = outcome(opts.stage_dir, rc, stamp)
    if opts.stage_dir and _is_rank0():
        info = {"stage": stage_argv[0], "exit_code": rc, "seconds": round(time.time() - started, 1),
                "argv": stage_argv, **extra}
        _write_state(opts.stage_dir, state, info)
    if state == "PREEMPTED":  # one exit code for the executors whether torchrun was between (it reports 1)
        print(f"nrr {stage_argv[0]} preempted (exit code {rc}): {extra['resumes']}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    if rc != 0:
        print(f"nrr {stage_argv[0]} exited with code {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
