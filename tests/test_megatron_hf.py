"""megatron-core engine: HF <-> Megatron conversion (bitwise round trips, logits equal to transformers, vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests/megatron_scripts"


def run_script(args: list[str], timeout: int = 300, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3"])
def test_hf_roundtrip_is_bitwise_and_logits_match_transformers(tmp_path, family):
    proc = run_script([str(SCRIPTS / "hf_roundtrip.py"), family, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bitwise"] is True
    assert report["reimport_bitwise"] is True
    assert report["logit_scale"] > 1.0  # logits are not trivially tiny
    assert report["max_logit_diff"] < 1e-4
    exported = tmp_path / "hf_out"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (exported / name).exists(), name
    assert "<think>" in json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]


def test_hf_weight_names_follow_the_families():
    from recipes.megatron import hf_mapping, providers

    qwen2 = providers.load_hf_config(ROOT / "recipes/assets/models/tiny-qwen2")
    llama = providers.load_hf_config(ROOT / "recipes/assets/models/tiny-llama3")
    q = hf_mapping.hf_weight_names(qwen2)
    ll = hf_mapping.hf_weight_names(llama)
    assert "model.layers.3.self_attn.q_proj.bias" in q and "lm_head.weight" not in q  # tied + qkv bias
    assert "lm_head.weight" in ll and not any(n.endswith(".bias") for n in ll)  # untied, no bias
    assert len(q) == 1 + 4 * 12 + 1 and len(ll) == 1 + 4 * 9 + 2


def test_rope_llama3_scaling_matches_transformers():
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from recipes.megatron import providers

    hf = providers.load_hf_config(ROOT / "recipes/assets/models/tiny-llama3")
    cfg = AutoConfig.for_model(**hf)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = providers.rope_inv_freq(hf)
    plain = 1.0 / (hf["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32))
    assert torch.allclose(ours, ref, rtol=0, atol=0)
    assert not torch.allclose(ours, plain)  # scaling changed the low frequencies


def test_tokenizer_model_mismatch_is_a_clear_error(tmp_path):
    from recipes.megatron.hf_checkpoint import init_tiny_checkpoint
    from recipes.megatron import providers

    from recipes import tokenizer

    hf = providers.load_hf_config(ROOT / "recipes/assets/models/tiny-qwen2")
    hf["vocab_size"] = 200  # the byte tokenizer has 262 tokens
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"no tokenizer here"):  # a config needs its tokenizer beside it
        init_tiny_checkpoint(bad, tmp_path / "ckpt")
    tokenizer.load().save(tmp_path)
    with pytest.raises(ValueError, match=r"262 tokens but the model has 200 embedding rows"):
        init_tiny_checkpoint(bad, tmp_path / "ckpt")
    proc = run_script(["-m", "recipes.cli", "convert", "init", "--config", str(bad), "--out", str(tmp_path / "c")],
                      timeout=120)
    assert proc.returncode == 2
    assert "262 tokens but the model has 200 embedding rows" in proc.stderr and not (tmp_path / "c").exists()
    assert str(bad) in proc.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_cli_converts_at_tp2_under_torchrun(tmp_path):
    """`nrr convert init` then `to-hf --tp 2` (re-launched under torch.distributed.run) then `from-hf --tp 2`."""
    from recipes.megatron import hf_mapping

    ck = tmp_path / "base"
    assert run_script(["-m", "recipes.cli", "convert", "init", "--config",
                       str(ROOT / "recipes/assets/models/tiny-llama3"), "--out", str(ck), "--seed", "3"]).returncode == 0
    proc = run_script(["-m", "recipes.cli", "convert", "to-hf", "--ckpt", str(ck), "--out", str(tmp_path / "hf"),
                       "--tp", "2"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "launching 2 ranks" in proc.stderr
    proc = run_script(["-m", "recipes.cli", "convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out",
                       str(tmp_path / "back"), "--tp", "2"])
    assert proc.returncode == 0, proc.stderr[-6000:]
    proc = run_script(["-m", "recipes.cli", "convert", "to-hf", "--ckpt", str(tmp_path / "back"), "--out",
                       str(tmp_path / "hf2")])
    assert proc.returncode == 0, proc.stderr[-6000:]
    a, b = hf_mapping.read_hf_weights(tmp_path / "hf"), hf_mapping.read_hf_weights(tmp_path / "hf2")
    assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a)
    assert float(a["model.layers.0.mlp.gate_proj.weight"].std()) > 0.01  # a real random init, not zeros


@pytest.mark.slow
@pytest.mark.vllm
def test_exported_model_generates_in_vllm_like_transformers(tmp_path):
    proc = run_script([str(SCRIPTS / "vllm_generate.py"), str(tmp_path)], timeout=600,
                      VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    assert proc.returncode == 0, proc.stderr[-8000:]
    report = json.loads((tmp_path / "vllm_report.json").read_text())
    assert len(report["vllm"]) == 3 and all(len(ids) == 12 for ids in report["vllm"])
    assert report["vllm"] == report["hf"]
