"""Kubernetes manifests for stages, and their offline validation.

Training-style stages become Kubeflow Trainer v2 `TrainJob`s (NeMo-Run's KubeflowExecutor builds
them); Ray-based curation becomes a KubeRay `RayJob` (NeMo-Run's KubeRayJob builds it). No API
server runs here, so manifests are checked offline: custom kinds against their CRD's OpenAPI v3
schema (unknown fields rejected, as a strict API server would), the pod templates inside them as
core `Pod`s with kubernetes-validate in strict mode.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from launchers.executors import StageTask, k8s_env, k8s_volumes, offline_kubeconfig, with_task_env
from launchers.profiles import REPO_ROOT, K8sProfile

CRD_DIR_ENV = "NRR_K8S_CRDS"
KUBERNETES_VERSION = "1.33.0"
PATCH_MANAGER = "nemo-reasoning-recipes"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def crd_dir() -> Path:
    """The CRD schemas shipped in `launchers/k8s_crds/` (provenance and checksums there), or $NRR_K8S_CRDS."""
    return Path(os.environ.get(CRD_DIR_ENV) or REPO_ROOT / "launchers" / "k8s_crds")


# --------------------------------------------------------------------------------------------
# Manifests


def trainjob_manifest(task: StageTask, profile: K8sProfile, executor=None) -> dict[str, Any]:
    """The TrainJob for a stage. The container runs `torchrun -m launchers.entry ...` (or python)."""
    from launchers.executors import build_script, kubeflow_executor

    with offline_kubeconfig(executor is None):
        executor = executor or kubeflow_executor(task, profile)
    script = build_script(task, profile)
    command = script.to_command(with_entrypoint=True)
    body = executor.get_job_body(executor._trainjob_name(task.name), command)
    return to_runtime_patches(body)


def to_runtime_patches(body: dict[str, Any]) -> dict[str, Any]:
    """Trainer v2 dropped `podTemplateOverrides`; the same pod settings go in `runtimePatches`.

    An API server prunes fields its CRD does not know, so volumes left in the old field would
    silently vanish from the pods.
    """
    body = copy.deepcopy(body)
    overrides = body["spec"].pop("podTemplateOverrides", None)
    if not overrides:
        return body
    jobs = []
    for override in overrides:
        pod: dict[str, Any] = {}
        if "metadata" in override:
            pod["metadata"] = override["metadata"]
        if "spec" in override:
            pod["spec"] = override["spec"]
        for target in override.get("targetJobs", []):
            jobs.append({"name": target["name"], "template": {"spec": {"template": pod}}})
    body["spec"]["runtimePatches"] = [
        {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": jobs}}}}
    ]
    return body


def rayjob_manifest(task: StageTask, profile: K8sProfile) -> dict[str, Any]:
    """A RayJob: a RayCluster (head + workers, our image) that runs the stage as its entrypoint."""
    from nemo_run.core.execution.kuberay import KubeRayExecutor, KubeRayWorkerGroup
    from nemo_run.run.ray.kuberay import KubeRayJob

    volumes, mounts = k8s_volumes(profile)
    workers = [
        KubeRayWorkerGroup(
            group_name="workers",
            replicas=profile.ray_workers,
            gpus_per_worker=profile.ray_worker_gpus,
            cpu_requests=profile.ray_worker_cpu,
            memory_requests=profile.ray_worker_memory,
            cpu_limits=profile.ray_worker_cpu,
            memory_limits=profile.ray_worker_memory,
        )
    ] if profile.ray_workers > 0 else []
    executor = KubeRayExecutor(
        namespace=profile.namespace,
        ray_version=profile.ray_version,
        image=profile.image,
        head_cpu=profile.ray_head_cpu,
        head_memory=profile.ray_head_memory,
        worker_groups=workers,
        labels={"app.kubernetes.io/part-of": PATCH_MANAGER, "nrr/stage": task.spec.name},
        volumes=volumes,
        volume_mounts=mounts,
    )
    # Secrets as secretKeyRef: KubeRay's builder only knows name/value pairs, so they ride along
    # in container_kwargs; plain variables go the same way to keep one list.
    executor.container_kwargs = {"env": k8s_env(profile)}
    if profile.image_pull_secrets:
        executor.spec_kwargs = {"imagePullSecrets": [{"name": s} for s in profile.image_pull_secrets]}
    command = shlex.join(["python", "-m", "launchers.entry", *task.entry_args()])
    with offline_kubeconfig(True), contextlib.redirect_stdout(io.StringIO()):
        job = KubeRayJob(name=_k8s_name(task.name), executor=executor)
        body = job.start(command=command, dryrun=True)
    body = json.loads(json.dumps(body))  # unshare the env lists (no YAML anchors in the output)
    if body["spec"].get("runtimeEnvYAML") is None:
        body["spec"].pop("runtimeEnvYAML", None)
    cluster = body["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        for container in group["template"]["spec"]["containers"]:
            container["workingDir"] = profile.code_dir or "/workspace"
    return body


def _k8s_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "job"


def manifests_for(tasks: list[StageTask], profile: K8sProfile) -> list[dict[str, Any]]:
    return [rayjob_manifest(t, with_task_env(t, profile)) if t.spec.launcher == "ray"
            else trainjob_manifest(t, with_task_env(t, profile)) for t in tasks]


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)


# --------------------------------------------------------------------------------------------
# Validation


@lru_cache(maxsize=None)
def _crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every CRD version that is served."""
    root = crd_dir()
    if not root.exists():
        raise FileNotFoundError(f"CRD schemas not found at {root} (set {CRD_DIR_ENV})")
    out = {}
    for path in sorted(root.glob("*/*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def _strict(schema: Any) -> Any:
    """Reject unknown fields: every object with `properties` gets additionalProperties: false."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate_custom(manifest: dict[str, Any]) -> list[str]:
    """Errors of a custom resource against its CRD (empty list: valid)."""
    import jsonschema

    key = (manifest.get("apiVersion", ""), manifest.get("kind", ""))
    schemas = _crds()
    if key not in schemas:
        served = sorted(f"{k} {v}" for v, k in schemas)
        return [f"no served CRD version for {key[1]} {key[0]}; served: {', '.join(served)}"]
    errors = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(_strict(schemas[key])).iter_errors(manifest)]
    name = manifest.get("metadata", {}).get("name", "")
    if not _NAME_RE.match(name) or len(name) > 63:
        errors.append(f"metadata.name: {name!r} is not a valid Kubernetes name (RFC 1123, <= 63 chars)")
    return errors


def validate_core(manifest: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Errors of a core-kind manifest (Pod, Job, ...) with kubernetes-validate --strict."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        return [f"{manifest.get('kind')} {path or '<root>'}: {err.message}"]
    return []


def pod_templates(manifest: dict[str, Any]) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod a custom resource will create."""
    spec = manifest.get("spec", {})
    out = []
    if manifest.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec", {})
    if manifest.get("kind") in ("RayJob", "RayCluster"):
        out.append(("headGroupSpec", spec["headGroupSpec"]["template"]))
        out += [(f"workerGroupSpecs[{i}]", g["template"]) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    return out


def as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


def validate(manifest: dict[str, Any]) -> list[str]:
    """All errors of one manifest: core kinds directly, custom kinds by CRD plus their pods."""
    if "/" not in manifest.get("apiVersion", "v1") or manifest["apiVersion"].startswith("apps/") \
            or manifest["apiVersion"].startswith("batch/"):
        return validate_core(manifest)
    errors = validate_custom(manifest)
    for where, template in pod_templates(manifest):
        errors += [f"{where}: {e}" for e in validate_core(as_pod(template, "pod"))]
    return errors
