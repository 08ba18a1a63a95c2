"""After a refit through the shared HF mapping, the rollout engine scores a fixed completion exactly
as the Megatron policy does (fp32 CPU): transformers fallback, vLLM at TP=1, vLLM fed by a TP=2 trainer.

Bucketed refit (`recipes.rl.refit`): the tensors alive on rank 0 stay within one bucket plus one unit (the HF
tensors of one megatron module), measured by weak references on every refit tensor, in the trainer's process
(tensors handed to vLLM by reference, TP=1) and from a PP=2 trainer (point-to-point sends from the owning stage to
rank 0, serialized to an engine process); after it the engine's log-probs equal the trainer's. Each bucketed
refit loads a second policy into the engine of the TP=1 or TP=2 run (tests/grpo_scripts/logprob_match.py
--bucketed-pp): one engine start per world size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "tests" / "grpo_scripts" / "logprob_match.py"
TOL = 1e-3


def _run(tmp_path, args, tp=1):
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1" if tp > 1 else "2", "OMP_WAIT_POLICY": "PASSIVE"}
    if tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
               str(SCRIPT), str(out), "--tp", str(tp), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def vllm_tp1(tmp_path_factory):
    """TP=1, vLLM in the trainer's process: a whole refit, then a bucketed one of another policy."""
    return _run(tmp_path_factory.mktemp("refit-tp1"), ["--backend", "vllm", "--bucketed-pp", "1"])


@pytest.fixture(scope="module")
def vllm_tp2(tmp_path_factory):
    """TP=2, vLLM in an engine process: a whole refit, then a bucketed one of another policy at PP=2."""
    return _run(tmp_path_factory.mktemp("refit-tp2"), ["--backend", "vllm", "--bucketed-pp", "2"], tp=2)


def test_hf_backend_matches_megatron_after_refit(tmp_path):
    r = _run(tmp_path, ["--backend", "hf"])
    assert r["tokens"] > 40
    assert r["max_abs_diff"] < TOL, r


@pytest.mark.slow
def test_vllm_matches_megatron_after_refit_tp1(vllm_tp1):
    r = vllm_tp1
    # a trained (peaked) policy: random weights would give ~ -log(384) = -5.95 per token
    assert r["mean_logprob"] > -5.0, r
    assert r["max_abs_diff"] < TOL, r
    # rollout.cpu_threads holds although vLLM's CPU worker turns torch.set_num_threads into a no-op
    assert (r["decode_threads"], r["threads_after"]) == (1, 2), r


@pytest.mark.slow
def test_vllm_matches_megatron_after_refit_tp2(vllm_tp2):
    r = vllm_tp2
    assert r["tp"] == 2
    assert r["mean_logprob"] > -5.0, r
    assert r["max_abs_diff"] < TOL, r


def test_buckets_hold_whole_units_within_the_size():
    import torch

    from recipes.rl.refit import RefitMeter, buckets

    sizes = [3, 1, 4, 1, 5, 9, 2, 6]  # units of n float32 tensors of 256 bytes each
    units = ([(f"u{i}.t{j}", torch.zeros(64)) for j in range(n)] for i, n in enumerate(sizes))  # made on demand
    meter = RefitMeter()
    got = []
    for bucket in buckets(units, 5 * 256, meter):
        got.append([name for name, _ in bucket])
        assert meter.live <= 5 * 256 + 9 * 256
        bucket.clear()  # the consumer drops the bucket before asking for the next one
    # whole units, in order, a bucket closed when the next unit would overflow it; the 9-tensor unit goes alone
    per_bucket = [sorted({n.split(".")[0] for n in names}, key=lambda u: int(u[1:])) for names in got]
    assert per_bucket == [["u0", "u1"], ["u2", "u3"], ["u4"], ["u5"], ["u6"], ["u7"]]
    assert meter.largest_unit == 9 * 256 and meter.peak <= 5 * 256 + 9 * 256
    del bucket
    assert meter.live == 0  # everything released once nothing holds the tensors


def _check_bucketed(r, bucket_mb):
    bucket = bucket_mb * 2**20
    assert r["units"] > r["buckets"] > 4, r  # several buckets of several units each
    assert r["model_bytes"] > 5 * bucket, r
    # peak extra memory on rank 0: one bucket plus one unit (what vLLM or the receive loop still holds is counted)
    assert r["peak_bytes"] <= bucket + r["largest_unit_bytes"], r
    assert r["live_after"] == 0, r  # nothing of the refit outlives it
    assert r["mean_logprob"] > -5.0, r  # a trained policy (random weights: ~ -5.95)
    assert r["max_abs_diff"] < TOL, r
    # the engine held the first policy before: the bucketed refit replaced what it scores with
    assert r["changed_by_refit"] > 100 * TOL, r


@pytest.mark.slow
@pytest.mark.vllm
def test_bucketed_refit_in_process_tp1(vllm_tp1):
    r = vllm_tp1["bucketed"]
    assert (r["tp"], r["pp"]) == (1, 1)
    _check_bucketed(r, 0.5)


@pytest.mark.slow
@pytest.mark.vllm
def test_bucketed_refit_from_pp2(vllm_tp2):
    # PP=2: stage 1 sends its units point-to-point to rank 0 (TP=2 gathers: test_vllm_matches_megatron_after_refit_tp2)
    r = vllm_tp2["bucketed"]
    assert (r["tp"], r["pp"]) == (1, 2)
    _check_bucketed(r, 0.5)
