"""The machine's dense matmul throughput, the limit a training step or a rollout is measured against.

    from recipes.bench.peak import matmul_peak, model_gflops
    matmul_peak()                                    # {"float32": GFLOP/s, "bfloat16": GFLOP/s, "threads": 2, ...}

`matmul_peak` times square torch matmuls on the threads torch is set to use (the benchmarks' own setting), best of a
few repeats, for each dtype; a product of two n x n matrices is 2 n^3 FLOPs. The achieved figure of a model is its
model FLOPs (`recipes.metrics.model_flops_per_token`: PaLM's count) per second.
"""

from __future__ import annotations

import time

import torch

from recipes.metrics import model_flops_per_token


def matmul_peak(n: int = 1024, repeats: int = 5, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    out: dict = {"threads": torch.get_num_threads(), "n": n}
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up: thread pool, packing buffers
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        out[name] = round(2 * n**3 / best / 1e9, 1)
    return out


def model_gflops(hf: dict, tokens_per_s: float, seq_length: int, training: bool = True) -> float:
    """Model GFLOP/s of `tokens_per_s` at `seq_length` tokens of context: a training step (forward + backward,
    PaLM's count) or, with `training=False`, a forward (generation: a third of it)."""
    per_token = model_flops_per_token(hf, seq_length) / (1 if training else 3)
    return round(tokens_per_s * per_token / 1e9, 2)
