"""Run untrusted code (model-written programs) in a separate, limited process.

Layers, each enough to stop a different failure:
- a new network namespace (`unshare -n`, no interfaces up) and an audit hook that refuses sockets,
- a new PID namespace (`unshare -p -f --kill-child`): when the sandbox's first process dies the
  kernel kills every process it left behind, so a fork bomb ends with it,
- an unprivileged user (nobody) when started as root, so files outside its own temp dir are not
  writable and RLIMIT_NPROC applies (root ignores it),
- `resource.setrlimit` on CPU time, address space, file size, open files and processes,
- a wall-clock timeout, then SIGKILL to the whole process group.
Without root or `unshare` the rlimits, the audit hook and the process-group kill still apply.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOBODY = 65534

# Runs inside the sandbox before the user's program: refuse every socket, then run main.py as __main__.
_BOOTSTRAP = """
import sys
def _no_network(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_no_network)
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclasses.dataclass
class SandboxLimits:
    timeout_s: float = 2.0  # wall clock
    memory_mb: int = 256  # address space
    file_size_mb: int = 4  # largest file it may write (stdout/stderr included)
    max_processes: int = 16
    max_open_files: int = 64


@dataclasses.dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolated: bool  # namespaces + unprivileged user were used

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that adds namespaces and drops to nobody, or () when not permitted here."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if os.geteuid() != 0 or not unshare or not setpriv:
        return ()
    prefix = (unshare, "-n", "-p", "-f", "--kill-child",
              setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def _interpreter(unprivileged: bool) -> str:
    """A Python the unprivileged user can run (a venv under /root is not reachable by nobody)."""
    if unprivileged:
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.access(candidate, os.X_OK):
                return candidate
    return sys.executable


def _limit_child(limits: SandboxLimits) -> None:
    """preexec_fn: runs in the child between fork and exec; the limits are inherited by everything below."""
    cpu = max(1, math.ceil(limits.timeout_s))
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as a Python program in a fresh temp dir; return its exit code and output."""
    limits = limits or SandboxLimits()
    prefix = isolation_prefix()
    work = Path(tempfile.mkdtemp(prefix="nrr-sandbox-"))
    box = work / "box"  # the program's cwd and the only place it may write
    box.mkdir()
    (box / "main.py").write_text(code, encoding="utf-8")
    if prefix:
        os.chown(box, NOBODY, NOBODY)
        os.chmod(work, 0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(box), "TMPDIR": str(box), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [*prefix, _interpreter(bool(prefix)), "-I", "-S", "-c", _BOOTSTRAP]
    start = time.monotonic()
    timed_out = False
    # output goes to files the parent owns: RLIMIT_FSIZE caps them, and a chatty program cannot
    # fill the parent's memory through a pipe
    with open(work / "stdout", "w+b") as out, open(work / "stderr", "w+b") as err:
        proc = subprocess.Popen(
            cmd, cwd=box, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
            preexec_fn=functools.partial(_limit_child, limits), start_new_session=True,
        )
        try:
            proc.communicate(stdin.encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:
            pass
        finally:
            _kill_group(proc.pid)  # also reaps stragglers that outlived the main process
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read(limits.file_size_mb * 1024 * 1024).decode("utf-8", "replace")
        stderr = err.read(limits.file_size_mb * 1024 * 1024).decode("utf-8", "replace")
    seconds = time.monotonic() - start
    shutil.rmtree(work, ignore_errors=True)
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, seconds, bool(prefix))
