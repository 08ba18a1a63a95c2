"""`nrr launch` on a real two-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, two slurmd on this host).

A tiny SFT at TP=2 over two nodes, one process each (torchrun rendezvous across the nodes), reaches SUCCEEDED with
its logs and a checkpoint; the same job stopped by `scancel --signal=TERM` saves its step, requeues itself, resumes
and ends with the uninterrupted job's weights and losses; a failing job's exit code and log reach the user; no
secret value lands in any generated script, config or log.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
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
        slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2).start()
    except SlurmUnavailable as err:
        pytest.fail(f"could not start the local Slurm cluster: {err}")
    yield slurm
    slurm.stop()


def launch(cluster: SlurmCluster, root: Path, stage: str, *stage_args: str, nodes: int = 1, nproc: int = 2,
           executor: tuple[str, ...] = (), detach: bool = False) -> subprocess.CompletedProcess:
    """`nrr launch <stage> --executor slurm` with the profile bent to this cluster from the command line."""
    env = {**cluster.env, **SECRETS, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recipes.cli", "launch", stage, "--executor", "slurm", "--launcher", "torchrun",
           *(["--detach"] if detach else []),
           "executor.partition=debug", "executor.gpus_per_node=null", "executor.exclusive=null",
           "executor.container_image=null", "executor.code_dir=null", f"executor.run_root={root}",
           f"executor.nemorun_home={root}/nemorun", f"executor.nodes={nodes}", f"executor.nproc_per_node={nproc}",
           "executor.time=00:05:00", "executor.signal_grace_s=60", *executor, "--", *stage_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=240)


def job_log(root: Path, stage: str, attempt: int = 0) -> Path:
    return next((root / "nemorun").glob(f"experiments/*/*/*/log-nrr-{stage}_*_{attempt}.out"))


def job_id(root: Path, stage: str) -> str:
    return job_log(root, stage).name.split("_")[1]


def wait_for(predicate, what: str, cluster: SlurmCluster, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def scan_for_secrets(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            hits += [f"{path}: {name}" for name, value in SECRETS.items() if value in text]
    return hits


# TP=2 over two nodes of one process each; checkpoints at steps 2 and 4 of 4, exported to HF for comparison
TINY_SFT = ["--config", "nemo_configs/sft/tiny_cpu.yaml", "parallel.tp=2", "parallel.nodes=2", "training.max_steps=4",
            "training.global_batch_size=4", "training.micro_batch_size=2", "training.warmup_steps=1",
            "training.threads=1", "data.task.n_per_level=40", "data.task.valid_per_level=4",
            "validation.every_steps=0", "checkpoint.every_steps=2", "logging.every_steps=1",
            "logging.progress=false", "logging.tensorboard=false"]
TWO_NODES = dict(nodes=2, nproc=1)


def train_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def two_node_sft(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-node")
    proc = launch(cluster, root, "sft", *TINY_SFT, **TWO_NODES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + cluster.logs()
    assert "SUCCEEDED" in proc.stdout
    return root


def test_two_node_sft_succeeds_and_failure_reaches_user(cluster, two_node_sft, tmp_path):
    from recipes.megatron import checkpointing

    ok = two_node_sft
    assert cluster.sacct_state(job_id(ok, "sft")) == ("COMPLETED", "0:0")
    # torchrun as one task on each node (a job step over n1 and n2), its two ranks training one TP=2 model
    steps = cluster._run(["sacct", "-n", "-P", "-j", job_id(ok, "sft"), "-o", "JobName,NodeList,NTasks"]).stdout
    assert "torchrun|n[1-2]|2" in steps.splitlines(), steps
    assert "[sft] done: 4 steps" in job_log(ok, "sft").read_text()
    run_dir = ok / "runs/launch/sft"
    assert checkpointing.latest_step(run_dir / "checkpoints") == 4
    losses = [r["loss"] for r in train_rows(run_dir)]
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

    assert scan_for_secrets(tmp_path) == [] and scan_for_secrets(ok) == []
    assert all(value not in proc.stdout + proc.stderr for value in SECRETS.values())


def test_sigterm_requeues_the_job_which_resumes_to_the_same_weights(cluster, two_node_sft, tmp_path):
    from safetensors.torch import load_file

    from recipes.megatron import checkpointing

    root = tmp_path / "requeued"
    proc = launch(cluster, root, "sft", *TINY_SFT, **TWO_NODES, executor=("executor.max_requeues=1",), detach=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = root / "runs/launch/sft"
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and train_rows(run_dir), "the first step", cluster)
    job = job_id(root, "sft")
    # as a preemption or the time limit does: SIGTERM to every process of the job's steps (torchrun and the ranks)
    cluster._run(["scancel", "--signal=TERM", job])
    # the ranks save the step they are in and exit 75; the batch script requeues the job, which resumes there
    wait_for(lambda: cluster.sacct_state(job)[0] == "COMPLETED", "the requeued job to complete", cluster)
    first, second = job_log(root, "sft", 0).read_text(), job_log(root, "sft", 1).read_text()
    assert "[preempted] SIGTERM: checkpoint of step" in first
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 1 <= summary["start_step"] < 4 and f"resumed from {run_dir / 'checkpoints'}" in second
    assert checkpointing.latest_step(run_dir / "checkpoints") == 4
    reference = two_node_sft / "runs/launch/sft"
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    assert [r["loss"] for r in train_rows(run_dir)] == [r["loss"] for r in train_rows(reference)]
    a, b = (load_file(str(d / "hf" / "model.safetensors")) for d in (reference, run_dir))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert scan_for_secrets(root) == []
