"""The sandbox's limits hold: time, memory, file size, network, files outside its dir, process trees.

`test_escape_drill` runs model-style escape attempts from a fresh interpreter as the current user and,
when that is root, as nobody too: the sandbox must hold without root.
"""

import inspect
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from recipes.rl import sandbox
from recipes.rl.sandbox import OPT_IN_ENV, SandboxLimits, SandboxUnavailable, isolation_problem, run_python

REPO = Path(__file__).resolve().parents[1]


def _leftovers(marker: str, wait_s: float = 5.0) -> list[int]:
    """Host pids whose name (comm, inherited by forks) is `marker`, after the kernel had time to reap them."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for comm in Path("/proc").glob("[0-9]*/comm"):
            try:
                if comm.read_text().strip() == marker:
                    found.append(int(comm.parent.name))
            except OSError:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_isolation_is_available_here():
    assert isolation_problem() is None  # CI's image has unshare and user namespaces: nothing may skip


def test_runs_code_with_stdin_in_its_own_dir():
    r = run_python("import os\nprint(input()[::-1], os.path.basename(os.getcwd()), sorted(os.listdir('.')))", stdin="abc\n")
    assert r.ok and r.isolated and r.stdout.split()[0] == "cba"
    assert "box" in r.stdout and "['main.py']" in r.stdout


def test_infinite_loop_costs_one_timeout():
    marker = "nrr" + secrets.token_hex(6)
    r = run_python(f"open('/proc/self/comm', 'w').write({marker!r})\nwhile True:\n    pass",
                   limits=SandboxLimits(timeout_s=1.0))
    assert r.timed_out and not r.ok and r.returncode < 0  # killed by the timeout, not exited
    assert _leftovers(marker) == []


def test_memory_limit():
    r = run_python("x = bytearray(512 * 1024 * 1024)\nprint('allocated')", limits=SandboxLimits(memory_mb=128))
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_file_size_limit():
    r = run_python("open('big', 'w').write('a' * 5_000_000)", limits=SandboxLimits(file_size_mb=1))
    assert not r.ok and "File too large" in r.stderr


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", limits=SandboxLimits(timeout_s=2.0, file_size_mb=1))
    assert not r.ok and len(r.stdout) <= 1024 * 1024


def test_files_outside_its_dir_untouched(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o777)  # even a world-writable host dir must be out of reach
    os.chmod(target, 0o666)
    code = f"""
import os
for action in (lambda: open({str(target)!r}, 'w').write('pwned'), lambda: os.remove({str(target)!r}),
               lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):
    try:
        action(); print('DONE')
    except OSError:
        print('DENIED')
"""
    r = run_python(code)
    assert r.ok and r.stdout.split() == ["DENIED", "DENIED", "DENIED"]
    assert target.read_text() == "original" and not (tmp_path / "new.txt").exists()


def test_network_refused_even_for_a_child_without_the_audit_hook():
    with _Listener() as listener:
        # the program spawns a fresh interpreter (no audit hook inside it) that tries to connect
        child = (f"import socket; socket.create_connection(('127.0.0.1', {listener.port}), timeout=1); "
                 "print('CONNECTED')")
        code = textwrap.dedent(f"""
            import subprocess, sys
            p = subprocess.run([sys.executable, '-I', '-c', {child!r}], capture_output=True, text=True)
            print(p.stdout, p.stderr)
            try:
                import socket
                socket.create_connection(('127.0.0.1', {listener.port}), timeout=1)
                print('CONNECTED')
            except OSError as e:
                print('REFUSED', e)
        """)
        r = run_python(code, limits=SandboxLimits(timeout_s=5))
    assert "CONNECTED" not in r.stdout and "REFUSED" in r.stdout
    assert listener.received == []
    assert "unreachable" in r.stdout.lower()  # the network namespace has no route at all


def test_fork_bomb_and_process_tree_killed():
    marker = "nrr" + secrets.token_hex(6)
    name = f"open('/proc/self/comm', 'w').write({marker!r})\n"
    bomb = f"import os\n{name}while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_python(bomb, limits=SandboxLimits(timeout_s=1.0))
    assert r.timed_out and _leftovers(marker) == []
    # a detached grandchild that sleeps: must be gone after the run ends
    sleeper = f"import time\n{name}time.sleep(60)"
    r2 = run_python(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {sleeper!r}], "
                    "start_new_session=True)\nprint('spawned')")
    assert "spawned" in r2.stdout and _leftovers(marker) == []
    # the machine is still usable: a normal program runs right after
    assert run_python("print(1 + 1)").stdout.strip() == "2"


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no namespaces in this test")
    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=OPT_IN_ENV):
        run_python("print(1)")
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation.*read every file"):
        r = run_python("print(1)", allow_unisolated=True)
    assert r.ok and not r.isolated and r.stdout.strip() == "1"
    monkeypatch.setenv(OPT_IN_ENV, "1")
    with pytest.warns(RuntimeWarning, match="no namespaces in this test"):
        assert run_python("import os; print(os.getcwd())").stdout.strip().endswith("box")


class _Listener:
    """A TCP listener on 127.0.0.1 that records what each connection sends."""

    def __enter__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return self

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(100))
                except OSError:
                    self.received.append(b"")

    def __exit__(self, *exc):
        self.server.close()
        self.thread.join(5)


# What model-written code tries; cfg comes on stdin. Each attempt's value (or error) is reported.
_ESCAPES = r'''
import ctypes, glob, json, os, socket, subprocess, sys
cfg = json.loads(sys.stdin.read())
seen = {}
def attempt(name, fn):
    try:
        seen[name] = repr(fn())[-400:]
    except Exception as e:
        seen[name] = f"refused: {type(e).__name__}: {e}"[:300]
for i, path in enumerate(cfg["secrets"]):
    attempt(f"read secret {i}", lambda: open(path).read())
attempt("os.environ", lambda: dict(os.environ))
attempt("parent environ", lambda: open(f"/proc/{os.getppid()}/environ").read())
attempt("driver environ", lambda: open(f"/proc/{cfg['driver_pid']}/environ").read())
def every_environ():
    out = []
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            out.append(open(path, "rb").read().decode(errors="replace"))
        except OSError:
            pass
    return out
attempt("every environ", every_environ)
addr = ("127.0.0.1", cfg["port"])
attempt("socket", lambda: socket.create_connection(addr, timeout=2).sendall(b"sandbox"))
child = f"import socket; socket.create_connection({addr!r}, timeout=2).sendall(b'sandbox child')"
def child_connect():
    p = subprocess.run([sys.executable, "-I", "-c", child], capture_output=True, text=True, timeout=10)
    return p.stdout + p.stderr
attempt("child socket", child_connect)
def ctypes_connect():  # libc directly: no audit event
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
    sa = (2).to_bytes(2, "little") + cfg["port"].to_bytes(2, "big") + bytes([127, 0, 0, 1]) + bytes(8)
    if libc.connect(fd, sa, 16) == 0:
        libc.send(fd, b"sandbox ctypes", 14, 0)
        return "connected"
    return f"connect errno {ctypes.get_errno()}"
attempt("ctypes socket", ctypes_connect)
attempt("write host dir", lambda: open(os.path.join(cfg["open_dir"], "pwned"), "w").write("x"))
attempt("overwrite secret", lambda: open(cfg["secrets"][0], "w").write("pwned"))
attempt("write own /tmp", lambda: open("/tmp/" + cfg["marker"], "w").write("x"))
attempt("write /usr", lambda: open("/usr/pwned", "w").write("x"))
attempt("write /", lambda: open("/pwned", "w").write("x"))
attempt("list /", lambda: sorted(os.listdir("/")))
print(json.dumps(seen))
'''


def _drill(cfg: dict) -> dict:
    """Runs in a fresh interpreter as the user under test (pytest-free: nobody has no venv)."""
    import json
    import os
    import socket
    import sys
    import time
    from pathlib import Path

    from recipes.rl.sandbox import SandboxLimits, run_python

    def read(path):
        try:
            return path.read_text().strip()
        except OSError:  # the process ended meanwhile
            return ""

    def leftovers(marker):  # host pids named `marker` (comm, inherited by forks), given 5 s to go
        for _ in range(50):
            found = [c.parent.name for c in Path("/proc").glob("[0-9]*/comm") if read(c) == marker]
            if not found:
                break
            time.sleep(0.1)
        return found

    out = {"uid": os.getuid()}
    cfg["driver_pid"] = os.getpid()
    # controls: this user itself can do what the sandboxed code must not
    out["control"] = {"secret": Path(cfg["secrets"][0]).read_text(), "sentinel": os.environ.get(cfg["sentinel_name"])}
    socket.create_connection(("127.0.0.1", cfg["port"]), timeout=5).sendall(b"control")
    Path(cfg["open_dir"], "control").write_text("x")
    out["control"]["open_dir"] = os.listdir(cfg["open_dir"])
    os.remove(Path(cfg["open_dir"], "control"))

    r = run_python(cfg["escapes"], stdin=json.dumps(cfg), limits=SandboxLimits(timeout_s=30))
    out["escapes"] = {"ok": r.ok, "isolated": r.isolated, "stdout": r.stdout, "stderr": r.stderr[-2000:]}
    out["after"] = {"open_dir": os.listdir(cfg["open_dir"]), "secret": Path(cfg["secrets"][0]).read_text(),
                    "host tmp": os.path.exists("/tmp/" + cfg["marker"])}

    def limited(name, code, **limits):
        r = run_python(code, stdin=cfg["marker"], limits=SandboxLimits(**limits))
        out[name] = {"ok": r.ok, "timed_out": r.timed_out, "returncode": r.returncode, "stdout": r.stdout,
                     "stderr": r.stderr[-500:], "isolated": r.isolated, "leftovers": leftovers(cfg["marker"])}

    name = "import os, sys\nopen('/proc/self/comm', 'w').write(sys.stdin.read())\n"
    limited("memory", "x = bytearray(512 * 1024 * 1024)\nprint('allocated')", memory_mb=128)
    limited("cpu", name + "while True:\n    pass", timeout_s=1.0)
    limited("processes", name + "import time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    n += 1\nprint(n)", max_processes=8, timeout_s=20)
    limited("fork bomb", name + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            timeout_s=1.0)
    sleeper = "import sys, time\nopen('/proc/self/comm', 'w').write(sys.argv[1])\ntime.sleep(60)"
    limited("detached", f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {sleeper!r}, "
            f"{cfg['marker']!r}], start_new_session=True)\nprint('spawned')")
    return out


@pytest.mark.parametrize("as_nobody", [False, True], ids=["current-user", "nobody"])
def test_escape_drill(as_nobody):
    if as_nobody and os.geteuid() != 0:
        pytest.skip("not root: the current-user case is the unprivileged one")
    token, name = secrets.token_hex(8), secrets.token_hex(6)  # the secret's value; a name for paths
    host_dir = Path(tempfile.mkdtemp(prefix="nrr-drill-", dir="/tmp"))  # outside any sandbox work dir
    root_secret = Path(f"/root/nrr-drill-{name}.txt")
    try:
        os.chmod(host_dir, 0o755)
        secret_files = [host_dir / "secret.txt"] + ([root_secret] if os.geteuid() == 0 else [])
        for f in secret_files:
            f.write_text(f"SECRET-{token}")
            os.chmod(f, 0o644)
        open_dir = host_dir / "open"
        open_dir.mkdir()
        os.chmod(open_dir, 0o777)
        with _Listener() as listener:
            cfg = {"secrets": [str(f) for f in secret_files], "open_dir": str(open_dir), "port": listener.port,
                   "sentinel_name": "NRR_DRILL_API_KEY", "marker": "nrr" + name, "escapes": _ESCAPES}
            out = _run_drill(cfg, token, as_nobody)
        received = listener.received
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
        root_secret.unlink(missing_ok=True)

    # the controls held: the secret, the sentinel, the listener and the open dir were in this user's reach
    assert out["uid"] == (65534 if as_nobody else os.geteuid())
    assert out["control"] == {"secret": f"SECRET-{token}", "sentinel": f"sentinel-{token}", "open_dir": ["control"]}
    esc = out["escapes"]
    assert esc["ok"] and esc["isolated"], esc
    seen = json.loads(esc["stdout"])
    # neither a secret's text nor the sentinel got in (os.environ, the parent's, every /proc/<pid>/environ)
    assert token not in esc["stdout"] and cfg["sentinel_name"] not in esc["stdout"], seen
    for key in ("read secret 0", "driver environ", "socket", "write host dir", "overwrite secret",
                "write /usr", "write /"):
        assert seen[key].startswith("refused"), (key, seen[key])
    assert "unreachable" in seen["child socket"] and seen["ctypes socket"] == repr("connect errno 101")  # ENETUNREACH
    assert "work" not in seen["list /"] and "root" not in seen["list /"], seen["list /"]
    assert not seen["write own /tmp"].startswith("refused")  # its own tmpfs, gone with it
    assert received == [b"control"]
    assert out["after"] == {"open_dir": [], "secret": f"SECRET-{token}", "host tmp": False}

    for case in ("memory", "cpu", "processes", "fork bomb", "detached"):
        assert out[case]["isolated"] and out[case]["leftovers"] == [], (case, out[case])
    assert not out["memory"]["ok"] and "MemoryError" in out["memory"]["stderr"]
    assert out["cpu"]["timed_out"] and out["cpu"]["returncode"] < 0
    assert out["processes"]["ok"] and 0 < int(out["processes"]["stdout"]) < 8, out["processes"]
    assert out["fork bomb"]["timed_out"]
    assert out["detached"]["ok"] and "spawned" in out["detached"]["stdout"]


def _run_drill(cfg: dict, token: str, as_nobody: bool) -> dict:
    script = inspect.getsource(_drill) + "\nimport json, sys\nprint(json.dumps(_drill(json.loads(sys.argv[1]))))\n"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "TMPDIR": "/tmp", "HOME": "/",
           "PYTHONDONTWRITEBYTECODE": "1", cfg["sentinel_name"]: f"sentinel-{token}"}

    def become_nobody():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    # nobody cannot reach a venv under /root: it gets the interpreter the sandbox itself would pick
    python = sandbox._interpreter()[0] if as_nobody else sys.executable
    p = subprocess.run([python, "-c", script, json.dumps(cfg)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, preexec_fn=become_nobody if as_nobody else None)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])
