"""After a refit through the shared HF mapping, the rollout engine scores a fixed completion exactly
as the Megatron policy does (fp32 CPU): transformers fallback, vLLM at TP=1, vLLM fed by a TP=2 trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def test_hf_backend_matches_megatron_after_refit(tmp_path):
    r = _run(tmp_path, ["--backend", "hf"])
    assert r["tokens"] > 40
    assert r["max_abs_diff"] < TOL, r


@pytest.mark.slow
def test_vllm_matches_megatron_after_refit_tp1(tmp_path):
    r = _run(tmp_path, ["--backend", "vllm"])
    # a trained (peaked) policy: random weights would give ~ -log(384) = -5.95 per token
    assert r["mean_logprob"] > -5.0, r
    assert r["max_abs_diff"] < TOL, r
    # rollout.cpu_threads holds although vLLM's CPU worker turns torch.set_num_threads into a no-op
    assert (r["decode_threads"], r["threads_after"]) == (1, 2), r


@pytest.mark.slow
def test_vllm_matches_megatron_after_refit_tp2(tmp_path):
    r = _run(tmp_path, ["--backend", "vllm"], tp=2)
    assert r["mean_logprob"] > -5.0, r
    assert r["max_abs_diff"] < TOL, r
