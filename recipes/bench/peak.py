"""The machine's dense matmul throughput, the limit a training step or a rollout is measured against.

    from recipes.bench.peak import matmul_peak, model_gflops
    matmul_peak()                                    # {"float32": GFLOP/s, "bfloat16": GFLOP/s, "threads": 2, ...}

`matmul_peak` times square torch matmuls on the threads torch is set to use (the benchmarks' own setting), the best
of at least `repeats` products and `min_seconds` of them, for each dtype; a product of two n x n matrices is 2 n^3
FLOPs. A benchmark reads the peak before and after the work it measures and keeps the best of the readings
(`best_peak`): other load on the cores only ever lowers a reading, and one short reading under load read as low as
half the idle figure. The achieved figure of a model is its model FLOPs (`recipes.metrics.model_flops_per_token`:
PaLM's count) per second.
"""

from __future__ import annotations

import time

import torch

from recipes.metrics import model_flops_per_token


DTYPES = ("float32", "bfloat16")


def matmul_peak(n: int = 1024, repeats: int = 5, dtypes: tuple[str, ...] = DTYPES, min_seconds: float = 0.5) -> dict:
    out: dict = {"threads": torch.get_num_threads(), "n": n}
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up: thread pool, packing buffers
        best, count, began = float("inf"), 0, time.perf_counter()
        while count < repeats or time.perf_counter() - began < min_seconds:
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
            count += 1
        out[name] = round(2 * n**3 / best / 1e9, 1)
    return out


def best_peak(*readings: dict) -> dict:
    """One peak from several `matmul_peak` readings taken in the same run: the best per dtype, every reading kept
    (`readings`), and how far the lowest fp32 reading fell below the best (`fp32_spread`: 0.05 is 5 %)."""
    dtypes = [d for d in DTYPES if all(d in r for r in readings)]
    out = {k: v for k, v in readings[0].items() if k not in DTYPES}
    out.update({d: max(r[d] for r in readings) for d in dtypes})
    out["readings"] = [{d: r[d] for d in dtypes} for r in readings]
    if "float32" in dtypes:
        out["fp32_spread"] = round(1 - min(r["float32"] for r in readings) / out["float32"], 3)
    return out


def model_gflops(hf: dict, tokens_per_s: float, seq_length: int, training: bool = True) -> float:
    """Model GFLOP/s of `tokens_per_s` at `seq_length` tokens of context: a training step (forward + backward,
    PaLM's count) or, with `training=False`, a forward (generation: a third of it)."""
    per_token = model_flops_per_token(hf, seq_length) / (1 if training else 3)
    return round(tokens_per_s * per_token / 1e9, 2)
