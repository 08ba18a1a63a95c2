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
from recipes.config import ConfigError, load_config, read_yaml

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


TINY_32_RANKS = ["parallel.nodes=4", "parallel.tp=2", "parallel.pp=2", "parallel.dp=8", "training.micro_batch_size=2"]


def test_slurm_dryrun_4_nodes_8_gpus_sft(nemorun_home):
    proc = nrr("launch", "sft", "--executor", "slurm", "--dryrun", "executor.account=llm", "executor.nodes=4",
               "executor.gpus_per_node=8", f"executor.nemorun_home={nemorun_home}", "executor.max_requeues=3",
               *TINY_32_RANKS, "training.max_steps=50")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = out[out.index("#!/bin/bash"):]
    for line in ["#SBATCH --account=llm", "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=batch", "#SBATCH --time=04:00:00",
                 "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=TERM@300"]:
        assert line in script, line
    # torchrun grants the ranks the grace to save; a non-zero exit (a save on SIGTERM) requeues the job
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in script and "export TORCHX_MAX_RETRIES=3" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # a signal no earlier than the job's start is refused before anything is written
    short = nrr("launch", "sft", "--executor", "slurm", "--dryrun", "executor.account=llm", "executor.nodes=4",
                "executor.gpus_per_node=8", "executor.time=00:05:00", f"executor.nemorun_home={nemorun_home}",
                *TINY_32_RANKS)
    assert short.returncode == 2 and "signal_grace_s=300 is not below time=00:05:00" in short.stderr, short.stderr
    srun = next(line for line in script.splitlines() if line.startswith("srun ") and "torchrun" in line)
    # pyxis: image, mounts, secrets by NAME only
    assert "--container-image nvcr.io/example/nemo-reasoning-recipes:25.10" in srun
    assert "--container-mounts /lustre:/lustre," in srun
    assert "--container-env NRR_TEACHER_API_KEY,HF_TOKEN,WANDB_API_KEY,NGC_API_KEY" in srun
    # one torchrun per node, c10d rendezvous on the first node, 8 workers each
    assert "torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500" in srun
    assert "--nnodes 4 --nproc-per-node 8 --node-rank $SLURM_NODEID" in srun
    assert srun.endswith("-m launchers.entry --stage-dir /lustre/nrr/runs/launch/sft -- sft "
                         f"--config /opt/nrr/nemo_configs/sft/tiny_cpu.yaml {' '.join(TINY_32_RANKS)} "
                         "training.max_steps=50 output_dir=/lustre/nrr/runs/launch/sft")  # outputs in the stage's folder
    assert 'head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)' in script
    assert "export NCCL_DEBUG=WARN" in script
    # the memory plan heads the script, before the #SBATCH lines sbatch must still read
    header = script[:script.index("#SBATCH")]
    assert "# per-GPU memory plan" in header and "TP2 PP2 CP1 DP8 mbs2" in header
    assert SENTINEL not in out + proc.stderr
    # the dry run leaves no experiment behind
    assert not list(Path(nemorun_home).glob("experiments/*/*/"))


def launch_error(capsys, *args: str) -> str:
    """`nrr launch ...` in this process; its config error (exit code 2)."""
    rc = main(["launch", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "the launch was not submitted" in err
    return err


def test_dryrun_refuses_a_bad_stage_config_before_writing_anything(tmp_path, capsys):
    home = tmp_path / "nemorun"
    err = launch_error(capsys, "sft", "--executor", "slurm", "--dryrun", f"executor.nemorun_home={home}",
                       "training.max_stepz=50")
    assert "unknown key 'training.max_stepz' (did you mean 'training.max_steps'?)" in err
    assert "override 'training.max_stepz=50'" in err
    err = launch_error(capsys, "sft", "--dryrun", f"executor.nemorun_home={home}", "train.max_steps=50")
    assert "unknown key 'train' (did you mean 'training'?)" in err and "[from override 'train.max_steps=50']" in err
    # a key inside the YAML is named with its file and line
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "nemo_configs/sft/tiny_cpu.yaml").read_text().replace("  seq_length: 192",
                                                                                 "  seq_lenght: 192"))
    err = launch_error(capsys, "sft", "--config", str(bad), "--dryrun", f"executor.nemorun_home={home}")
    line = bad.read_text().splitlines().index("  seq_lenght: 192") + 1
    assert f"{bad}:{line}: unknown key 'data.seq_lenght'" in err
    # a stage's own arguments go through its own parser
    err = launch_error(capsys, "task", "--dryrun", f"executor.nemorun_home={home}", "--", "--split", "bogus")
    assert "nrr task: argument --split: invalid choice: 'bogus'" in err
    # `nrr distill` is the GRPO loop with a teacher, and is checked as such before anything is submitted
    err = launch_error(capsys, "distill", "--dryrun", f"executor.nemorun_home={home}", "distill.teacher=null")
    assert "nrr distill needs a teacher" in err
    err = launch_error(capsys, "distill", "--dryrun", f"executor.nemorun_home={home}", "distill.kl_coef=1.5",
                       "distill.mode=kdrl")
    assert "distill.kl_coef=1.5: the KL weight schedule must stay in [0, 1]" in err
    assert not home.exists()  # nothing was written: not even NeMo-Run's store


def test_layout_must_match_the_profile_and_split_the_model(tmp_path, capsys):
    home = f"executor.nemorun_home={tmp_path / 'nemorun'}"
    # the README's 7B example as it was: the recipe wants 2 nodes, the profile gives 1
    err = launch_error(capsys, "sft", "--config", "nemo_configs/sft/qwen2.5-7b_h100.yaml", "--executor", "slurm",
                       "--dryrun", home)
    recipe = ROOT / "nemo_configs/sft/qwen2.5-7b_h100.yaml"
    where = read_yaml(recipe)[1]
    assert f"parallel.nodes=2 ({where['parallel.nodes']}) but the slurm profile starts 1 node(s)" in err
    err = launch_error(capsys, "sft", "--config", "nemo_configs/sft/qwen2.5-7b_h100.yaml", "--executor", "slurm",
                       "--dryrun", home, "executor.nodes=2", "executor.gpus_per_node=4")
    from recipes.trainer import SFTConfig, world_size

    p = load_config(SFTConfig, recipe).parallel
    assert f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {world_size(SFTConfig(parallel=p))} ranks" in err
    assert "2 node(s) x 4 process(es) = 8" in err
    assert f"parallel.dp at {where['parallel.dp']}" in err
    err = launch_error(capsys, "sft", "--config", "nemo_configs/sft/qwen2.5-7b_h100.yaml", "--executor", "slurm",
                       "--dryrun", home, "executor.nodes=2", "parallel.tp=8", "parallel.pp=1", "parallel.cp=1",
                       "parallel.dp=2")
    assert "parallel.tp=8 does not divide the model's num_attention_heads=28" in err
    assert "recipes/assets/models/qwen2.5-7b/config.json:8" in err
    err = launch_error(capsys, "sft", "--dryrun", home, "executor.nproc_per_node=2", "parallel.pp=3", "parallel.dp=1")
    assert "tp*pp*cp*dp = 1*3*1*1 = 3 ranks" in err
    err = launch_error(capsys, "sft", "--dryrun", home, "parallel.pp=3")
    assert "1 node(s) x 1 process(es) = 1" in err


def pipeline_dryruns(tmp_path, runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Several `nrr pipeline ... --dryrun` in one child process (one NeMo-Run import), stdin closed."""
    code = ("import contextlib, io, json, sys\nfrom recipes.cli import main\nout = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    o, e = io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):\n"
            "        rc = main(argv)\n"
            "    out.append([rc, o.getvalue(), e.getvalue()])\n"
            "print('\\x00' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, rc, o, e)
            for argv, (rc, o, e) in zip(runs, json.loads(proc.stdout.split("\x00")[-1]))]


def sections(out: str) -> dict[str, str]:
    """`# ---- name (kind) ----` sections of a dry run's output."""
    found: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("# ---- "):
            name = line.split()[2]
            found[name] = ""
        elif name:
            found[name] += line + "\n"
    return found


@pytest.mark.slow
def test_pipelines_dryrun_on_slurm(tmp_path):
    home = f"executor.nemorun_home={tmp_path / 'nemorun'}"
    cluster, embedded = pipeline_dryruns(tmp_path, [
        ["pipeline", "--config", "nemo_configs/pipeline/cluster.yaml", "--executor", "slurm", "--dryrun", home],
        # the CPU demo's stages are one process each: one process per node instead of one per GPU
        ["pipeline", "--config", "nemo_configs/pipeline/embedded.yaml", "--executor", "slurm", "--dryrun", home,
         "executor.nproc_per_node=1"],
    ])
    for proc, steps in [(cluster, ["curate", "sft", "grpo", "export", "eval"]),
                        (embedded, ["curate", "eval_base", "sft", "grpo", "export", "eval"])]:
        assert proc.returncode == 0, proc.stderr[-3000:]
        parts = sections(proc.stdout)
        assert list(parts) == steps
        for name in ("sft", "grpo"):
            script = parts[name]
            assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=1" in script
            assert "# per-GPU memory plan" in script[:script.index("#SBATCH")], name
    assert "#SBATCH --gpus-per-node=8" in sections(cluster.stdout)["sft"]
    assert "--nnodes 1 --nproc-per-node 8" in sections(cluster.stdout)["sft"]
    assert "eval run --config /opt/nrr/nemo_configs/eval/embedded.yaml model=/lustre/nrr/reasoning/export/hf" \
        in sections(cluster.stdout)["eval"]
    assert not list((tmp_path / "nemorun").glob("experiments/*/*/"))


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
    # a failure only the job can see (its output folder is missing), not one the launch refuses up front
    steps = [
        {"name": "first", "stage": "task", "overrides": ["--n", "1", "--output", "${dir}/missing/problems.jsonl"]},
        {"name": "second", "stage": "task", "after": ["first"],
         "overrides": ["--n", "1", "--output", "${dir}/problems.jsonl"]},
    ]
    cfg_path = tmp_path / "pipe.yaml"
    cfg_path.write_text(json.dumps({"name": "failing", "run_dir": str(tmp_path / "run"), "steps": steps}))
    proc = nrr("pipeline", "--config", str(cfg_path), f"executor.nemorun_home={home}")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_state(tmp_path / "run" / "first") == "FAILED"
    assert stage_state(tmp_path / "run" / "second") == "FAILED"
    assert not (tmp_path / "run" / "second" / "problems.jsonl").exists()
    assert "No such file or directory" in proc.stdout  # the failed stage's log tail reaches the user


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


def test_a_preempted_stage_is_recorded_resumable_not_failed(tmp_path, capsys):
    """A stage stopped by a signal after saving (exit 75, or torchrun's 1 with a fresh preempted.json) is
    PREEMPTED with its step, in the stage record and the launch summary; the rerun says it resumes."""
    import signal
    from types import SimpleNamespace

    from launchers import entry
    from launchers.experiment import collect_results, print_results
    from launchers.executors import StageTask
    from recipes.resume import preempted_exit
    from recipes.stages import STAGES

    stage = tmp_path / "sft"
    stage.mkdir()
    before = entry.preempted_stamp(stage)
    preempted_exit(stage, 7, signal.SIGTERM)  # what a training stage's rank 0 writes
    for rc in (75, 1):  # 1: torchrun, which does not hand on the ranks' 75
        state, extra = entry.outcome(str(stage), rc, before)
        assert (state, extra["step"]) == ("PREEMPTED", 7) and "resumes from step 7" in extra["resumes"]
    # the file the stage found when it started (an earlier run's) does not make a failure a preemption
    assert entry.outcome(str(stage), 1, entry.preempted_stamp(stage))[0] == "FAILED"
    assert entry.outcome(str(tmp_path / "other"), 2, None)[0] == "FAILED"
    assert entry.outcome(str(stage), 0, before)[0] == "SUCCEEDED"

    # the launch summary: PREEMPTED with how it resumes, not FAILED with a log tail
    marker = entry.marker(stage, "PREEMPTED")
    marker.parent.mkdir()
    marker.write_text(json.dumps({"stage": "sft", "exit_code": 1, **extra}))
    job = SimpleNamespace(id="sft", state=SimpleNamespace(name="FAILED"),  # a NeMo-Run job as it ends on exit 1
                          executor=SimpleNamespace(job_dir=str(tmp_path / "no-logs")))
    [result] = collect_results(SimpleNamespace(jobs=[job]), [StageTask("sft", STAGES["sft"], ["sft"], str(stage))])
    assert (result.state, result.exit_code) == ("PREEMPTED", 1) and "resumes from step 7" in result.resumes
    from launchers.profiles import LocalProfile

    print_results("exp", [result], LocalProfile())
    assert "sft: preempted after saving its checkpoint; rerun the same command: it resumes from step 7" in \
        capsys.readouterr().out

    # the rerun through the entry says it resumes (the trainer removes preempted.json once it has resumed; this
    # stage fails at once, so its stale preempted.json does not make it PREEMPTED)
    proc = _entry("--stage-dir", str(stage), "--", "task", "--split", "bogus")
    assert "nrr task: resuming after a preemption (step 7 saved in" in proc.stderr, proc.stderr
    assert proc.returncode == 2 and entry.stage_state(stage) == "FAILED"
    assert not marker.exists()
