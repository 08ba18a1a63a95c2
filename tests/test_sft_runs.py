"""End-to-end SFT / KD runs of the tiny student on CPU, each in its own processes (as `nrr` runs them).

- packed and padded batches of the same examples give the same loss and gradients;
- a run SIGKILLed mid-way and resumed ends with weights bit-identical to an uninterrupted run, one metrics row a step;
- SIGTERM at TP=2 (two processes under torchrun): every rank stops after the same step, saves it, exits with the
  requeue code; the rerun resumes and ends bit-identical to an uninterrupted TP=2 run;
- resuming under a config that computes differently is an error naming the key, unless explicitly allowed;
- TP=2 over two processes (torchrun) matches the TP=1 run step for step;
- logit KD of a model into itself has zero KL; into a fresh student it trains, at TP=1 and TP=2 alike.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "sft_scripts"
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
TINY = ["data.task.n_per_level=60", "data.task.valid_per_level=4", "training.global_batch_size=8",
        "training.micro_batch_size=4", "training.max_steps=6", "training.warmup_steps=2", "training.lr=0.003",
        "checkpoint.every_steps=2", "checkpoint.keep_last=5", "validation.every_steps=0",
        "logging.tensorboard=false", "logging.progress=false"]


def _run(cmd, timeout=180, expect_rc=0):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> rc {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _train_rows(run_dir)}


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _same_weights(run_a, run_b):
    a, b = _weights(run_a), _weights(run_b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert (a[name] == b[name]).all(), f"{name} differs after resume"


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "tp1"
    _run([PY, SCRIPTS / "run_sft.py", f"output_dir={run}", *TINY])
    return run


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "tp2"
    _run([PY, "-m", "recipes.cli", "sft", f"output_dir={run}", "parallel.tp=2", *TINY], timeout=300)
    return run


def test_packed_and_padded_batches_give_the_same_loss(tmp_path):
    out = _run([PY, SCRIPTS / "packed_vs_padded.py", tmp_path]).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    packed, padded = result["packed"], result["padded"]
    assert packed["rows"] < padded["rows"] == result["examples"]
    assert packed["tokens"] == padded["tokens"]
    assert abs(packed["loss"] - padded["loss"]) < 1e-5
    assert max(abs(a - b) for a, b in zip(packed["grad"], padded["grad"])) < 1e-5


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, tp1_run):
    run = tmp_path / "killed"
    run.mkdir()
    with open(run / "killed.log", "w") as log:
        proc = subprocess.Popen([PY, SCRIPTS / "run_sft.py", "--kill-before-step", "3", f"output_dir={run}", *TINY],
                                cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        rc = proc.wait(timeout=180)
        # megatron's checkpoint writer leaves a multiprocessing manager behind a SIGKILLed parent, as any
        # orphan of a killed job: stop the whole session, as a scheduler stops a killed job's processes
        os.killpg(proc.pid, signal.SIGKILL)
    assert rc == -9, (run / "killed.log").read_text()[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "2"  # step 3 ran but was never saved
    assert not (run / "hf").exists()
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3]
    _run([PY, SCRIPTS / "run_sft.py", f"output_dir={run}", *TINY])
    assert json.loads((run / "summary.json").read_text())["start_step"] == 2
    _same_weights(tp1_run, run)
    assert _losses(run)[6] == _losses(tp1_run)[6]
    # step 3's row of the killed run was dropped on resume: one row per step, the rerun's
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert _losses(run)[3] == _losses(tp1_run)[3]


@pytest.mark.slow
def test_sigterm_at_tp2_saves_the_step_exits_for_requeue_and_resumes_identically(tmp_path, tp2_run):
    from recipes.megatron import checkpointing
    from recipes.resume import FINGERPRINT, PREEMPTED, REQUEUE_EXIT_CODE

    run = tmp_path / "preempted"
    # rank 0 signals the launched process group (torchrun and both ranks) right before step 3 of 6 (index 2)
    cmd = [PY, SCRIPTS / "run_sft.py", "--sigterm-before-step", "2", f"output_dir={run}", "parallel.tp=2", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-5000:]
    # both ranks finished step 3 and saved it (checkpoint.every_steps=2 alone saves steps 2, 4, 6)
    assert json.loads((run / PREEMPTED).read_text())["step"] == 3
    assert checkpointing.saved_steps(run / "checkpoints") == [2, 3]
    assert checkpointing.verify_step(run / "checkpoints", 3) == []
    assert (checkpointing.step_dir(run / "checkpoints", 3) / FINGERPRINT).is_file()
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3] and not (run / "hf").exists()
    _run([PY, "-m", "recipes.cli", "sft", f"output_dir={run}", "parallel.tp=2", *TINY], timeout=300)
    assert json.loads((run / "summary.json").read_text())["start_step"] == 3
    assert not (run / PREEMPTED).exists()
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert _losses(run) == _losses(tp2_run)
    _same_weights(tp2_run, run)


@pytest.mark.slow
def test_resume_under_a_changed_config_names_the_key_unless_allowed(tmp_path, tp1_run):
    import shutil

    run = tmp_path / "changed"
    shutil.copytree(tp1_run, run)
    sft = [PY, "-m", "recipes.sft", f"output_dir={run}", *TINY, "training.max_steps=7"]
    # a longer run is allowed (so is another layout: checkpoints reshard); another learning rate is not
    proc = _run([*sft, "training.lr=0.002"], expect_rc=2)
    changed = proc.stderr.split("another config: ", 1)[1].split(". Resume", 1)[0]
    assert changed == "training.lr: 0.003 -> 0.002", proc.stderr[-3000:]
    assert "checkpoint.allow_config_change=true" in proc.stderr
    _run([*sft, "training.lr=0.002", "checkpoint.allow_config_change=true"])
    assert json.loads((run / "summary.json").read_text())["start_step"] == 6
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.slow
def test_two_process_tp2_run_matches_tp1(tp1_run, tp2_run):
    run = tp2_run
    tp1, tp2 = _losses(tp1_run), _losses(run)
    assert sorted(tp2) == list(range(1, 7))
    assert abs(tp1[1] - tp2[1]) < 1e-5  # same init, same batch
    assert all(abs(tp1[s] - tp2[s]) < 1e-3 for s in tp1)
    a, b = _weights(tp1_run), _weights(run)  # exported from the TP=2 checkpoint at TP=2
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    assert (run / "hf" / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_logit_kd_runs_end_to_end(tmp_path, tp1_run):
    teacher = tp1_run / "checkpoints"
    kd = ["-m", "recipes.kd", "--config", "nemo_configs/kd/tiny_cpu.yaml", f"teacher.checkpoint={teacher}",
          *TINY, "training.max_steps=3", "export_hf=false", "kd.kd_weight=1.0"]
    # the teacher distilled into a copy of itself: KL is zero, the CE is the teacher's own
    self_run = tmp_path / "self"
    _run([PY, *kd, f"output_dir={self_run}", "model.hf_config=recipes/assets/models/tiny-qwen2/config.json",
          f"model.init_checkpoint={teacher}", "kd.temperature=2.0"])
    rows = [json.loads(line) for line in (self_run / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kd"]) < 1e-6 and rows[0]["ce"] > 0
    # into a fresh tiny-llama3 student (same tokenizer): the KL falls, and TP=2 (the KL summed over
    # vocab shards, two processes) matches TP=1
    runs = {}
    for tp in (1, 2):
        runs[tp] = tmp_path / f"fresh-tp{tp}"
        _run([PY, *kd, f"output_dir={runs[tp]}", "kd.kind=mix", "training.max_steps=6", f"parallel.tp={tp}"],
             timeout=300)
    tp1, tp2 = ([json.loads(line) for line in (runs[tp] / "metrics.jsonl").read_text().splitlines()
                 if '"kd"' in line] for tp in (1, 2))
    assert len(tp1) == len(tp2) == 6 and tp1[-1]["kd"] < tp1[0]["kd"]
    assert abs(tp1[0]["kd"] - tp2[0]["kd"]) < 1e-5 and abs(tp1[0]["ce"] - tp2[0]["ce"]) < 1e-5
    # gradients too (a vocab-parallel normaliser needs an all-reduce in backward; identity under-counts it)
    assert abs(tp1[0]["grad_norm"] - tp2[0]["grad_norm"]) < 1e-4 * tp1[0]["grad_norm"]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(tp1, tp2))
    # throughput in every step's log: per GPU, and model FLOP/s by PaLM's count for the student at its length
    from recipes.config import load_config
    from recipes.kd import KDConfig
    from recipes.megatron.providers import load_hf_config
    from recipes.metrics import model_flops_per_token

    cfg = load_config(KDConfig, ROOT / "nemo_configs/kd/tiny_cpu.yaml", TINY)
    flops = model_flops_per_token(load_hf_config(ROOT / cfg.model.hf_config), cfg.data.seq_length)
    for rows, gpus in ((tp1, 1), (tp2, 2)):
        for r in rows:
            assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / gpus)
            assert r["model_tflops_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * flops / 1e12)
            assert "mfu" not in r  # no peak known for a CPU
