"""Kubernetes manifests for the pipeline: valid against the CRDs (strict) and core schemas, no secrets."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from launchers import k8s
from launchers.pipeline import PipelineConfig, plan
from launchers.profiles import load_profile
from recipes.config import load_config
from recipes.named_recipes import RECIPES

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


def test_secrets_by_reference_only(monkeypatch):
    # the secrets are in the environment while the manifests are built: a value copied from it would show
    for name in ("HF_TOKEN", "WANDB_API_KEY", "NRR_TEACHER_API_KEY"):
        monkeypatch.setenv(name, SENTINEL)
    profile = load_profile("k8s", ["num_nodes=4", "gpus_per_node=8"])
    cfg = load_config(PipelineConfig, ROOT / "nemo_configs/pipeline/cluster.yaml")
    tasks = plan(cfg, profile)
    manifests = {t.name: m for t, m in zip(tasks, k8s.manifests_for(tasks, profile))}
    text = k8s.to_yaml(list(manifests.values()))
    assert SENTINEL not in text and "HF_TOKEN" in text
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
    # 2 nodes x 8 GPUs = 16 ranks: TP=2 PP=2 DP=4 of the tiny model
    rc = main(["launch", "sft", "--executor", "k8s", "--dryrun", f"executor.nemorun_home={tmp_path}",
               "executor.num_nodes=2", "parallel.nodes=2", "parallel.tp=2", "parallel.pp=2", "parallel.dp=4",
               "training.micro_batch_size=4"])
    out = capsys.readouterr().out
    assert rc == 0
    docs = list(yaml.safe_load_all(out[out.index("apiVersion"):]))
    assert docs[0]["kind"] == "TrainJob" and docs[0]["spec"]["trainer"]["numNodes"] == 2
    assert k8s.validate(docs[0]) == []
    # the manifest's header comment: the layout's per-GPU memory plan
    header = out[:out.index("apiVersion")]
    assert "# per-GPU memory plan" in header and "TP2 PP2 CP1 DP4 mbs4" in header


@pytest.mark.parametrize("config, overrides", [
    ("cluster.yaml", []),
    # the CPU demo's stages are one process each: one process per node instead of one per GPU
    ("embedded.yaml", ["executor.nproc_per_node=1"]),
])
def test_pipeline_dryrun_cli(config, overrides, tmp_path, capsys, monkeypatch):
    """Every step checked (config, layout, model shape), rendered, and its manifest valid against the CRDs."""
    from recipes.cli import main

    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path))
    rc = main(["pipeline", "--config", f"nemo_configs/pipeline/{config}", "--executor", "k8s", "--dryrun",
               f"executor.nemorun_home={tmp_path}", *overrides])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    docs = [d for d in yaml.safe_load_all(captured.out) if d]
    assert docs and all(k8s.validate(d) == [] for d in docs)
    assert {d["kind"] for d in docs} == {"RayJob", "TrainJob"}
    for name in ("sft", "grpo"):
        section = captured.out[captured.out.index(f"# ---- {name} (manifest)"):]
        assert section.splitlines()[1] == "# per-GPU memory plan (recipes.planner):", name


def test_pipeline_dryrun_refuses_a_bad_step(tmp_path, capsys):
    """A step's unknown key is named with the step's place in the pipeline file; nothing is written."""
    from recipes.cli import main

    bad = tmp_path / "bad.yaml"
    text = (ROOT / "nemo_configs/pipeline/cluster.yaml").read_text()
    bad.write_text(text.replace('"model.init_checkpoint=${sft.dir}/checkpoints"', '"init_checkpoint=${sft.dir}/x"'))
    home = tmp_path / "nemorun"
    rc = main(["pipeline", "--config", str(bad), "--executor", "k8s", "--dryrun", f"executor.nemorun_home={home}"])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "overrides: [\"model.hf_config=" in s)
    assert f"stage 'grpo' ({bad}:{line}, steps[2]):" in err
    assert "unknown key 'init_checkpoint'" in err and "[from override 'init_checkpoint=/runs/reasoning/sft/x']" in err
    assert not home.exists()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_named_recipe_dry_runs_on_slurm_and_kubernetes(name, tmp_path, capsys, monkeypatch):
    """Each named H100 recipe renders a validated sbatch script and TrainJob on the nodes it is named for, with
    the planner's table for its layout in the header; one node fewer is refused before anything is rendered."""
    from recipes.cli import main
    from recipes.named_recipes import STAGE_OF, yaml_path
    from recipes.planner import plan_table

    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path))
    # NeMo-Run packages the Slurm job through invoke, which forwards stdin: give it an empty one, not pytest's
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    cfg = RECIPES[name]()
    from recipes.trainer import world_size

    stage, nodes = STAGE_OF[name.rsplit("-", 1)[1]], cfg.parallel.nodes
    gpus = world_size(cfg) // nodes  # 8, or 1 for the one-GPU LoRA recipes
    row = plan_table(cfg).splitlines()[2]  # the layout's row of the plan
    common = ["launch", stage, "--config", str(yaml_path(name)), "--dryrun", f"executor.nemorun_home={tmp_path}"]
    assert main([*common, "--executor", "k8s", f"executor.num_nodes={nodes}", f"executor.gpus_per_node={gpus}"]) == 0
    out = capsys.readouterr().out
    docs = list(yaml.safe_load_all(out[out.index("apiVersion"):]))
    assert docs[0]["kind"] == "TrainJob" and docs[0]["spec"]["trainer"]["numNodes"] == nodes
    assert k8s.validate(docs[0]) == [] and row in out[:out.index("apiVersion")]
    slurm = [*common, "--executor", "slurm", "executor.account=llm", f"executor.gpus_per_node={gpus}"]
    assert main([*slurm, f"executor.nodes={nodes}"]) == 0
    out = capsys.readouterr().out
    script = out[out.index("#!/bin/bash"):]
    assert f"#SBATCH --nodes={nodes}" in script and row in script[:script.index("#SBATCH")]
    assert main([*slurm, f"executor.nodes={nodes - 1}"]) == 2
    assert "parallel.nodes" in capsys.readouterr().err
