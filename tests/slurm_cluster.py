"""A real Slurm cluster on this machine for tests: munge, MariaDB, slurmdbd, slurmctld, and one slurmd per node
(`nodes=2`: two slurmd daemons on this host, nodes n1 and n2, for multi-node jobs).

Installs the Debian packages when they are missing (we are root), keeps every piece of state in
one temp dir, starts each daemon in the foreground as our child and stops it by pid. Clients
(sbatch, squeue, sacct: what NeMo-Run calls) find the cluster through $SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct", "sacctmgr"]
CLUSTER = "nrrtest"
DB_USER, DB_PASS, DB_NAME = "slurm", "slurm-test-db", "slurm_acct_db"


class SlurmUnavailable(RuntimeError):
    """The cluster could not be installed or started here."""


class SlurmCannotInstall(SlurmUnavailable):
    """The packages are missing and this machine cannot install them (no root or no apt-get)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(timeout: float = 600) -> None:
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmCannotInstall(f"these tests start a real one-node Slurm cluster and need {', '.join(PACKAGES)}; "
                                 "they are not installed and this user cannot install them (needs root and apt-get). "
                                 f"Install them once with `sudo apt-get install -y {' '.join(PACKAGES)}` (Debian/"
                                 "Ubuntu), then re-run; the tests start and stop the daemons themselves.")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    # more than one: that many slurmd daemons on this host (nodes n1..nN, each on its own port), for multi-node
    # jobs (Debian's Slurm is built with --enable-multiple-slurmd)
    nodes: int = 1
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> "SlurmCluster":
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)  # munged wants its socket's directories traversable
        for sub in ("munge", "db", "state", "spool", "log", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.munge_socket = r / "munge" / "munge.socket.2"
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_bin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={r / 'run/munged.pid'}", f"--log-file={r / 'log/munged.log'}",
                               f"--seed-file={r / 'munge/seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged socket", 20)

        db_port = _free_port()
        db_socket = r / "run" / "mysqld.sock"
        install = subprocess.run(["mariadb-install-db", f"--datadir={r / 'db'}", "--user=root",
                                  "--auth-root-authentication-method=socket", "--skip-test-db"],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            raise SlurmUnavailable(f"mariadb-install-db failed: {install.stderr[-1500:]}")
        self._spawn("mariadbd", [_bin("mariadbd"), "--no-defaults", f"--datadir={r / 'db'}", "--user=root",
                                 f"--socket={db_socket}", f"--port={db_port}", "--bind-address=127.0.0.1",
                                 f"--pid-file={r / 'run/mariadb.pid'}", f"--log-error={r / 'log/mariadb.log'}",
                                 "--innodb-buffer-pool-size=32M"])
        self._wait(lambda: db_socket.exists(), "mariadb socket", 30)
        sql = (f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
               f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1'; FLUSH PRIVILEGES;")
        self._run(["mariadb", "--no-defaults", f"--socket={db_socket}", "-u", "root", "-e", sql])

        dbd_port, ctld_port, slurmd_port = _free_port(), _free_port(), _free_port()
        dbd_conf = r / "slurmdbd.conf"
        dbd_conf.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "DbdHost=localhost",
            f"DbdPort={dbd_port}", "SlurmUser=root", f"LogFile={r / 'log/slurmdbd.log'}",
            f"PidFile={r / 'run/slurmdbd.pid'}", "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1", f"StoragePort={db_port}", f"StorageUser={DB_USER}",
            f"StoragePass={DB_PASS}", f"StorageLoc={DB_NAME}", "",
        ]))
        dbd_conf.chmod(0o600)
        cpus = os.cpu_count() or 1
        if self.nodes == 1:
            self.node_names = [self.hostname]
            node_lines = [f"NodeName={self.hostname} CPUs={cpus} State=UNKNOWN"]
        else:  # the host's CPUs are shared, not split: each node offers all of them
            self.node_names = [f"n{i}" for i in range(1, self.nodes + 1)]
            node_lines = [f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={cpus} State=UNKNOWN" for name in self.node_names]
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER}", f"SlurmctldHost={self.hostname}", "SlurmUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool/%n'}",
            f"SlurmctldPidFile={r / 'run/slurmctld.pid'}", f"SlurmdPidFile={r / 'run/slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2", "SlurmctldTimeout=30",
            "SlurmdTimeout=30", "InactiveLimit=0", "MinJobAge=300", "KillWait=5", "Waittime=0",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={dbd_port}", f"AccountingStoragePass={self.munge_socket}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", "",
        ]))
        (r / "plugstack.conf").write_text("")

        # slurmdbd reads slurmdbd.conf next to $SLURM_CONF.
        self._spawn("slurmdbd", [_bin("slurmdbd"), "-D"])
        self._wait(lambda: self._ok(["sacctmgr", "-n", "list", "cluster"]), "slurmdbd", 30)
        self._run(["sacctmgr", "-i", "add", "cluster", CLUSTER], check=False)
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"]), "slurmctld", 30)
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [_bin("slurmd"), "-D", "-f", str(self.conf), "-N", name])
        self._wait(self._nodes_idle, f"{self.nodes} idle node(s)", timeout)

    # ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()}\n{self.logs()}")
        return proc

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _nodes_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return proc.returncode == 0 and proc.stdout.split() == ["idle"] * self.nodes

    def _wait(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                           f"{self.logs()}")
            if predicate():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons we started, newest first, by pid (SIGTERM, then SIGKILL)."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except ProcessLookupError:
                    pass
        self.procs.clear()

    def sacct_state(self, job_id: str) -> tuple[str, str]:
        """(State, ExitCode) of a job's allocation as accounting recorded it."""
        proc = self._run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"])
        state, exit_code = proc.stdout.strip().splitlines()[0].split("|")
        return state, exit_code
