"""Executor profiles: where a stage runs (local, Slurm, Kubernetes), one YAML per profile.

A profile lives in `nemo_configs/executors/<name>.yaml`; its `kind` picks the dataclass below.
Every field can be overridden from the command line (`executor.nodes=4`), through `recipes.config`.

Secrets never appear in a profile: `secret_env` lists environment variable NAMES that are passed
through to the job (inherited on local/Slurm, `--container-env NAME` under pyxis, a
`secretKeyRef` on Kubernetes), so no value is ever written into a script or manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from recipes.config import ConfigError, load_config, read_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "nemo_configs" / "executors"

# Names commonly holding credentials; every profile passes these through by name when set.
DEFAULT_SECRET_ENV = ["NRR_TEACHER_API_KEY", "HF_TOKEN", "WANDB_API_KEY", "NGC_API_KEY"]


@dataclass
class LocalProfile:
    """NeMo-Run LocalExecutor on this machine; torchrun stages get `nproc_per_node` processes."""

    kind: Literal["local"] = "local"
    nproc_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[str] = field(default_factory=lambda: list(DEFAULT_SECRET_ENV))
    # Where NeMo-Run keeps experiments (metadata, logs); relative paths are under the run root.
    # (No path component may be named `nemo_run`: NeMo-Run rewrites `/nemo_run` in job paths.)
    nemorun_home: str = "runs/nemorun"
    # Relative stage configs and output dirs resolve against these (None: the repository root).
    code_dir: str | None = None
    run_root: str | None = None


@dataclass
class SlurmProfile:
    """NeMo-Run SlurmExecutor: one sbatch per stage, pyxis container, afterok dependencies."""

    kind: Literal["slurm"] = "slurm"
    account: str | None = None
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int | None = None
    # torchrun workers per node; default: gpus_per_node, or 1 without GPUs.
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str = "01:00:00"
    qos: str | None = None
    exclusive: bool | None = None
    gres: str | None = None
    # pyxis/enroot: image and bind mounts; None runs on the node's own environment.
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[str] = field(default_factory=lambda: list(DEFAULT_SECRET_ENV))
    setup_lines: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    # Preemption and the time limit: Slurm sends SIGTERM signal_grace_s seconds before the limit (as it does on
    # preemption, SIGKILL following after the partition's GraceTime); training saves at the next step and exits
    # with recipes.trainer.REQUEUE_EXIT_CODE. requeue: Slurm may requeue the job (--requeue: on preemption);
    # max_requeues > 0: the sbatch script also requeues it after a non-zero exit (a save at the time limit, but
    # also any failure: torchrun reports 1 either way) while it has requeues left; it resumes from its checkpoint.
    signal_grace_s: int | None = 300  # None: no signal before the limit; must be below `time`
    requeue: bool = True
    max_requeues: int = 0
    # How sbatch is reached: "local" (this machine is a login node) or "ssh".
    tunnel: Literal["local", "ssh"] = "local"
    ssh_host: str | None = None
    ssh_user: str | None = None
    ssh_identity: str | None = None
    # Directory (on the cluster) that holds sbatch scripts and job logs; relative: under run_root.
    job_dir: str = "runs/slurm_jobs"
    nemorun_home: str = "runs/nemorun"
    # Where the repository lives where the job runs (inside the image under pyxis).
    code_dir: str | None = None
    # Shared filesystem root for stage outputs (must be visible from every node).
    run_root: str | None = None


@dataclass
class K8sVolume:
    """A PersistentVolumeClaim mounted into every pod (shared run outputs, datasets)."""

    name: str = "runs"
    claim: str = "nrr-runs"
    mount_path: str = "/runs"


@dataclass
class K8sProfile:
    """Kubernetes: Kubeflow Trainer v2 TrainJob for training stages, KubeRay RayJob for curation."""

    kind: Literal["k8s"] = "k8s"
    namespace: str = "default"
    image: str = "nvcr.io/example/nrr:latest"
    image_pull_secrets: list[str] = field(default_factory=list)
    runtime_ref: str = "torch-distributed"
    num_nodes: int = 1
    gpus_per_node: int | None = None
    nproc_per_node: int | None = None
    cpu_requests: str | None = None
    memory_requests: str | None = None
    cpu_limits: str | None = None
    memory_limits: str | None = None
    volumes: list[K8sVolume] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[str] = field(default_factory=lambda: list(DEFAULT_SECRET_ENV))
    # The Kubernetes Secret whose keys (named like the variables) hold `secret_env` values.
    secret_name: str = "nrr-secrets"
    # KubeRay cluster for Ray-based curation.
    ray_version: str = "2.49.0"
    ray_head_cpu: str = "4"
    ray_head_memory: str = "16Gi"
    ray_workers: int = 1
    ray_worker_cpu: str = "16"
    ray_worker_memory: str = "64Gi"
    ray_worker_gpus: int | None = None
    nemorun_home: str = "runs/nemorun"
    code_dir: str | None = "/opt/nrr"
    run_root: str | None = "/runs"


Profile = Union[LocalProfile, SlurmProfile, K8sProfile]
PROFILE_CLASSES: dict[str, type] = {"local": LocalProfile, "slurm": SlurmProfile, "k8s": K8sProfile}


def profile_path(name_or_path: str) -> Path:
    """`slurm` -> nemo_configs/executors/slurm.yaml; a path to a YAML file is taken as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = PROFILE_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown executor profile '{name_or_path}'; known profiles: {', '.join(known)}")
    return candidate


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> Profile:
    """Load a profile YAML plus `key=value` overrides; `kind` picks local / slurm / k8s."""
    path = profile_path(name_or_path)
    data, where = read_yaml(path)
    kind = data.get("kind")
    for text in overrides or []:
        if text.split("=", 1)[0].strip() == "kind":
            kind = text.split("=", 1)[1].strip()
    if kind not in PROFILE_CLASSES:
        raise ConfigError(
            f"{where.get('kind', path)}: 'kind' must be one of {', '.join(PROFILE_CLASSES)}, got {kind!r}"
        )
    return load_config(PROFILE_CLASSES[kind], path, overrides)


def nproc_per_node(profile: Profile) -> int:
    """Processes per node for torchrun stages."""
    if profile.nproc_per_node:
        return profile.nproc_per_node
    gpus = getattr(profile, "gpus_per_node", None)
    return gpus or 1


def num_nodes(profile: Profile) -> int:
    if isinstance(profile, SlurmProfile):
        return profile.nodes
    if isinstance(profile, K8sProfile):
        return profile.num_nodes
    return 1


def resolve_under(root: str | Path | None, path: str) -> str:
    """An absolute path stays; a relative one is joined to `root` (the repository when None)."""
    if Path(path).is_absolute():
        return path
    base = Path(root) if root else REPO_ROOT
    return str(base / path)


def code_path(profile: Profile, path: str) -> str:
    """Where a repository file (a stage config) is, seen from the job."""
    return resolve_under(profile.code_dir, path)


def repo_file(profile: Profile, path: str) -> Path:
    """A repository file named as the job sees it (`code_path`), as this checkout has it: the launching machine
    reads the same configs the job will."""
    p = Path(path)
    if p.is_absolute():
        if profile.code_dir and p.is_relative_to(profile.code_dir):
            return REPO_ROOT / p.relative_to(profile.code_dir)
        return p
    return p if p.exists() else REPO_ROOT / p


def run_path(profile: Profile, path: str) -> str:
    """Where a run output is, seen from the job (a shared filesystem on clusters)."""
    return resolve_under(profile.run_root, path)


def nemorun_home(profile: Profile) -> str:
    """NeMo-Run's experiment store, as seen from the machine that launches (never ~/.nemo_run)."""
    root = profile.run_root if isinstance(profile, LocalProfile) else None
    return resolve_under(root, profile.nemorun_home)


def to_dict(profile: Profile) -> dict:
    return dataclasses.asdict(profile)
