"""End-to-end SFT / KD runs of the tiny student on CPU, each in its own processes (as `nrr` runs them).

- packed and padded batches of the same examples give the same loss and gradients;
- logit KD at PP=2 (two processes) with its first stage SIGKILLed mid-way and resumed ends with weights and metrics
  bit-identical to an uninterrupted run, one metrics row a step;
- SIGTERM at TP=2 (two processes under torchrun): every rank stops after the same step, saves it, exits with the
  requeue code; the rerun resumes and ends bit-identical to an uninterrupted TP=2 run, each rank with its own RNG
  streams (a resume under another layout keeps the streams that layout seeds);
- resuming under a config that computes differently is an error naming the key, unless explicitly allowed;
- TP=2 over two processes (torchrun) matches the TP=1 run step for step;
- logit KD of a model into itself has zero KL, with the same first step at TP=1 and PP=2; into a fresh student it
  trains, at TP=1 and TP=2 alike.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.jobs import kill_job

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "sft_scripts"
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
KD_CONFIG = "nemo_configs/kd/tiny_cpu.yaml"
# metrics that measure time, not the computation (everything else must replay exactly on resume)
TIMING = {"time", "step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu"}
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


def _kd_self(tp1_run):
    """Logit KD (forward + reverse KL mix, T=2, half CE) of the SFT run into a student that starts as its copy."""
    teacher = tp1_run / "checkpoints"
    return [f"teacher.checkpoint={teacher}", f"model.init_checkpoint={teacher}", *TINY,
            "model.hf_config=recipes/assets/models/tiny-qwen2/config.json", "kd.kd_weight=0.5", "kd.kind=mix",
            "kd.temperature=2.0"]


@pytest.fixture(scope="module")
def kd_pp2_run(tmp_path_factory, tp1_run):
    run = tmp_path_factory.mktemp("kd") / "pp2"
    _run([PY, "-m", "recipes.kd", "--config", KD_CONFIG, *_kd_self(tp1_run), "parallel.pp=2", f"output_dir={run}"],
         timeout=600)
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


def _rows_without_timing(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_kd_at_pp2_sigkilled_mid_run_resumes_bit_for_bit(tmp_path, tp1_run, kd_pp2_run):
    from recipes.resume import REQUEUE_EXIT_CODE

    run = tmp_path / "killed"
    args = [*_kd_self(tp1_run), "parallel.pp=2", f"output_dir={run}"]
    # rank 0 (the first pipeline stage, teacher and student) is SIGKILLed right before step 4 of 6; torchrun then
    # stops rank 1 and fails
    marker, log = str(tmp_path), tmp_path / "killed.log"
    with open(log, "w") as out:  # a file, not a pipe: the processes left behind would hold a pipe open
        proc = subprocess.Popen([PY, SCRIPTS / "run_sft.py", "--kd", "--kill-before-step", "3", *args], cwd=ROOT,
                                env={**ENV, "NRR_TEST_JOB": marker}, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=600)
        finally:
            kill_job(marker)
    assert rc not in (0, REQUEUE_EXIT_CODE), log.read_text()[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in log.read_text()
    assert (run / "checkpoints" / "latest").read_text().strip() == "2"  # step 3 ran but was never saved
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3] and not (run / "hf").exists()
    _run([PY, "-m", "recipes.kd", "--config", KD_CONFIG, *args], timeout=600)
    assert json.loads((run / "summary.json").read_text())["start_step"] == 2
    # step 3's row of the killed run was dropped on resume: one row per step (and the final validation's), each
    # equal to the uninterrupted run's in everything but timing: loss, KL, CE, grad norm, learning rate
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert _rows_without_timing(run) == _rows_without_timing(kd_pp2_run)
    _same_weights(kd_pp2_run, run)


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
    # each rank resumed its own RNG streams (megatron's tensor-parallel stream is seeded per TP rank): the final
    # checkpoints hold the same per-rank torch and tracker states as the uninterrupted run's. (Python's `random`
    # is not compared: library code outside the training computation draws from it, differently in a resumed
    # process; training reads only torch's streams.)
    saved, resumed = (_rng_per_rank(r / "checkpoints", 6) for r in (tp2_run, run))
    assert not torch.equal(saved[0]["tracker"]["model-parallel-rng"], saved[1]["tracker"]["model-parallel-rng"])
    for a, b in zip(saved, resumed, strict=True):
        assert all(torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"])
        assert torch.equal(a["torch"], b["torch"])


def _rng_per_rank(ckpt_dir, step):
    from recipes.megatron import checkpointing

    path = checkpointing.step_dir(ckpt_dir, step) / checkpointing.TRAINER_STATE
    return torch.load(path, weights_only=True)["extra"]["rng_per_rank"]


def test_rng_streams_resume_per_rank_only_under_the_layout_that_saved_them():
    out = _run([PY, "-c", """
import torch
from recipes.megatron import runtime
from recipes.resume import restore_rng, rng_states
runtime.init_distributed(1, 1, seed=5)
saved = rng_states()
assert saved["rng_layout"] == [1, 1, 1] and len(saved["rng_per_rank"]) == 1
first = torch.rand(3)
restore_rng(saved)  # same layout: this rank's own streams come back
assert torch.equal(torch.rand(3), first)
moved = torch.get_rng_state()
restore_rng({**saved, "rng_layout": [2, 2, 1]})  # saved by another layout: rank 0 here was not rank 0 there
assert torch.equal(torch.get_rng_state(), moved)
restore_rng({"rng": saved["rng"]})  # a checkpoint from before per-rank streams: rank 0's
assert torch.equal(torch.rand(3), first)
print("OK")
"""]).stdout
    assert out.strip().endswith("OK")


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
def test_logit_kd_runs_end_to_end(tmp_path, tp1_run, kd_pp2_run):
    teacher = tp1_run / "checkpoints"
    kd = ["-m", "recipes.kd", "--config", "nemo_configs/kd/tiny_cpu.yaml", f"teacher.checkpoint={teacher}",
          *TINY, "training.max_steps=3", "export_hf=false", "kd.kd_weight=1.0"]
    # the teacher distilled into a copy of itself: KL is zero, the CE is the teacher's own
    self_run = tmp_path / "self"
    _run([PY, "-m", "recipes.kd", "--config", KD_CONFIG, *_kd_self(tp1_run), "training.max_steps=3",
          "export_hf=false", f"output_dir={self_run}"])
    rows = [json.loads(line) for line in (self_run / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kd"]) < 1e-6 and rows[0]["ce"] > 0
    # so at PP=2 (the teacher's logits from its own forward-only pipeline pass, on the last stage), whose first
    # step matches TP=1's. (A fresh student would not do: its random init depends on the pipeline layout.)
    pp2 = json.loads((kd_pp2_run / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(pp2["kd"]) < 1e-6 and abs(pp2["ce"] - rows[0]["ce"]) < 1e-5
    assert abs(pp2["loss"] - rows[0]["loss"]) < 1e-5 and pp2["grad_norm"] == pytest.approx(rows[0]["grad_norm"])
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


def test_the_matmul_peak_is_the_best_of_its_readings():
    """A benchmark's peak: each reading the best of repeated products (FLOPs 2 n^3), and of a run's readings the
    best per dtype, the spread of the fp32 ones kept (load only lowers a reading)."""
    from recipes.bench.peak import best_peak, matmul_peak, model_gflops
    from recipes.metrics import model_flops_per_token

    reading = matmul_peak(n=64, repeats=3, dtypes=("float32",), min_seconds=0.0)
    assert reading["n"] == 64 and reading["float32"] > 0 and "bfloat16" not in reading
    before = {"threads": 2, "n": 1024, "float32": 120.0, "bfloat16": 300.0}
    after = {"threads": 2, "n": 1024, "float32": 160.0, "bfloat16": 280.0}
    peak = best_peak(before, after)
    assert peak["float32"] == 160.0 and peak["bfloat16"] == 300.0 and peak["threads"] == 2
    assert peak["readings"] == [{"float32": 120.0, "bfloat16": 300.0}, {"float32": 160.0, "bfloat16": 280.0}]
    assert peak["fp32_spread"] == 0.25  # 1 - 120 / 160
    # the achieved side, by hand (PaLM's count): projections 2 x (64 x 8 x 16 + 64 x 64 + 3 x 64 x 256) = 122,880
    # and the output layer 384 x 64 = 24,576 parameters, x 6; attention 12 x 2 layers x 4 heads x 16 x 128 tokens
    hf = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
          "vocab_size": 384, "num_key_value_heads": 2}
    assert model_flops_per_token(hf, 128) == 6 * (122_880 + 24_576) + 196_608 == 1_081_344
    assert model_gflops(hf, 10_000.0, 128) == 10.81  # 10k training tokens/s
    assert model_gflops(hf, 30_000.0, 128, training=False) == 10.81  # a forward: a third of the FLOPs
