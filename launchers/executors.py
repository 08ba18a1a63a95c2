"""Turn a profile and a stage into a NeMo-Run executor and task.

Every task runs `python -m launchers.entry [--stage-dir D --requires U ...] -- <stage> --config X ...`
(see launchers/entry.py); the executor decides how many processes and where:
- local: LocalExecutor, torchrun with `nproc_per_node` for Megatron stages;
- slurm: SlurmExecutor (pyxis image and mounts, torchrun rendezvous across nodes, a Ray cluster
  over the allocation for Curator);
- k8s: KubeflowExecutor (Trainer v2 TrainJob; the runtime hands torchrun its PET_* settings);
  Curator's RayJob is built in launchers/k8s.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launchers.profiles import (
    K8sProfile,
    LocalProfile,
    Profile,
    SlurmProfile,
    nemorun_home,
    nproc_per_node,
    resolve_under,
)
from recipes.stages import Stage


@dataclass
class StageTask:
    """One stage as the pipeline sees it: the `nrr` arguments plus the pipeline glue."""

    name: str  # task name in the experiment (unique), e.g. "sft" or "eval_base"
    spec: Stage
    nrr_args: list[str]  # [stage, --config, X, overrides...]
    stage_dir: str | None = None
    requires: list[str] = field(default_factory=list)  # upstream stage dirs
    serve_cmd: str | None = None
    serve_port: int = 8000
    serve_ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)  # this stage's variables, over the profile's
    origin: str | None = None  # where the stage was asked for (a pipeline step's file:line), for error messages

    def entry_args(self) -> list[str]:
        args: list[str] = []
        if self.stage_dir:
            args += ["--stage-dir", self.stage_dir]
        for upstream in self.requires:
            args += ["--requires", upstream]
        if self.serve_cmd:
            args += ["--serve-cmd", self.serve_cmd, "--serve-port", str(self.serve_port),
                     "--serve-ready-path", self.serve_ready_path]
        return args + ["--", *self.nrr_args]


def _venv_path_env() -> dict[str, str]:
    """Local jobs run `python`/`torchrun` from PATH: put this interpreter's bin first."""
    import sys

    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] == bin_dir:
        return {}
    return {"PATH": bin_dir + os.pathsep + path}


def build_script(task: StageTask, profile: Profile):
    import nemo_run as run

    # On Kubernetes the Trainer runtime sets PET_NNODES/PET_NPROC_PER_NODE/PET_MASTER_ADDR/
    # PET_NODE_RANK, which torchrun reads itself: no rendezvous flags in the manifest.
    if isinstance(profile, K8sProfile) and task.spec.launcher == "torchrun":
        return run.Script(path="-m", args=["launchers.entry", *task.entry_args()], entrypoint="torchrun")
    if isinstance(profile, LocalProfile) and task.spec.launcher == "torchrun":
        # NeMo-Run's torchrun launcher shell-quotes every argument, for a shell local jobs never go through
        # (they start from an argv): an override with a space (rewards.weights={a: 1, b: 1}) would reach the
        # stage wrapped in quotes. torchrun as the entrypoint itself passes the arguments as they are.
        return run.Script(path="--standalone", entrypoint="torchrun", args=[
            "--nnodes", "1", "--nproc-per-node", str(nproc_per_node(profile)), "--tee", "3",
            "-m", "launchers.entry", *task.entry_args()])
    return run.Script(path="launchers.entry", m=True, entrypoint="python", args=task.entry_args())


def with_task_env(task: StageTask, profile: Profile) -> Profile:
    """`profile` with the stage's own variables added to (and overriding) the profile's."""
    import dataclasses

    return dataclasses.replace(profile, env={**profile.env, **task.env}) if task.env else profile


def build_executor(task: StageTask, profile: Profile):
    """The NeMo-Run executor for one stage under `profile`."""
    import nemo_run as run

    profile = with_task_env(task, profile)

    torchrun = task.spec.launcher == "torchrun"
    if isinstance(profile, LocalProfile):
        env = {**profile.env, **_venv_path_env()}
        if torchrun and nproc_per_node(profile) > 1:  # ranks share this machine's cores: idle threads sleep
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return run.LocalExecutor(ntasks_per_node=1, env_vars=env)  # torchrun, if any, is the script's entrypoint
    if isinstance(profile, SlurmProfile):
        return _slurm_executor(task, profile)
    if isinstance(profile, K8sProfile):
        return kubeflow_executor(task, profile)
    raise TypeError(f"unsupported profile {type(profile).__name__}")


def slurm_seconds(time: str) -> int:
    """Seconds of a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, rest = time.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
        h, m, s = parts
    else:
        h, m, s = ([0] + parts if len(parts) == 2 else [0, parts[0], 0] if len(parts) == 1 else parts)
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _slurm_executor(task: StageTask, profile: SlurmProfile):
    import nemo_run as run
    from nemo_run.core.execution.launcher import SlurmRay

    torchrun = task.spec.launcher == "torchrun"
    ray = task.spec.launcher == "ray"
    if profile.tunnel == "ssh":
        job_dir = resolve_under(profile.run_root, profile.job_dir)
        if not profile.ssh_host:
            from recipes.config import ConfigError

            raise ConfigError("executor profile: tunnel=ssh needs 'ssh_host' (and usually 'ssh_user')")
        tunnel = run.SSHTunnel(host=profile.ssh_host, user=profile.ssh_user or os.environ.get("USER", ""),
                               job_dir=job_dir, identity=profile.ssh_identity)
    else:
        # sbatch reads the scripts NeMo-Run writes into its experiment store: same directory.
        tunnel = run.LocalTunnel(job_dir=os.path.join(nemorun_home(profile), "experiments"))
    env = dict(profile.env)
    if profile.container_image is None and profile.tunnel == "local":
        env.update(_venv_path_env())
    if ray:
        # SlurmRay's script needs the head address; Curator then joins that cluster.
        env.update({"HEAD_NODE_ADDR": "$head_node_ip", "RAY_ADDRESS": "auto"})
    # SIGTERM before the time limit, to every process of the job step (no "B:": the batch shell waits on srun in
    # the foreground and would pass nothing on): torchrun forwards it and gives the ranks the grace before
    # SIGKILL (its default is 30 s), launchers.entry forwards it, the ranks save and exit with 75. SIGTERM rather
    # than SIGUSR1: preemption sends SIGTERM anyway, and every layer already passes it on.
    grace = profile.signal_grace_s
    if grace and profile.time and grace >= slurm_seconds(profile.time):
        from recipes.config import ConfigError

        raise ConfigError(f"executor profile: signal_grace_s={grace} is not below time={profile.time}: Slurm would "
                          "signal the job as it starts (lower signal_grace_s, or null for no signal)")
    if grace:
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace))
    executor = run.SlurmExecutor(
        account=profile.account,
        partition=profile.partition,
        job_name_prefix="nrr-",
        nodes=profile.nodes if (torchrun or ray) else 1,
        ntasks_per_node=1,
        gpus_per_node=profile.gpus_per_node,
        cpus_per_task=profile.cpus_per_task,
        mem=profile.mem,
        time=profile.time,
        qos=profile.qos,
        exclusive=profile.exclusive,
        gres=profile.gres,
        container_image=profile.container_image,
        container_mounts=list(profile.container_mounts),
        # pyxis copies these variables from the submitting environment by NAME only.
        container_env=list(profile.secret_env) if profile.container_image else None,
        env_vars=env,
        setup_lines="\n".join(profile.setup_lines) or None,
        srun_args=list(profile.srun_args) or None,
        tunnel=tunnel,
        # The code is in the image (or on the shared filesystem): nothing to package.
        packager=run.Packager(),
        torchrun_nproc_per_node=nproc_per_node(profile) if torchrun else None,
        signal=f"TERM@{grace}" if grace else None,
        additional_parameters={"requeue": True} if profile.requeue else None,
        # NeMo-Run's sbatch script runs `scontrol requeue` after a non-zero exit while retries are left: a job
        # stopped before its time limit (exit 75 from the ranks; torchrun reports 1) continues in a new
        # allocation; so does a job that failed for any other reason, hence none by default
        retries=profile.max_requeues if profile.requeue else 0,
    )
    if torchrun:
        executor.launcher = "torchrun"
    elif ray:
        executor.launcher = SlurmRay()
    return executor


OFFLINE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://kubernetes.invalid:6443"}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
current-context: offline
users: [{name: offline, user: {}}]
"""


@contextlib.contextmanager
def offline_kubeconfig(enabled: bool) -> Iterator[None]:
    """NeMo-Run's Kubernetes classes load a kubeconfig when built; a dry run needs no cluster."""
    if not enabled:
        yield
        return
    from kubernetes.config import kube_config

    # The client reads $KUBECONFIG once, at import: point its default at the offline file.
    old_env, old_default = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config"
        path.write_text(OFFLINE_KUBECONFIG, encoding="utf-8")
        os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
        try:
            yield
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
            if old_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old_env


def k8s_env(profile: K8sProfile) -> list[dict]:
    """Plain variables by value, secrets as secretKeyRef (the value never enters a manifest)."""
    env = [{"name": k, "value": str(v)} for k, v in profile.env.items()]
    env += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": profile.secret_name, "key": name, "optional": True}}}
        for name in profile.secret_env
    ]
    return env


def k8s_volumes(profile: K8sProfile) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": v.name, "persistentVolumeClaim": {"claimName": v.claim}} for v in profile.volumes]
    mounts = [{"name": v.name, "mountPath": v.mount_path} for v in profile.volumes]
    return volumes, mounts


def kubeflow_executor(task: StageTask, profile: K8sProfile):
    from nemo_run.core.execution.kubeflow import KubeflowExecutor

    torchrun = task.spec.launcher == "torchrun"
    volumes, mounts = k8s_volumes(profile)
    return KubeflowExecutor(
        namespace=profile.namespace,
        image=profile.image,
        runtime_ref=profile.runtime_ref,
        num_nodes=profile.num_nodes if torchrun else 1,
        nprocs_per_node=nproc_per_node(profile) if torchrun else 1,
        gpus_per_node=profile.gpus_per_node,
        cpu_requests=profile.cpu_requests,
        memory_requests=profile.memory_requests,
        cpu_limits=profile.cpu_limits,
        memory_limits=profile.memory_limits,
        volumes=volumes,
        volume_mounts=mounts,
        env_list=k8s_env(profile),
        image_pull_secrets=list(profile.image_pull_secrets),
        train_job_basename=task.name,
        labels={"app.kubernetes.io/part-of": "nemo-reasoning-recipes", "nrr/stage": task.spec.name},
    )
