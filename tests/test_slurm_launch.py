"""`nrr launch` on a real one-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd).

A tiny 2-process SFT (TP=2 under torchrun) reaches SUCCEEDED with its logs and a checkpoint; a
failing job's exit code and log reach the user; no secret value lands in any generated script,
config or log.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCannotInstall, SlurmCluster, SlurmUnavailable, ensure_installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"NRR_TEACHER_API_KEY": "sk-teacher-SENTINEL-31337", "HF_TOKEN": "hf_SENTINEL_slurm_2718",
           "WANDB_API_KEY": "wandb-SENTINEL-1618"}

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_installed()
    except SlurmCannotInstall as err:
        pytest.skip(str(err))  # a machine that cannot have Slurm says what it needs; CI (root) installs it
    except SlurmUnavailable as err:
        pytest.fail(f"could not install the local Slurm cluster: {err}")
    try:
        slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        pytest.fail(f"could not start the local Slurm cluster: {err}")
    yield slurm
    slurm.stop()


def launch(cluster: SlurmCluster, root: Path, stage: str, *stage_args: str) -> subprocess.CompletedProcess:
    """`nrr launch <stage> --executor slurm` with the profile bent to this cluster from the command line."""
    env = {**cluster.env, **SECRETS, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recipes.cli", "launch", stage, "--executor", "slurm", "--launcher", "torchrun",
           "executor.partition=debug", "executor.gpus_per_node=null", "executor.exclusive=null",
           "executor.container_image=null", "executor.code_dir=null", f"executor.run_root={root}",
           f"executor.nemorun_home={root}/nemorun", "executor.nproc_per_node=2", "executor.time=00:05:00",
           "executor.signal_grace_s=60", "--", *stage_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=240)


def job_log(root: Path, stage: str) -> Path:
    return next((root / "nemorun").glob(f"experiments/*/*/*/log-nrr-{stage}_*_0.out"))


def job_id(root: Path, stage: str) -> str:
    return job_log(root, stage).name.split("_")[1]


def scan_for_secrets(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            hits += [f"{path}: {name}" for name, value in SECRETS.items() if value in text]
    return hits


TINY_SFT = ["--config", "nemo_configs/sft/tiny_cpu.yaml", "parallel.tp=2", "training.max_steps=4",
            "training.global_batch_size=4", "training.micro_batch_size=2", "training.warmup_steps=1",
            "training.threads=1", "data.task.n_per_level=40", "data.task.valid_per_level=4",
            "validation.every_steps=0", "checkpoint.every_steps=2", "logging.every_steps=1",
            "logging.progress=false", "logging.tensorboard=false", "export_hf=false"]


def test_two_process_sft_succeeds_and_failure_reaches_user(cluster, tmp_path):
    from recipes.megatron import checkpointing

    ok = tmp_path / "ok"
    proc = launch(cluster, ok, "sft", *TINY_SFT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + cluster.logs()
    assert "SUCCEEDED" in proc.stdout
    assert cluster.sacct_state(job_id(ok, "sft")) == ("COMPLETED", "0:0")
    log = job_log(ok, "sft").read_text()
    # torchrun started two workers that trained one TP=2 model together
    assert "[default0]:" in log and "[default1]:" in log
    run_dir = ok / "runs/launch/sft"
    assert checkpointing.latest_step(run_dir / "checkpoints") == 4
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert (run_dir / ".nrr_stage/SUCCEEDED").exists()

    # a mistake the launch can see is refused before sbatch: no job, no job folder
    refused = tmp_path / "refused"
    proc = launch(cluster, refused, "task", "--split", "bogus")
    assert proc.returncode == 2 and "nrr task: argument --split: invalid choice: 'bogus'" in proc.stderr
    assert not (refused / "nemorun").exists()

    # one only the job can see (its output folder does not exist) fails the job, and its log reaches the user
    bad = tmp_path / "bad"
    proc = launch(cluster, bad, "task", "--n", "1", "--output", str(bad / "missing" / "problems.jsonl"))
    # both workers fail; which of them torchrun reports first (1, or the SIGTERM it sent the other) is a race
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stdout
    assert "No such file or directory" in proc.stdout  # the end of the job log is shown
    state, exit_code = cluster.sacct_state(job_id(bad, "task"))
    assert state == "FAILED" and exit_code != "0:0"

    assert scan_for_secrets(tmp_path) == []
    assert all(value not in proc.stdout + proc.stderr for value in SECRETS.values())
