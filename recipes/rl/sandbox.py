"""Run untrusted code (model-written programs) in a separate, limited process.

Isolation needs neither root nor a tool beyond util-linux (`unshare`, `mount`, `pivot_root`, `setpriv`):
- started as root, first drop to nobody: a process whose host uid is 0 keeps powers no namespace
  takes away (e.g. writing root-owned /proc/sys files), and root ignores RLIMIT_NPROC,
- new user, mount, pid and network namespaces (`unshare -Urmnpf --kill-child`); a shell inside them
  (_SETUP) builds a root of its own: a tmpfs holding read-only binds of /usr, /bin, /lib*, the
  interpreter's prefix and a few /dev nodes, a fresh /proc of the new pid namespace, tmpfs /tmp and
  /box (the cwd, holding a copy of main.py); it pivots into it and detaches the host's tree, so the
  host's files, /tmp, /home, /root and /proc/<pid>/environ are not there to be opened,
- the program runs without capabilities (`setpriv`), with a fixed environment (PATH, HOME, LANG...),
- the network namespace has no interface up: no socket reaches the host, from any child or ctypes,
- the kernel kills everything left in the pid namespace when its init dies,
- `resource.setrlimit` on CPU time, address space, file size, open files and processes (no cgroup:
  that needs a delegated cgroup tree), an audit hook that refuses Python sockets, a wall-clock
  timeout, then SIGKILL to the program, its namespace and its process group.
Where the namespaces cannot be had (no `unshare`, user namespaces disabled) `run_python` refuses,
unless the caller opts in (`allow_unisolated=True` or NRR_SANDBOX_UNISOLATED=1): then only the
rlimits, the audit hook, the timeout and the kill apply, and a warning says what is exposed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

NOBODY = 65534
OPT_IN_ENV = "NRR_SANDBOX_UNISOLATED"

# Runs inside the sandbox before the user's program: cap processes, refuse every socket, run main.py.
# RLIMIT_NPROC is set here: inside the user namespace it counts this sandbox's processes only (its
# init and `unshare` included), where set before `unshare` it would count every process of the host
# user, other sandboxes included. Not isolated, it counts the user's processes, as it always did.
_BOOTSTRAP = """
import resource, sys
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
def _no_network(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_no_network)
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""

# Runs as root of the new namespaces: $1 the host work dir (main.py, and root/ to build the new root
# on), $2 tmpfs size for /box and /tmp, then dirs to bind read-only at the same path, `--`, the program.
_SETUP = r"""
set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin  # for pivot_root; the program gets /usr/bin:/bin back
W=$1; R=$1/root; SIZE=$2; shift 2
mount -t tmpfs -o mode=755,size=1m nrr-root "$R"
for d in /usr /bin /sbin /lib /lib32 /lib64 /libx32; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"
  elif [ -d "$d" ]; then mkdir "$R$d"; mount --bind -o ro "$d" "$R$d"; fi
done
mkdir -p "$R/etc" "$R/dev" "$R/proc" "$R/tmp" "$R/box"
C=/etc/ld.so.cache  # where the loader finds libraries fastest; nothing else of /etc
if [ -f $C ]; then touch "$R$C"; mount --bind -o ro $C "$R$C"; fi
for f in null zero full random urandom; do touch "$R/dev/$f"; mount --bind "/dev/$f" "$R/dev/$f"; done
# a kernel refuses a new proc where the host's is partly masked (e.g. docker); then there is none
mount -t proc -o nosuid,nodev,noexec proc "$R/proc" 2>/dev/null || true
mount -t tmpfs -o mode=1777,nosuid,nodev,size="$SIZE",nr_inodes=4096 nrr-tmp "$R/tmp"
mount -t tmpfs -o mode=755,nosuid,nodev,size="$SIZE",nr_inodes=4096 nrr-box "$R/box"
cp "$W/main.py" "$R/box/main.py"
# after /tmp's tmpfs, which would hide an interpreter prefix under /tmp
while [ "$1" != -- ]; do mkdir -p "$R$1"; mount --bind -o ro "$1" "$R$1"; shift; done; shift
cd "$R"; mkdir .old; pivot_root . .old; umount -l /.old; rmdir /.old
mount -o remount,ro,bind /
cd /box; unset OLDPWD; PATH=/usr/bin:/bin
# init of the pid namespace stays a shell, without capabilities: it reports the program's death by
# signal N as 128+N (unshare, seeing its own child killed, exits 1 and writes noise to stderr)
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs /bin/sh -c '"$@"; exit $?' sh "$@"
"""
_SETUP_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxUnavailable(RuntimeError):
    """No isolation can be had here and the caller did not opt in to running without it."""


@dataclasses.dataclass
class SandboxLimits:
    timeout_s: float = 2.0  # wall clock
    memory_mb: int = 256  # address space
    file_size_mb: int = 4  # largest file it may write (stdout/stderr included); /box and /tmp hold 4x
    max_processes: int = 16
    max_open_files: int = 64


@dataclasses.dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolated: bool  # namespaces + a root of its own were used

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _world_reachable(path: str) -> bool:
    """True when nobody can reach `path`: every directory above it is searchable by others."""
    p = Path(path)
    return all(os.stat(d).st_mode & 0o001 for d in [*p.parents, p] if d.is_dir()) and bool(os.stat(p).st_mode & 0o004)


@functools.lru_cache(maxsize=1)
def _host_root() -> bool:
    """uid 0 of the host; root of a user namespace (nobody unmapped) has no host powers to drop."""
    if os.geteuid() != 0:
        return False
    try:
        return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _drop_root() -> list[str]:
    """As root, become nobody before anything else runs (setpriv), else nothing to add."""
    if not _host_root():
        return []
    setpriv = shutil.which("setpriv", path=_SETUP_PATH)
    if not setpriv:
        raise SandboxUnavailable("running as root and `setpriv` (util-linux) is missing: cannot drop to nobody")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs"]


def _interpreter() -> tuple[str, list[str]]:
    """A Python the sandbox's user can run, and the dirs outside /usr it needs bound in."""
    own = os.path.realpath(sys.executable)
    if not _host_root() or _world_reachable(own):  # a venv or pyenv under /root is closed to nobody
        prefix, bin_dir = os.path.realpath(sys.base_prefix), os.path.dirname(own)  # stdlib; a copied binary
        binds = [prefix] + ([] if bin_dir.startswith(prefix + "/") else [bin_dir])
        return own, [d for d in binds if d != "/usr" and not d.startswith("/usr/")]  # /usr is bound anyway
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate, []
    raise SandboxUnavailable(f"no Python reachable by nobody ({own} is not)")


def _isolated_command(work: Path, binds: list[str], program: list[str], limits: SandboxLimits) -> list[str]:
    unshare = shutil.which("unshare", path=_SETUP_PATH) or "unshare"
    size = f"{4 * limits.file_size_mb}m"
    return [*_drop_root(), unshare, "--user", "--map-root-user", "--mount", "--pid", "--net", "--fork",
            "--kill-child", "/bin/sh", "-c", _SETUP, "nrr-sandbox-setup", str(work), size, *binds, "--", *program]


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why the namespaces cannot be set up here, or None when they can (probed once per process)."""
    if not all(shutil.which(tool, path=_SETUP_PATH) for tool in ("unshare", "mount", "pivot_root", "setpriv")):
        return "util-linux `unshare`, `mount`, `pivot_root` and `setpriv` are needed"
    try:
        with tempfile.TemporaryDirectory(prefix="nrr-sandbox-") as tmp:
            _prepare(Path(tmp), "", isolated=True)
            cmd = _isolated_command(Path(tmp), [], ["true"], SandboxLimits())
            probe = subprocess.run(cmd, capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired, SandboxUnavailable) as e:
        return f"namespaces could not be set up: {e}"
    if probe.returncode != 0:
        return f"namespaces refused (user namespaces disabled?): {probe.stderr.decode(errors='replace').strip()[-300:]}"
    return None


def _unisolated_warning(reason: str) -> str:
    return (f"sandbox: running model-written code WITHOUT isolation ({reason}). It can read every file "
            "this user can (home, keys, /etc), read the host's /proc (command lines of all processes, "
            "environments of this user's), connect to the network and local services from a child "
            "process or ctypes (the audit hook covers Python sockets in its own interpreter only) and "
            "write wherever this user may; only rlimits, the timeout and the process-group kill apply.")


def _limit_child(limits: SandboxLimits) -> None:
    """preexec_fn: runs in the child between fork and exec; the limits are inherited by everything below."""
    cpu = max(1, math.ceil(limits.timeout_s))
    mem = limits.memory_mb * 1024 * 1024
    fsize = limits.file_size_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # RLIMIT_NPROC: set by _BOOTSTRAP


def _exits_within(pid: int, timeout_s: float) -> bool:
    """Wait on a pidfd: Popen.wait(timeout) polls in sleeps of up to 50 ms, which would add to every run."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int, isolated: bool) -> None:
    """SIGKILL everything the run started, leaving no zombie for the host's init to reap (it is slow).

    Isolated, the program (child of the namespace's init, itself `unshare`'s child) goes first: init
    reports it killed and exits, the kernel takes every other process in the namespace with it, and
    `unshare` reaps init and exits. Then the process group, for whatever runs outside a namespace.
    """
    if isolated:
        for program in (p for init in _children(pid) for p in _children(init)):
            try:
                os.kill(program, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _exits_within(pid, 5.0)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _prepare(work: Path, code: str, isolated: bool) -> Path:
    """Write main.py where the sandbox's user (nobody when we are root) can read it, return its path.

    Isolated: work/main.py, copied by the setup into the sandbox's /box, and work/root, the mount
    point of the new root. Not isolated: work/box/main.py, box being the cwd, the only place nobody
    may write."""
    main = work / "main.py" if isolated else work / "box" / "main.py"
    (work / ("root" if isolated else "box")).mkdir()
    main.write_text(code, encoding="utf-8")
    main.chmod(0o644)
    if _host_root():
        work.chmod(0o711 if isolated else 0o755)
        if not isolated:
            os.chown(main.parent, NOBODY, NOBODY)
    return main


def run_python(code: str, stdin: str = "", limits: SandboxLimits | None = None,
               allow_unisolated: bool | None = None) -> SandboxResult:
    """Run `code` as a Python program in a fresh work dir; return its exit code and output.

    Raises SandboxUnavailable when no isolation can be had, unless `allow_unisolated` (default: the
    NRR_SANDBOX_UNISOLATED=1 environment variable) accepts running it with the exposure warned about.
    """
    limits = limits or SandboxLimits()
    problem = isolation_problem()
    isolated = problem is None
    if not isolated:
        if allow_unisolated is None:
            allow_unisolated = os.environ.get(OPT_IN_ENV, "") == "1"
        if not allow_unisolated:
            raise SandboxUnavailable(f"refusing to run model-written code without isolation: {problem}. "
                                     f"Set {OPT_IN_ENV}=1 (or allow_unisolated=True) to run it anyway.")
        warnings.warn(_unisolated_warning(problem), RuntimeWarning, stacklevel=2)
    interpreter, binds = _interpreter()
    program = [interpreter, "-I", "-S", "-c", _BOOTSTRAP, str(limits.max_processes)]
    cap = limits.file_size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="nrr-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)  # main.py and the parent's files: stdin, stdout, stderr
        main = _prepare(work, code, isolated)
        (work / "stdin").write_text(stdin, encoding="utf-8")
        home = "/box" if isolated else str(main.parent)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if isolated else home, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        # input and output are files the parent owns: no pipe to block on, RLIMIT_FSIZE caps the
        # output, and a chatty program cannot fill the parent's memory
        with open(work / "stdin", "rb") as inp, open(work / "stdout", "w+b") as out, \
                open(work / "stderr", "w+b") as err:
            cmd = _isolated_command(work, binds, program, limits) if isolated else [*_drop_root(), *program]
            proc = subprocess.Popen(
                cmd, cwd="/" if isolated else home, env=env, stdin=inp, stdout=out, stderr=err,
                preexec_fn=functools.partial(_limit_child, limits), start_new_session=True,
            )
            try:
                timed_out = not _exits_within(proc.pid, limits.timeout_s)
            finally:
                _kill(proc.pid, isolated)  # also stragglers that outlived the main process
                proc.wait()
            out.seek(0)
            err.seek(0)
            stdout = out.read(cap).decode("utf-8", "replace")
            stderr = err.read(cap).decode("utf-8", "replace")
    seconds = time.monotonic() - start
    returncode = proc.returncode
    if isolated and 128 < returncode < 128 + 65:  # init's shell reports death by signal N as 128+N
        returncode = 128 - returncode
    return SandboxResult(returncode, stdout, stderr, timed_out, seconds, isolated)
