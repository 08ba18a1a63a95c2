"""megatron-core's activation recompute and sequence parallelism on the local spec (CPU).

Two runs of tests/megatron_scripts/memory_modes.py (megatron's global state and the CPU device layer stay out of the
pytest process; the runs share their launch with the other megatron test modules'): TP=1 (recompute modes against
no recompute, and the reference losses) and TP=2 with sequence parallelism (alone and with either recompute), all
from the same HF weights:
- full and selective recompute give the gradients of no recompute (fp32: exactly), and really recompute (the layers
  or the core attention run twice per forward+backward);
- TP=2 + sequence parallelism gives TP=1's losses over 3 AdamW steps (plain, packed with a mask, packed with
  cu_seqlens), for Qwen2 and for Qwen3 (qk-norm), and the norm weights' gradients are TP=1's on both TP ranks;
- a sequence length not divisible by TP under sequence parallelism is a clear error.
"""

from __future__ import annotations

import json

import pytest

TOL = 1e-5


# (nproc, worker script, argv): launched with the other megatron modules' runs (tests/megatron_scripts/run_many.py)
WORKER_RUNS = [
    (2, "memory_modes", ["--tp", "2", "--hf", "{work}/hf_init", "--out", "{work}/tp2_sp.json"]),
    (1, "memory_modes", ["--hf", "{work}/hf_init", "--out", "{work}/tp1.json"]),
]


@pytest.fixture(scope="module")
def reports(megatron_workers) -> dict[str, dict]:
    work = megatron_workers[__name__]
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("tp1", "tp2_sp")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_gradients_of_no_recompute(reports, mode):
    got, ref = reports["tp1"]["recompute"][mode], reports["tp1"]["recompute"]["none"]
    assert got["max_abs_grad_diff"] == 0.0  # fp32 on CPU: the recomputed forward is the same arithmetic
    assert got["loss"] == ref["loss"] and got["grad_norm"] == ref["grad_norm"] > 0


@pytest.mark.slow
def test_recompute_really_recomputes(reports):
    calls = reports["tp1"]["recompute"]
    layers, micro_batches = 4, 2
    once = layers * micro_batches
    assert (calls["none"]["layer_calls"], calls["none"]["attention_calls"]) == (once, once)
    assert (calls["selective"]["layer_calls"], calls["selective"]["attention_calls"]) == (once, 2 * once)
    assert (calls["full"]["layer_calls"], calls["full"]["attention_calls"]) == (2 * once, 2 * once)


@pytest.mark.slow
@pytest.mark.parametrize("run,model", [("qwen2", "qwen2"), ("qwen2_full", "qwen2"),
                                       ("qwen2_selective", "qwen2"), ("qwen3", "qwen3")])
def test_sequence_parallel_tp2_matches_tp1(reports, run, model):
    ref, got = reports["tp1"]["train"][model], reports["tp2_sp"]["train"][run]
    assert got["norm_input_rows"] == ref["norm_input_rows"] // 2 == 16  # the norms see S/TP tokens per rank
    assert len(got["losses"]) == 3 and len(set(ref["losses"])) == 3  # the steps ran with a real optimizer
    for a, b in zip(ref["losses"], got["losses"]):
        assert b == pytest.approx(a, abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("run,model", [("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_sequence_parallel_norm_grads_are_summed_over_tp(reports, run, model):
    ref, got = reports["tp1"]["train"][model], reports["tp2_sp"]["train"][run]
    assert got["sequence_parallel_attr"] == ["True"] and ref["sequence_parallel_attr"] == ["False"]
    assert got["norm_grad_rank_diff"] == 0.0  # finalize_model_grads all-reduced them: identical on both ranks
    assert sorted(got["norm_grads"]) == sorted(ref["norm_grads"])
    if model == "qwen3":
        assert any("q_layernorm" in name for name in ref["norm_grads"])
    for name, grad in ref["norm_grads"].items():  # and equal to TP=1's, not one rank's half of the sequence
        scale = max(abs(a) for a in grad)
        assert scale > 0
        assert max(abs(a - b) for a, b in zip(grad, got["norm_grads"][name])) < 1e-4 * scale


@pytest.mark.slow
def test_sequence_length_not_divisible_by_tp_is_a_clear_error(reports):
    message = reports["tp2_sp"]["odd_length_error"]
    assert message is not None
    assert "sequence_parallel" in message and "tp=2" in message and "seq_length=31" in message


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_is_torchs_arithmetic(dtype):
    """`norms.rms_norm` (which keeps only the input and the inverse RMS for backward) gives torch's `rms_norm`
    output bit for bit and its gradients (input: within one rounding of the dtype; weight: fp32 sums)."""
    import torch

    from recipes.megatron.norms import rms_norm

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 96, generator=gen).to(dt).requires_grad_()
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dt).requires_grad_()
    dy = torch.randn(64, 2, 96, generator=gen).to(dt)
    ref = torch.nn.functional.rms_norm(x, (96,), w, 1e-6)
    out = rms_norm(x, w, 1e-6)
    assert torch.equal(out, ref)
    (gx_ref, gw_ref), (gx, gw) = torch.autograd.grad(ref, (x, w), dy), torch.autograd.grad(out, (x, w), dy)
    eps = torch.finfo(dt).eps
    assert (gx.float() - gx_ref.float()).abs().max() <= 4 * eps * gx_ref.float().abs().max()
    assert (gw.float() - gw_ref.float()).abs().max() <= 4 * eps * gw_ref.float().abs().max()
    # what backward holds: the input and one fp32 value per row (torch's composite adds fp32 copies of the row)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    kept_bytes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept if t is not w}
    assert sum(kept_bytes.values()) == x.numel() * x.element_size() + 64 * 2 * 4
