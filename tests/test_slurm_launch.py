"""`nrr launch` on a real one-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd).

A 2-process torchrun job reaches SUCCEEDED with its logs; a failing job's exit code and log reach
the user; no secret value lands in any generated script, config or log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"NRR_TEACHER_API_KEY": "sk-teacher-SENTINEL-31337", "HF_TOKEN": "hf_SENTINEL_slurm_2718",
           "WANDB_API_KEY": "wandb-SENTINEL-1618"}

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
        slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        pytest.fail(f"could not start the local Slurm cluster: {err}")
    yield slurm
    slurm.stop()


def launch(cluster: SlurmCluster, root: Path, *stage_args: str) -> subprocess.CompletedProcess:
    """`nrr launch task --executor slurm` with the profile bent to this cluster from the command line."""
    env = {**cluster.env, **SECRETS, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recipes.cli", "launch", "task", "--executor", "slurm", "--launcher", "torchrun",
           "executor.partition=debug", "executor.gpus_per_node=null", "executor.exclusive=null",
           "executor.container_image=null", "executor.code_dir=null", f"executor.run_root={root}",
           f"executor.nemorun_home={root}/nemorun", "executor.nproc_per_node=2", "executor.time=00:05:00",
           "--", *stage_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=240)


def job_id(root: Path) -> str:
    log = next((root / "nemorun").glob("experiments/*/*/*/log-nrr-task_*_0.out"))
    return log.name.split("_")[1]


def scan_for_secrets(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            hits += [f"{path}: {name}" for name, value in SECRETS.items() if value in text]
    return hits


def test_two_process_job_succeeds_and_failure_reaches_user(cluster, tmp_path):
    ok = tmp_path / "ok"
    proc = launch(cluster, ok, "--n", "2", "--output", str(ok / "problems.jsonl"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + cluster.logs()
    assert "SUCCEEDED" in proc.stdout
    assert cluster.sacct_state(job_id(ok)) == ("COMPLETED", "0:0")
    log = next((ok / "nemorun").glob("experiments/*/*/*/log-nrr-task_*_0.out")).read_text()
    # torchrun started two workers, each ran the stage
    assert "[default0]:wrote 6 problems" in log and "[default1]:wrote 6 problems" in log
    assert (ok / "problems.jsonl").read_text().count("\n") == 6
    assert (ok / "runs/launch/task/.nrr_stage/SUCCEEDED").exists()

    bad = tmp_path / "bad"
    proc = launch(cluster, bad, "--split", "bogus")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stdout
    assert "invalid choice: 'bogus'" in proc.stdout  # the end of the job log is shown
    state, exit_code = cluster.sacct_state(job_id(bad))
    assert state == "FAILED" and exit_code != "0:0"

    assert scan_for_secrets(tmp_path) == []
    assert all(value not in proc.stdout + proc.stderr for value in SECRETS.values())
