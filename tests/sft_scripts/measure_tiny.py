"""Measure the tiny SFT recipe: train with overrides, then greedy held-out accuracy of every saved step.

    flock /tmp/nrr-heavy.lock .venv/bin/python tests/sft_scripts/measure_tiny.py OUT.json key=value ...

Writes {overrides, summary, evals: [{step, minutes, accuracy_by_level}]} to OUT.json.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    out_json, overrides = sys.argv[1], sys.argv[2:]
    from recipes.config import load_config
    from recipes.megatron.hf_checkpoint import export_to_hf
    from recipes.evaluation import evaluate_model
    from recipes.megatron import checkpointing, runtime
    from recipes.metrics import read_metrics
    from recipes.sft import DEFAULT_CONFIG
    from recipes.trainer import SFTConfig, resolve_path, train

    cfg = load_config(SFTConfig, resolve_path(DEFAULT_CONFIG), ["logging.progress=false", *overrides])
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    rows = read_metrics(cfg.output_dir)
    step_time = {r["step"]: r["time"] for r in rows if "loss" in r}
    start = min(step_time.values()) if step_time else t0
    ckpt = Path(cfg.output_dir) / "checkpoints"
    evals = []
    for step in checkpointing.saved_steps(ckpt):
        hf = export_to_hf(ckpt, Path(cfg.output_dir) / f"hf-{step}", step=step)
        t = time.time()
        r = evaluate_model(str(hf), levels=[1, 2, 3, 4], n_per_level=100, backend="hf", max_tokens=128,
                           batch_size=400)
        evals.append({"step": step, "train_minutes": round((step_time.get(step, start) - start) / 60, 2),
                      "accuracy_by_level": r["accuracy_by_level"], "eval_s": round(time.time() - t, 1)})
        print(evals[-1], flush=True)
    runtime.destroy_distributed()
    Path(out_json).write_text(json.dumps({"overrides": overrides, "wall_s": round(wall, 1), "summary": summary,
                                          "evals": evals}, indent=2, default=str))


if __name__ == "__main__":
    main()
