"""Kubernetes manifests for the pipeline: valid against the CRDs (strict) and core schemas, no secrets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from launchers import k8s
from launchers.pipeline import PipelineConfig, plan
from launchers.profiles import load_profile
from recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "hf_nrr_SENTINEL_k8s_0000"


@pytest.fixture(scope="module")
def manifests():
    profile = load_profile("k8s", ["num_nodes=4", "gpus_per_node=8"])
    cfg = load_config(PipelineConfig, ROOT / "nemo_configs/pipeline/cluster.yaml")
    return {t.name: m for t, m in zip(plan(cfg, profile), k8s.manifests_for(plan(cfg, profile), profile))}


def test_pipeline_manifests_validate(manifests):
    assert [m["kind"] for m in manifests.values()] == ["RayJob", "TrainJob", "TrainJob", "TrainJob", "TrainJob"]
    for name, manifest in manifests.items():
        assert k8s.validate(manifest) == [], name
    # a YAML round trip (what `--dryrun` prints) is still valid
    for manifest in yaml.safe_load_all(k8s.to_yaml(list(manifests.values()))):
        assert k8s.validate(manifest) == []


def test_trainjob_runs_torchrun_with_runtime_settings(manifests):
    sft = manifests["sft"]
    trainer = sft["spec"]["trainer"]
    assert sft["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and sft["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    # torchrun takes nnodes / node rank / master from the runtime's PET_* variables
    assert trainer["command"][:3] == ["torchrun", "-m", "launchers.entry"]
    assert "--rdzv-endpoint" not in trainer["command"]
    assert trainer["command"][trainer["command"].index("--") + 1] == "sft"
    assert "--requires" in trainer["command"] and "/runs/reasoning/curate" in trainer["command"]
    patch = sft["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "nrr-runs"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "runs", "mountPath": "/runs"}]}]
    # non-Megatron stages are one process on one node
    assert manifests["eval"]["spec"]["trainer"]["numNodes"] == 1
    assert manifests["eval"]["spec"]["trainer"]["command"][:3] == ["python", "-m", "launchers.entry"]


def test_rayjob_for_curation(manifests):
    job = manifests["curate"]
    assert job["apiVersion"] == "ray.io/v1"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["workerGroupSpecs"][0]["replicas"] == 2
    assert job["spec"]["entrypoint"].startswith("python -m launchers.entry --stage-dir /runs/reasoning/curate")
    for where, template in k8s.pod_templates(job):
        assert k8s.validate_core(k8s.as_pod(template, "p")) == [], where


def test_secrets_by_reference_only(manifests, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    text = k8s.to_yaml(list(manifests.values()))
    assert SENTINEL not in text
    env = {e["name"]: e for e in manifests["sft"]["spec"]["trainer"]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "nrr-secrets", "key": "HF_TOKEN", "optional": True}}}
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}


def test_validation_rejects_what_a_cluster_would(manifests):
    # NeMo-Run's own TrainJob body uses a field this Trainer version no longer has.
    old = copy.deepcopy(manifests["sft"])
    old["spec"]["podTemplateOverrides"] = old["spec"].pop("runtimePatches")
    assert any("podTemplateOverrides" in e for e in k8s.validate(old))
    bad = copy.deepcopy(manifests["sft"])
    bad["spec"]["trainer"]["numNodes"] = "four"
    assert any("numNodes" in e for e in k8s.validate(bad))
    unserved = copy.deepcopy(manifests["sft"])
    unserved["apiVersion"] = "trainer.kubeflow.org/v1"
    assert "no served CRD version" in k8s.validate(unserved)[0]
    pod = k8s.as_pod(k8s.pod_templates(manifests["curate"])[0][1], "p")
    pod["spec"]["containers"][0]["imagePullPolicy2"] = "Always"
    assert k8s.validate_core(pod) != []
    named = copy.deepcopy(manifests["sft"])
    named["metadata"]["name"] = "SFT_job"
    assert any("not a valid Kubernetes name" in e for e in k8s.validate(named))


def test_k8s_dryrun_cli(tmp_path, capsys, monkeypatch):
    from recipes.cli import main

    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path))
    rc = main(["launch", "sft", "--executor", "k8s", "--dryrun", f"executor.nemorun_home={tmp_path}",
               "executor.num_nodes=2"])
    out = capsys.readouterr().out
    assert rc == 0
    docs = list(yaml.safe_load_all(out[out.index("apiVersion"):]))
    assert docs[0]["kind"] == "TrainJob" and docs[0]["spec"]["trainer"]["numNodes"] == 2
    assert k8s.validate(docs[0]) == []
