"""The demo's chain end to end at tiny budgets (`make demo`'s pipeline with step_overrides): curate -> SFT -> GRPO
-> HF export -> evaluation through NeMo-Run's local executor, each stage's output checked against what the next
stage expects, the live progress each stage reported, and the run's record (stage times, commit, report).
Generation goes through the transformers backend here: what is under test is the hand-over between stages; the
vLLM paths of evaluation and GRPO have their own end-to-end tests (test_eval_e2e.py, test_grpo_loop.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PER_LEVEL = 3  # held-out problems per level in both evaluations (4 levels)
SHORT = {
    "curate": ["embedded_problems.n_per_level=12", "generation.n_samples=1"],
    "eval_base": [f"benchmarks=[{{name: embedded, levels: [1, 2, 3, 4], n_per_level: {PER_LEVEL}}}]",
                  "generation.backend=hf"],
    "sft": ["training.max_steps=8", "training.warmup_steps=2", "validation.every_steps=0", "checkpoint.every_steps=4"],
    # language and overlong rewards differ inside a group even for a weak policy: the update is real
    "grpo": ["grpo.steps=2", "grpo.prompts_per_step=4", "grpo.group_size=2", "grpo.micro_batch_size=4",
             "rollout.backend=hf",
             "eval.per_level=2", "prompts.pool_per_level=20", "rollout.max_tokens=48",
             "rewards.weights={accuracy: 1.0, language: 1.0, overlong: 1.0}", "rewards.overlong_cache_tokens=16"],
    "eval": [f"benchmarks=[{{name: embedded, levels: [1, 2, 3, 4], n_per_level: {PER_LEVEL}}}]",
             "generation.backend=hf"],
}


def flow(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@pytest.mark.slow
def test_the_demo_chain_at_tiny_budgets_hands_each_stage_what_the_next_expects(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    step_overrides = "{" + ", ".join(f"{k}: {flow(v)}" for k, v in SHORT.items()) + "}"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "pipeline", "--config", "nemo_configs/pipeline/embedded.yaml",
         f"run_dir={run}", f"executor.nemorun_home={tmp_path / 'nemorun'}", f"step_overrides={step_overrides}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # curate -> SFT: SFT trained on exactly the curated records
    curated = (run / "curate" / "curated.jsonl").read_text().splitlines()
    sft = json.loads((run / "sft" / "summary.json").read_text())
    assert curated and sft["data"]["records"] == len(curated)
    assert sft["data"]["train_path"] == str(run / "curate" / "curated.jsonl") and sft["steps"] == 8
    assert (run / "sft" / "checkpoints" / "latest").read_text().strip() == "8"

    # SFT -> GRPO: GRPO started from SFT's checkpoint and trained its 2 steps
    grpo_cfg = (run / "grpo" / "config.yaml").read_text()
    assert f"init_checkpoint: {run / 'sft' / 'checkpoints'}" in grpo_cfg
    # an override with spaces reaches a local torchrun stage as one argument, unquoted
    assert "weights:\n    accuracy: 1.0\n    language: 1.0\n    overlong: 1.0\n" in grpo_cfg
    assert (run / "grpo" / "checkpoints" / "latest").read_text().strip() == "2"

    # GRPO -> export -> eval: the evaluated GRPO model is the export, whose weights moved away from SFT's
    exported = load_file(run / "export" / "hf" / "model.safetensors")
    sft_weights = load_file(run / "sft" / "hf" / "model.safetensors")
    assert exported.keys() == sft_weights.keys()
    assert any(not exported[k].equal(sft_weights[k]) for k in exported)
    for label, model in (("SFT", run / "sft" / "hf"), ("GRPO", run / "export" / "hf")):
        summary = json.loads((run / "eval" / label / "summary.json").read_text())
        assert summary["model"] == str(model) and summary["benchmarks"]["embedded"]["problems"] == 4 * PER_LEVEL
    base = json.loads((run / "eval_base" / "summary.json").read_text())
    assert base["benchmarks"]["embedded"]["problems"] == 4 * PER_LEVEL

    # live progress: each training stage's last heartbeat is its last step
    for stage, steps in (("sft", 8), ("grpo", 2)):
        beat = json.loads((run / stage / ".nrr_stage" / "progress.json").read_text())
        assert (beat["task"], beat["completed"], beat["total"]) == (stage, steps, steps)

    # the run's record: every stage's time, the commit, and the paired GRPO - SFT row in the report
    info = json.loads((run / "run_info.json").read_text())
    assert set(info["stages"]) == {"curate", "eval_base", "sft", "grpo", "export", "eval"}
    assert all(s["state"] == "SUCCEEDED" and s["seconds"] > 0 for s in info["stages"].values())
    assert info["machine"]["cores"] >= 1 and info["commit"] != "unknown"
    report = (run / "report.md").read_text()
    assert "GRPO − SFT (points)" in report and f"paired on the same {4 * PER_LEVEL} problems" in report
    assert "| grpo | SUCCEEDED |" in report
