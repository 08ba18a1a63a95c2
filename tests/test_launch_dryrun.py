"""Launch path without a cluster: Slurm sbatch rendering, pipeline wiring, the stage entry wrapper."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.entry import stage_state
from launchers.pipeline import PipelineConfig, plan
from launchers.profiles import load_profile
from recipes.cli import main
from recipes.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "sk-nrr-SENTINEL-do-not-leak-4242"


@pytest.fixture()
def nemorun_home(tmp_path, monkeypatch):
    home = tmp_path / "nemorun"
    monkeypatch.setenv("NEMORUN_HOME", str(home))  # restored after the test
    for name in ("NRR_TEACHER_API_KEY", "HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(name, SENTINEL)
    return home


def nrr(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`nrr` in a child process (NeMo-Run's Slurm tunnel wants a real stdin)."""
    return subprocess.run([sys.executable, "-m", "recipes.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_slurm_dryrun_4_nodes_8_gpus_sft(nemorun_home):
    proc = nrr("launch", "sft", "--executor", "slurm", "--dryrun", "executor.account=llm", "executor.nodes=4",
               "executor.gpus_per_node=8", f"executor.nemorun_home={nemorun_home}", "train.max_steps=50")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = out[out.index("#!/bin/bash"):]
    for line in ["#SBATCH --account=llm", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=batch", "#SBATCH --time=04:00:00",
                 "#SBATCH --exclusive"]:
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun ") and "torchrun" in line)
    # pyxis: image, mounts, secrets by NAME only
    assert "--container-image nvcr.io/example/nemo-reasoning-recipes:25.10" in srun
    assert "--container-mounts /lustre:/lustre," in srun
    assert "--container-env NRR_TEACHER_API_KEY,HF_TOKEN,WANDB_API_KEY,NGC_API_KEY" in srun
    # one torchrun per node, c10d rendezvous on the first node, 8 workers each
    assert "torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in srun
    assert "--nnodes 4 --nproc-per-node 8 --node-rank $SLURM_NODEID" in srun
    assert srun.endswith("-m launchers.entry --stage-dir /lustre/nrr/runs/launch/sft -- sft "
                         "--config /opt/nrr/nemo_configs/sft/tiny_cpu.yaml train.max_steps=50 "
                         "output_dir=/lustre/nrr/runs/launch/sft")  # outputs land in the stage's folder
    assert 'head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)' in script
    assert "export NCCL_DEBUG=WARN" in script
    assert SENTINEL not in out + proc.stderr
    # the dry run leaves no experiment behind
    assert not list(Path(nemorun_home).glob("experiments/*/*/"))


def test_local_dryrun_uses_torchrun_for_megatron_stages(nemorun_home, capsys):
    rc = main(["launch", "grpo", "--dryrun", "executor.nproc_per_node=2", f"executor.nemorun_home={nemorun_home}"])
    out = capsys.readouterr().out
    assert rc == 0
    cmd = out.splitlines()[out.splitlines().index("# ---- grpo (command) ----") + 1]
    assert cmd.startswith("torchrun ") and "--nproc-per-node 2" in cmd and "--nnodes 1" in cmd
    assert cmd.endswith(f"-- grpo --config {ROOT}/nemo_configs/grpo/tiny_cpu.yaml output_dir={ROOT}/runs/launch/grpo")
    rc = main(["launch", "eval", "--dryrun", f"executor.nemorun_home={nemorun_home}"])
    out = capsys.readouterr().out
    assert out.splitlines()[out.splitlines().index("# ---- eval (command) ----") + 1].startswith(
        "python -m launchers.entry")


def test_profile_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'nodes'"):
        load_profile("slurm", ["nodez=4"])
    with pytest.raises(ConfigError, match="expects an integer"):
        load_profile("slurm", ["nodes=four"])
    with pytest.raises(ConfigError, match="known profiles: k8s, local, slurm"):
        load_profile("nope")
    assert load_profile("slurm", ["nodes=4", "tunnel=ssh", "ssh_host=login"]).nodes == 4


def test_pipeline_wires_outputs_to_inputs():
    cfg = load_config(PipelineConfig, ROOT / "nemo_configs/pipeline/embedded.yaml", ["run_dir=/runs/x"])
    tasks = {t.name: t for t in plan(cfg, load_profile("local"))}
    assert list(tasks) == ["curate", "eval_base", "sft", "grpo", "export", "eval"]
    assert tasks["curate"].requires == [] and tasks["eval_base"].requires == []
    assert "output_dir=/runs/x/curate" in tasks["curate"].nrr_args
    # the base evaluation shares the cores with curation: one thread, idle threads asleep
    assert tasks["eval_base"].env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert tasks["sft"].requires == ["/runs/x/curate"] and tasks["sft"].env == {}
    from launchers.executors import build_executor
    local = load_profile("local")
    assert build_executor(tasks["eval_base"], local).env_vars["OMP_NUM_THREADS"] == "1"
    assert build_executor(tasks["sft"], local).env_vars["OMP_NUM_THREADS"] == "2"  # the profile's
    assert "data.train_path=/runs/x/curate/curated.jsonl" in tasks["sft"].nrr_args
    # then one stage at a time, each reading the one before
    assert tasks["grpo"].requires == ["/runs/x/sft"]
    assert "model.init_checkpoint=/runs/x/sft/checkpoints" in tasks["grpo"].nrr_args
    assert tasks["export"].requires == ["/runs/x/grpo"]
    # one evaluation of the SFT step's own HF export and of the export step's HF model
    assert tasks["eval"].requires == ["/runs/x/export", "/runs/x/sft"]
    assert "models={SFT: /runs/x/sft/hf, GRPO: /runs/x/export/hf}" in tasks["eval"].nrr_args
    # stages with subcommands take the subcommand first, then --config
    assert tasks["eval"].nrr_args[:4] == ["eval", "run", "--config", f"{ROOT}/nemo_configs/eval/embedded.yaml"]
    assert tasks["export"].nrr_args[:2] == ["convert", "to-hf"] and "--config" not in tasks["export"].nrr_args
    assert {t.spec.launcher for t in tasks.values()} == {"ray", "torchrun", "python"}


def test_pipeline_reference_errors():
    steps = [{"name": "a", "stage": "task"}, {"name": "b", "stage": "task", "overrides": ["x=${c.dir}"]}]
    cfg = load_config(PipelineConfig, None, [f"steps={json.dumps(steps)}"])
    with pytest.raises(ConfigError, match=r"steps\[1\] \(b\): depends on unknown step 'c'"):
        plan(cfg, load_profile("local"))
    steps[1]["overrides"] = ["x=${b.dir}"]
    cfg = load_config(PipelineConfig, None, [f"steps={json.dumps(steps)}"])
    with pytest.raises(ConfigError, match="must come earlier"):
        plan(cfg, load_profile("local"))


def _entry(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.entry", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_entry_records_state_and_gates_on_upstream(tmp_path):
    up, down = tmp_path / "up", tmp_path / "down"
    proc = _entry("--stage-dir", str(up), "--", "task", "--n", "1", "--output", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert stage_state(up) == "SUCCEEDED" and (tmp_path / "p.jsonl").read_text().count("\n") == 3

    proc = _entry("--stage-dir", str(up), "--", "task", "--split", "bogus")
    assert proc.returncode == 2 and "invalid choice: 'bogus'" in proc.stderr
    assert stage_state(up) == "FAILED"
    assert json.loads((up / ".nrr_stage" / "FAILED").read_text())["exit_code"] == 2

    proc = _entry("--stage-dir", str(down), "--requires", str(up), "--", "task", "--n", "1")
    assert proc.returncode == 3 and f"upstream stage output {up} is FAILED" in proc.stderr
    assert stage_state(down) == "FAILED"


def test_entry_serves_an_endpoint_and_stops_it(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _entry("--stage-dir", str(tmp_path), "--serve-cmd",
                  f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1", "--serve-port", str(port),
                  "--serve-ready-path", "/", "--serve-timeout", "30", "--",
                  "task", "--split", "${endpoint}")
    # The stage saw the live URL (task rejects it as a split name) and the server is gone after.
    assert proc.returncode == 2
    assert f"invalid choice: 'http://127.0.0.1:{port}/v1'" in proc.stderr
    info = json.loads((tmp_path / ".nrr_stage" / "FAILED").read_text())
    assert info["argv"] == ["task", "--split", f"http://127.0.0.1:{port}/v1"]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_local_pipeline_stops_after_a_failed_stage(tmp_path, monkeypatch):
    """Two wired stages on the LocalExecutor: the first fails, the second must not run."""
    home = tmp_path / "nemorun"
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    steps = [
        {"name": "first", "stage": "task", "overrides": ["--split", "bogus"]},
        {"name": "second", "stage": "task", "after": ["first"],
         "overrides": ["--n", "1", "--output", "${dir}/problems.jsonl"]},
    ]
    cfg_path = tmp_path / "pipe.yaml"
    cfg_path.write_text(json.dumps({"name": "failing", "run_dir": str(tmp_path / "run"), "steps": steps}))
    proc = nrr("pipeline", "--config", str(cfg_path), f"executor.nemorun_home={home}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_state(tmp_path / "run" / "first") == "FAILED"
    assert stage_state(tmp_path / "run" / "second") == "FAILED"
    assert not (tmp_path / "run" / "second" / "problems.jsonl").exists()
    assert "invalid choice: 'bogus'" in proc.stdout  # the failed stage's log tail reaches the user


def test_pipeline_report_tables_levels_and_links_step_reports(tmp_path):
    from launchers.pipeline import write_pipeline_report

    run = tmp_path / "run"
    by_level = {"base": {"1": 0.0, "2": 0.0}, "sft": {"1": 0.9, "2": 0.5}}
    for step, levels in by_level.items():
        (run / f"eval_{step}").mkdir(parents=True)
        bench = {"pass@1": sum(levels.values()) / 2, "by_level": {k: {"pass@1": v} for k, v in levels.items()}}
        (run / f"eval_{step}" / "summary.json").write_text(json.dumps({"benchmarks": {"embedded": bench}}))
    (run / "eval_sft" / "report.html").write_text("<html></html>")
    (run / "grpo" / "report").mkdir(parents=True)
    (run / "grpo" / "report" / "reward_curve.png").write_bytes(b"png")
    steps = [{"name": n, "stage": st} for n, st in [("grpo", "grpo"), ("eval_base", "eval"), ("eval_sft", "eval")]]
    cfg = load_config(PipelineConfig, None, ["name=t", f"run_dir={run}", f"steps={json.dumps(steps)}",
                                             "summary.key=benchmarks.embedded.pass@1",
                                             "summary.rows={base: '${eval_base.dir}/summary.json', "
                                             "SFT: '${eval_sft.dir}/summary.json', GRPO: '${grpo.dir}/none.json'}"])
    text = write_pipeline_report(cfg, load_profile("local", []), str(run / "report.md"))
    assert (run / "report.md").read_text() == text
    lines = text.splitlines()
    assert "| model | all | L1 | L2 | from |" in lines
    assert f"| SFT | 70.0% | 90.0% | 50.0% | `{run}/eval_sft/summary.json` |" in lines
    assert f"| GRPO | - | - | - | `{run}/grpo/none.json` |" in lines  # a step that wrote nothing reads as missing
    assert "- **grpo** (grpo): ![grpo/report/reward_curve.png](grpo/report/reward_curve.png)" in lines
    assert "- **eval_sft** (eval): [eval_sft/report.html](eval_sft/report.html)" in lines
    assert not any(line.startswith("- **eval_base**") for line in lines)  # no report there, no link
