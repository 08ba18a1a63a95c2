"""On one CUDA GPU: the planner's per-GPU figures against what CUDA allocates for a real-size model, and the
training step's throughput. Not part of `make test` (it needs a GPU); `docs/planner-on-gpu.md` records a run.

For each case (a model from `recipes/assets/models`, bf16, TP1 PP1 DP1 on NCCL, one row of `--seq` tokens):
build the model and megatron-core's optimizer, take one step (Adam's state exists after it), then
  state      bytes held by parameters, fp32 gradient buffers and optimizer state (distinct storages), against
             `planner.state_bytes` (expected equal: the same accounting the CPU test checks at tiny scale);
  transient  peak CUDA allocation during a second step less the allocation before it, against the planner's
             activations + logits for the recompute mode (the local spec's attention is SDPA, flash on CUDA);
  speed      mean of `--steps` timed steps: tokens/s, model TFLOP/s (`recipes.metrics`) and the fraction of the
             GPU's dense bf16 peak (`runtime.device_peak_tflops`).
Writes one JSON object per case to `--out` (JSONL) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron_scripts"))

from recipes import metrics, planner  # noqa: E402
from recipes.megatron import providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402
from held_bytes import held  # noqa: E402  (the same accounting as the CPU test)

GIB = 1024**3


def run_case(model: str, seq: int, recompute: str, distributed: bool, steps: int) -> dict:
    hf = providers.load_hf_config(f"recipes/assets/models/{model}/config.json")
    runtime.init_distributed(1, 1, seed=0)
    chunks = providers.build_model(hf, 1, 1, seed=0, dtype=torch.bfloat16, distributed_optimizer=distributed,
                                   config_overrides=providers.memory_overrides(False, recompute, 1))
    optimizer = ts.build_optimizer(chunks, lr=1e-5, distributed=distributed)
    dev = runtime.device()
    tok = torch.randint(0, int(hf["vocab_size"]), (1, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tok[:, :-1].to(dev), "labels": tok[:, 1:].to(dev), "loss_mask": torch.ones(1, seq, device=dev),
             "position_ids": torch.arange(seq, device=dev).expand(1, seq), "attention_mask": None}
    cuda = not runtime.is_cpu()  # on CPU (a smoke run of this script) there is no allocator to read
    ts.optimizer_step(chunks, optimizer, [batch], seq)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts.optimizer_step(chunks, optimizer, [batch], seq)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
    measured = held(chunks, optimizer)
    layout = planner.Layout(distributed_optimizer=distributed, recompute=recompute)
    planned_state = planner.state_bytes(hf, layout, 0, 0, "bf16")
    pl = planner.plan(hf, layout, seq, 1, "bf16", flash_attention=True)  # SDPA runs the flash kernel on CUDA
    t0 = time.perf_counter()
    for _ in range(steps):
        ts.optimizer_step(chunks, optimizer, [batch], seq)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    speed = metrics.throughput(seq, seconds, 1, metrics.model_flops_per_token(hf, seq), runtime.device_peak_tflops())
    del chunks, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"model": model, "seq": seq, "recompute": recompute, "distributed_optimizer": distributed,
            "measured_state": measured, "planned_state": planned_state,
            "state_equal": all(measured[k] == planned_state[k] for k in measured),
            "measured_transient_gib": transient / GIB,
            "planned_activations_logits_gib": (pl.parts["activations"] + pl.parts["logits"]) / GIB,
            "step_s": seconds, **speed, "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="qwen2.5-1.5b:4096:none,qwen2.5-1.5b:4096:selective,qwen2.5-1.5b:4096:full,"
                    "qwen2.5-1.5b:4096:none:distopt")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        model, seq, recompute, *rest = case.split(":")
        try:
            row = run_case(model, int(seq), recompute, "distopt" in rest, args.steps)
        except Exception as err:  # one case's failure (e.g. out of memory) is a result too
            row = {"case": case, "error": f"{type(err).__name__}: {err}"[:2000]}
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
