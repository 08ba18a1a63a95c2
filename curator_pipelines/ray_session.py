"""A curation run's Ray session: its own temp dir, every process it starts marked in its environment, and whatever
outlives the run (Ray's raylet and workers, also those of an earlier run whose driver was killed) found by that
marker and stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

from curator_pipelines.config import ExecutorConfig

RUN_MARKER = "NRR_CURATE_RUN"
DRIVER_MARKER = "NRR_CURATE_DRIVER"  # the pid of the run's driver: its processes are orphans once it is gone


def _run_processes() -> dict[int, dict[str, str]]:
    """pid -> the curation markers in its environment, for every process a curation run started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        marks = {}
        for item in env:
            key, _, value = item.partition(b"=")
            if key in (RUN_MARKER.encode(), DRIVER_MARKER.encode(), b"RAY_TMPDIR"):
                marks[key.decode()] = value.decode(errors="replace")
        if RUN_MARKER in marks:
            found[int(entry.name)] = marks
    return found


def _marked_processes(marker: str) -> list[int]:
    return [pid for pid, m in _run_processes().items() if m[RUN_MARKER] == marker]


RAY_DIR_PREFIX = "nrr-ray-"


def stop_orphans(stale_after_s: float = 600.0) -> int:
    """Stop what earlier runs left behind when their driver was killed (Ray's raylet, workers), and
    remove their Ray temp dirs once no process uses them (after a while: a run may be starting)."""
    stopped = 0
    processes = _run_processes()
    for pid, marks in processes.items():
        driver = int(marks.get(DRIVER_MARKER, "0") or 0)
        if driver and not Path(f"/proc/{driver}").exists():
            stopped += stop_marked_processes(marks[RUN_MARKER])
    in_use = {m.get("RAY_TMPDIR") for m in _run_processes().values()}
    for d in Path("/tmp").glob(f"{RAY_DIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            if str(d) not in in_use and time.time() - d.stat().st_mtime > stale_after_s:
                shutil.rmtree(d, ignore_errors=True)
    return stopped


def stop_marked_processes(marker: str, grace_s: float = 3.0) -> int:
    """Stop the processes this run started that are still alive (Ray workers, raylet, ...)."""
    pids = _marked_processes(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _marked_processes(marker):
        time.sleep(0.2)
    for pid in _marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


@contextlib.contextmanager
def ray_session(cfg: ExecutorConfig):
    """Ray in its own temp dir, every process it starts marked; leftovers stopped afterwards."""
    stop_orphans()
    marker = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix=RAY_DIR_PREFIX, dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = {k: os.environ.get(k) for k in (RUN_MARKER, DRIVER_MARKER, "RAY_TMPDIR")}
    os.environ[RUN_MARKER] = marker
    os.environ[DRIVER_MARKER] = str(os.getpid())
    os.environ["RAY_TMPDIR"] = tmp
    try:
        if cfg.name == "ray_data":
            import ray

            # Ray Data needs no dashboard; the executor's own ray.init then reuses this one
            ray.init(include_dashboard=False, num_cpus=cfg.num_cpus, _temp_dir=tmp,
                     log_to_driver=False, configure_logging=False)
        yield
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        stop_marked_processes(marker)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
