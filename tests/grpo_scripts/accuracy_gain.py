"""Does GRPO raise held-out accuracy from an SFT checkpoint within a bounded CPU budget?

    python tests/grpo_scripts/accuracy_gain.py SFT_CKPT OUT_DIR [--seeds 0 1] [--minutes 5] [override ...]

Runs `recipes.grpo` (nemo_configs/grpo/tiny_cpu.yaml, vLLM rollouts) once per seed with a time budget,
and reports greedy held-out accuracy before and after, per level and averaged over seeds. Each run's
reward curve is in OUT_DIR/seed<k>/report/reward_curve.png.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out_dir)
    runs = {}
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        cmd = [sys.executable, "-m", "recipes.grpo", "--config", "nemo_configs/grpo/tiny_cpu.yaml",
               f"output_dir={run_dir}", f"model.init_checkpoint={args.checkpoint}", f"training.seed={seed}",
               f"prompts.seed={seed + 1}", f"grpo.max_minutes={args.minutes}", "grpo.steps=1000", "logging.progress=false",
               "checkpoint.every_steps=0", "checkpoint.resume=false", "eval.every_steps=0", *args.overrides]
        # one process with both cores: OpenMP's default wait policy (idle threads spin) is the faster one
        env = {**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, "OMP_NUM_THREADS": "2"}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        s = json.loads((run_dir / "summary.json").read_text())
        runs[seed] = {"before": s["eval_before"], "after": s["eval_after"], "steps": s["steps_done"],
                      "train_seconds": s["train_seconds"]}
        print(json.dumps({seed: runs[seed]}), flush=True)
    keys = runs[args.seeds[0]]["before"]  # L<level> ... and "mean"
    gains = {k: round(100 * sum(r["after"][k] - r["before"][k] for r in runs.values()) / len(runs), 2) for k in keys}
    result = {"runs": runs, "gain_points": gains, "mean_gain_points": gains["mean"], "minutes": args.minutes}
    (out / "accuracy_gain.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
