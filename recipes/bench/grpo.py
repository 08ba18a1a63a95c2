"""GRPO benchmark: rollout tokens/s with vLLM vs the transformers fallback (same weights, same prompts),
and where a GRPO step's time goes (generation, training, refit) in a short real run.

    from recipes.bench.grpo import bench_grpo; bench_grpo()      # (`nrr bench grpo`)
    python -m recipes.bench.grpo [SFT_CHECKPOINT]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rollout_throughput(backend_name: str, chunks, hf: dict, engine_dir: Path, prompts: list[list[int]], n: int,
                       max_tokens: int, enforce_eager: bool = True) -> dict:
    """Sampled tokens per second of one backend, after a refit and one warm-up call (vLLM: eager, or compiled with
    `enforce_eager=False`; its compile time is in `start_seconds`)."""
    from recipes.rl.refit import refit
    from recipes.rl.rollout import RolloutConfig, start_engine

    cfg = RolloutConfig(backend=backend_name, max_tokens=max_tokens, enforce_eager=enforce_eager)
    began = time.perf_counter()
    backend = start_engine(cfg, engine_dir,
                           max_model_len=int(hf.get("max_position_embeddings", 512)))
    start_s = time.perf_counter() - began
    refit_s = refit(backend, chunks, hf)
    backend.generate(prompts[:2], cfg.sampling(2, seed=123))  # warm-up
    start = time.perf_counter()
    outs = backend.generate(prompts, cfg.sampling(n, seed=0))
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for group in outs for c in group)
    backend.close()
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "refit_seconds": round(refit_s, 4), "start_seconds": round(start_s, 1)}


def step_time_shares(init_checkpoint: str | None, steps: int, run_dir: Path) -> dict:
    """Run `steps` GRPO steps (vLLM rollouts) in a subprocess and split the step time by phase."""
    args = [f"output_dir={run_dir}", f"model.init_checkpoint={init_checkpoint or 'null'}", f"grpo.steps={steps}",
            "eval.per_level=10", "eval.every_steps=0", "logging.progress=false", "checkpoint.every_steps=0",
            "checkpoint.resume=false"]
    # a fresh single-process run: drop the rendezvous variables this process set for itself
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-m", "recipes.grpo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"GRPO run failed:\n{proc.stderr[-3000:]}")
    from recipes.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "step_seconds" in r][1:] or \
        [r for r in read_metrics(run_dir) if "step_seconds" in r]  # skip the first (warm-up) step when we can
    total = sum(r["step_seconds"] for r in rows)
    return {"steps_measured": len(rows), "step_seconds": round(total / len(rows), 3),
            **{f"{k}_share": round(sum(r[f"{k}_seconds"] for r in rows) / total, 3)
               for k in ("gen", "train", "refit")},
            "refit_seconds": round(sum(r["refit_seconds"] for r in rows) / len(rows), 4)}


def bench_grpo(init_checkpoint: str | None = None, prompts: int = 16, group_size: int = 8, max_tokens: int = 96,
               steps: int = 4, out_dir: str | None = None) -> dict:
    """Both measurements in one dict (call from a `__main__` entry point: it starts vLLM)."""
    import torch

    from recipes import task, tokenizer
    from recipes.megatron.hf_checkpoint import load_pretrained
    from recipes.megatron import providers, runtime
    from recipes.rl.refit import write_engine_dir
    from recipes.config import resolve_path
    from recipes.trainer import TINY_STUDENT

    out = Path(out_dir or tempfile.mkdtemp(prefix="nrr-bench-grpo-"))
    torch.set_num_threads(2)
    runtime.init_distributed(1, 1, seed=0)
    hf = providers.load_hf_config(resolve_path(TINY_STUDENT))
    chunks = providers.build_model(hf, 1, 1, seed=0, ddp=False)
    if init_checkpoint:
        load_pretrained(chunks, resolve_path(init_checkpoint))
    tok = tokenizer.load(resolve_path(TINY_STUDENT))
    engine_dir = write_engine_dir(hf, out / "engine", tok)
    batch = [tok.prompt_ids(p.question) for p in task.train_problems([2, 3], prompts // 2, seed=11)]
    result = {"prompts": len(batch), "group_size": group_size, "max_tokens": max_tokens,
              "policy": init_checkpoint or "random-init"}
    from recipes.bench.peak import best_peak, matmul_peak, model_gflops

    peak_before = matmul_peak()  # read again after the rollouts: the best reading is the peak
    backends = {"vllm": ("vllm", True), "vllm_compiled": ("vllm", False), "hf": ("hf", True)}
    for name, (backend, eager) in backends.items():
        result[f"rollout_{name}"] = rollout_throughput(backend, chunks, hf, engine_dir, batch, group_size, max_tokens,
                                                       enforce_eager=eager)
    result["rollout_speedup_vllm_over_hf"] = round(
        result["rollout_vllm"]["tokens_per_s"] / result["rollout_hf"]["tokens_per_s"], 2)
    result["rollout_speedup_compiled_over_eager"] = round(
        result["rollout_vllm_compiled"]["tokens_per_s"] / result["rollout_vllm"]["tokens_per_s"], 2)
    # generation against the machine's fp32 matmul peak (the engine runs the fp32 tiny model): forward FLOPs per
    # sampled token at the mean context, prompt plus half the sampled tokens
    result["matmul_peak_gflops"] = peak = best_peak(peak_before, matmul_peak())
    for name in backends:
        r = result[f"rollout_{name}"]
        context = sum(map(len, batch)) / len(batch) + r["tokens"] / (len(batch) * group_size) / 2
        r["model_gflops"] = model_gflops(hf, r["tokens_per_s"], round(context), training=False)
        r["of_fp32_peak"] = round(r["model_gflops"] / peak["float32"], 4)
    runtime.destroy_distributed()
    result["step"] = step_time_shares(init_checkpoint, steps, out / "grpo")
    (out / "bench_grpo.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    ckpt = sys.argv[1] if len(sys.argv) > 1 else None
    print(json.dumps(bench_grpo(ckpt), indent=2))
