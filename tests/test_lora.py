"""LoRA on megatron-core (recipes/megatron/lora.py): exact at init, merged == unmerged, adapters only trained and
saved, the same across TP/PP layouts, and the PEFT export loads with `peft` onto the HF base.

The layouts run tests/megatron_scripts/lora_checks.py in the shared megatron worker launch (tests/megatron_scripts/
run_many.py): TP=2 trains 3 steps and saves adapters; PP=2 and TP=1 load them; TP=1 also trains from the same
start (its losses must equal TP=2's), exports base / merged / PEFT adapter, and provokes the bad-input errors.
vLLM (CPU) then serves the PEFT adapter on the base as a LoRARequest (tests/megatron_scripts/vllm_lora.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOL = 1e-5

WORKER_RUNS = [
    (2, "lora_checks", ["--tp", "2", "--hf", "{work}/hf", "--out", "{work}/tp2.json", "--train",
                        "--save", "{work}/ckpt_tp2"]),
    (2, "lora_checks", ["--pp", "2", "--hf", "{work}/hf", "--out", "{work}/pp2.json", "--load", "{work}/ckpt_tp2"]),
    (1, "lora_checks", ["--hf", "{work}/hf", "--out", "{work}/tp1.json", "--train", "--save", "{work}/ckpt_tp1",
                        "--export", "{work}/export"]),
    (1, "lora_checks", ["--hf", "{work}/hf", "--out", "{work}/tp1_load.json", "--load", "{work}/ckpt_tp2"]),
]


@pytest.fixture(scope="module")
def work(megatron_workers):
    return megatron_workers[__name__]


@pytest.fixture(scope="module")
def runs(work) -> dict[str, dict]:
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("tp1", "tp2", "pp2", "tp1_load")}


def _max_diff(a, b) -> float:
    flat_a = [x for row in a for x in row]
    flat_b = [x for row in b for x in row]
    assert len(flat_a) == len(flat_b) > 0
    return max(abs(x - y) for x, y in zip(flat_a, flat_b))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp1_load"])
def test_zero_b_gives_the_base_model_exactly(runs, layout):
    assert runs[layout]["zero_b_exact"] is True


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_merged_weights_give_the_adapted_model(runs, layout):
    # float32 model: merging changes only the rounding of W + s*B@A vs W x + s*B(A x)
    assert runs[layout]["merged_vs_unmerged"] < TOL
    assert runs[layout]["merged_differs_from_base"] > 1e-2  # the adapters learned something to merge
    assert runs[layout]["refit_is_merged"] is True  # GRPO's refit into vLLM sends the merged weights


@pytest.mark.slow
def test_training_equal_at_tp1_and_tp2(runs):
    for a, b in zip(runs["tp1"]["losses"], runs["tp2"]["losses"]):
        assert b == pytest.approx(a, abs=TOL)
    assert len(set(runs["tp2"]["losses"])) == 3


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_only_adapters_train_and_hold_optimizer_state(runs, layout):
    r = runs[layout]
    assert r["trainable"] == ["lora_A", "lora_B"] and r["grads_on"] == ["lora_A", "lora_B"]
    assert r["frozen_changed"] == 0 and r["b_nonzero"] is True
    # Adam's exp_avg + exp_avg_sq in fp32 for this rank's adapter elements, nothing for the base
    assert r["optimizer_bytes"] == 2 * 4 * r["adapter_numel"]


@pytest.mark.slow
def test_checkpoint_holds_adapters_only_and_reshards(runs, work):
    keys = runs["tp2"]["saved_keys"]
    assert keys and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in keys)
    assert json.loads((work / "ckpt_tp2/iter_0000003/adapter.json").read_text())["base_sha256"]
    trained = runs["tp2"]["logprobs_trained"]
    for layout in ("pp2", "tp1_load"):
        assert _max_diff(runs[layout]["logprobs_trained"], trained) < TOL
    assert runs["tp1_load"]["peft_sum"] == pytest.approx(runs["tp2"]["peft_sum"], rel=1e-6)


@pytest.mark.slow
def test_bad_input_errors(runs):
    errors = runs["tp1_load"]["errors"]
    assert "another base model" in errors["hash_mismatch"]
    assert "['q_proj']" in errors["no_match"] and "linear_qkv" in errors["no_match"]
    assert "peft.lora.r=100000 is larger than the layer" in errors["rank_too_large"]


@pytest.mark.slow
def test_peft_adapter_on_the_hf_base_gives_the_merged_logits(work):
    import torch
    import transformers
    from peft import PeftModel

    export = work / "export"
    config = json.loads((export / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    tokens = torch.randint(0, 262, (2, 24), generator=torch.Generator().manual_seed(3))
    base = transformers.AutoModelForCausalLM.from_pretrained(export / "base", dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, export / "adapter").eval()
        peft_logits = adapted(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(export / "merged", dtype=torch.float32).eval()
        merged_logits = merged(tokens).logits
    # float32, logits up to ~5 in size: the merged and unmerged products round differently in the 6th digit
    assert (peft_logits - merged_logits).abs().max() < 1e-4
    assert (peft_logits - base_logits).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_adapter_like_the_merged_weights(work):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(root / "tests/megatron_scripts/vllm_lora.py"), str(work / "export")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]
    report = json.loads((work / "export" / "vllm_lora.json").read_text())
    assert len(report["lora"]) == 3 and all(len(ids) == 12 for ids in report["lora"])
    assert report["lora"] == report["merged"]
    assert report["lora"] != report["base"]  # the adapter changed what the model generates
