"""megatron-core's distributed optimizer on CPU (gloo): DP=2 with it trains like DP=1 without it, its checkpoint
resumes into other layouts with or without it, and each DP rank holds only its shard of the Adam state.

Two worker runs of tests/megatron_scripts/distopt_train.py (megatron's global state stays out of pytest; the runs
share their launch with the other megatron test modules'):
- DP=2 (torchrun, 2 processes) with the distributed optimizer: 5 AdamW steps, a checkpoint after step 3; then the
  same processes rebuild megatron's groups as TP=2 and resume that checkpoint with and without the distributed
  optimizer (steps 4, 5);
- DP=1 (one process) without it: the same 5 steps (the reference), then it resumes the DP=2 checkpoint.
Every step has the same global batch at every layout. fp32 on CPU: the losses agree to TOL (measured: DP=2 equals
DP=1 to the last printed digit, grad norms to ~1e-7 relative).
"""

from __future__ import annotations

import json

import pytest

TOL = 1e-5


# (nproc, worker script, argv): launched with the other megatron modules' runs (tests/megatron_scripts/run_many.py)
WORKER_RUNS = [
    (2, "distopt_train", ["--distributed-optimizer", "--out", "{work}/dp2.json", "--save", "{work}/ckpt_dp2",
                          "--load", "{work}/ckpt_dp2", "--resume-tp", "2"]),
    (1, "distopt_train", ["--out", "{work}/dp1.json", "--load", "{work}/ckpt_dp2", "--resume-with", "regular"]),
]


@pytest.fixture(scope="module")
def runs(megatron_workers) -> dict[str, dict]:
    work = megatron_workers[__name__]
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("dp1", "dp2")}


def _close(a: list[float], b: list[float], tol: float = TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.slow
def test_dp2_with_distributed_optimizer_trains_like_dp1(runs):
    ref, got = runs["dp1"], runs["dp2"]
    assert len(ref["losses"]) == 5
    assert len(set(ref["losses"])) == 5  # the optimizer moved the weights every step
    assert _close(got["losses"], ref["losses"])
    # the gradients themselves, not only Adam's scale-free update: the reduce-scatter must sum DP's shares exactly
    for a, b in zip(ref["grad_norms"], got["grad_norms"]):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout,kind", [("dp1", "regular"), ("tp2", "regular"), ("tp2", "distributed")])
def test_dp2_checkpoint_resumes_in_other_layouts(runs, layout, kind):
    uninterrupted = runs["dp2"]["losses"][3:]
    source = runs["dp1"] if layout == "dp1" else runs["dp2"]
    resumed = source["resumed"][kind]
    assert resumed["step"] == 3
    # step 4's loss checks the weights; step 5's needs Adam's moments, its step count and the scheduler's lr too
    assert _close(resumed["losses"], uninterrupted), (layout, kind, resumed["losses"], uninterrupted)
    for a, b in zip(runs["dp2"]["grad_norms"][3:], resumed["grad_norms"]):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_optimizer_state_is_sharded_across_dp(runs):
    (ref,) = runs["dp1"]["ranks"]
    ranks = runs["dp2"]["ranks"]
    assert sorted(r["dp_rank"] for r in ranks) == [0, 1] and all(r["dp"] == 2 for r in ranks)
    n = ref["grad_buffer_numel_unpadded"]  # the model's parameter count
    assert ref["held"]["optimizer"] == 2 * 4 * n  # fp32 exp_avg + exp_avg_sq; fp32 params are their own main copy
    for r in ranks:
        shard, padding = r["grad_buffer_numel"] // 2, r["grad_buffer_numel"] - r["grad_buffer_numel_unpadded"]
        # exactly Adam's two fp32 moments for this rank's shard of megatron's grad buffer, less any padding in it
        assert 2 * 4 * (shard - padding) <= r["held"]["optimizer"] <= 2 * 4 * shard
        assert 0.45 < r["held"]["optimizer"] / ref["held"]["optimizer"] < 0.55
        # params and grads stay whole on every rank (ZeRO-1): the padded buffers
        assert r["held"]["grads"] == 4 * r["grad_buffer_numel"]
        assert r["held"]["params"] == 4 * r["grad_buffer_numel"]
    # every parameter element has its Adam state on exactly one DP rank
    assert sum(r["held"]["optimizer"] for r in ranks) == ref["held"]["optimizer"]
