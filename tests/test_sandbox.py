"""The sandbox's limits hold: time, memory, file size, network, files outside its dir, process trees."""

import os
import socket
import sys
import textwrap
import threading
import time

import psutil
import pytest

from recipes.rl.sandbox import SandboxLimits, isolation_prefix, run_python


def _sandbox_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "nrr-sandbox-" in " ".join(p.info["cmdline"] or [])
            or (p.info["cmdline"] and "_no_network" in " ".join(p.info["cmdline"]))}


def test_runs_code_with_stdin_in_its_own_dir():
    r = run_python("import os\nprint(input()[::-1], os.path.basename(os.getcwd()), sorted(os.listdir('.')))", stdin="abc\n")
    assert r.ok and r.stdout.split()[0] == "cba"
    assert "box" in r.stdout and "['main.py']" in r.stdout


def test_infinite_loop_costs_one_timeout():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=1.0))
    assert r.timed_out and not r.ok
    assert time.monotonic() - t0 < 3.0


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
    if not isolation_prefix():
        pytest.skip("needs root + unshare to drop to an unprivileged user")
    target = tmp_path / "keep.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o755)
    os.chmod(target, 0o644)  # readable by others, writable only by its owner
    code = f"""
import os
for action in (lambda: open({str(target)!r}, 'w').write('pwned'), lambda: os.remove({str(target)!r}),
               lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x')):
    try:
        action(); print('DONE')
    except PermissionError:
        print('DENIED')
"""
    r = run_python(code)
    assert r.ok and r.stdout.split() == ["DENIED", "DENIED", "DENIED"]
    assert target.read_text() == "original" and not (tmp_path / "new.txt").exists()


def test_network_refused_even_for_a_child_without_the_audit_hook():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: _accept(server, accepted), daemon=True)
    thread.start()
    # the program spawns a fresh interpreter (no audit hook inside it) that tries to connect
    child = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1); print('CONNECTED')"
    code = textwrap.dedent(f"""
        import subprocess, sys
        p = subprocess.run([sys.executable, '-I', '-c', {child!r}], capture_output=True, text=True)
        print(p.stdout, p.stderr)
        try:
            import socket
            socket.create_connection(('127.0.0.1', {port}), timeout=1)
            print('CONNECTED')
        except OSError as e:
            print('REFUSED', e)
    """)
    r = run_python(code, limits=SandboxLimits(timeout_s=5))
    thread.join()
    server.close()
    assert "CONNECTED" not in r.stdout and "REFUSED" in r.stdout
    assert accepted == []
    if isolation_prefix():
        assert "unreachable" in r.stdout.lower()  # the network namespace has no route at all


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_fork_bomb_and_process_tree_killed():
    before = _sandbox_pids()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    r = run_python(bomb, limits=SandboxLimits(timeout_s=1.0))
    assert r.timed_out and time.monotonic() - t0 < 4.0
    # a detached grandchild that sleeps: must be gone after the run ends
    r2 = run_python("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
                    "start_new_session=True)\nprint('spawned')")
    assert "spawned" in r2.stdout
    time.sleep(0.5)
    leftover = [p for p in psutil.process_iter(["cmdline", "username"])
                if "time.sleep(60)" in " ".join(p.info["cmdline"] or [])]
    assert leftover == [] and _sandbox_pids() <= before
    # the machine is still usable: a normal program runs right after
    assert run_python("print(1 + 1)").stdout.strip() == "2"
