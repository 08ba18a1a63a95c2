"""SFT with `peft.lora.*` end to end (one process each, as `nrr sft` runs them): a run SIGKILLed mid-way and resumed
ends bit-identical to an uninterrupted one (adapter dropout on, so the RNG streams must resume too), and
`nrr convert to-hf` exports its adapter checkpoint merged (`--merge-lora`) and as a PEFT adapter (`--lora-adapter`)
exactly as the run's own end-of-run exports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SFT = ROOT / "tests" / "sft_scripts" / "run_sft.py"
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
TIMING = {"time", "step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu"}
LORA = ["data.task.n_per_level=60", "data.task.valid_per_level=4", "training.global_batch_size=8",
        "training.micro_batch_size=4", "training.max_steps=6", "training.warmup_steps=2", "training.lr=0.01",
        "checkpoint.every_steps=2", "checkpoint.keep_last=5", "validation.every_steps=0",
        "logging.tensorboard=false", "peft.lora.enabled=true", "peft.lora.r=4", "peft.lora.alpha=8",
        "peft.lora.dropout=0.1"]


def _run(cmd, expect_rc=0, **kwargs):
    proc = subprocess.run([PY, *map(str, cmd)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
                          **kwargs)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"{cmd} -> rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a, b):
    a, b = _tensors(a), _tensors(b)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and (a[name] == b[name]).all(), name


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "full"
    _run([RUN_SFT, f"output_dir={run}", *LORA])
    return run


@pytest.mark.slow
def test_lora_sft_sigkilled_mid_run_resumes_bit_for_bit(tmp_path, lora_run):
    run = tmp_path / "killed"
    args = [f"output_dir={run}", *LORA]
    # the process SIGKILLs its own session right before step 4 of 6 (steps 2's checkpoint written, 3's not)
    proc = _run([RUN_SFT, "--kill-before-step", "3", *args], expect_rc=None, start_new_session=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "2"
    _run([RUN_SFT, *args])
    assert json.loads((run / "summary.json").read_text())["start_step"] == 2
    assert _rows(run) == _rows(lora_run)
    assert len({r["loss"] for r in _rows(run) if "loss" in r}) == 6
    _same(lora_run / "hf" / "model.safetensors", run / "hf" / "model.safetensors")
    _same(lora_run / "hf_lora" / "adapter_model.safetensors", run / "hf_lora" / "adapter_model.safetensors")


@pytest.mark.slow
def test_convert_exports_a_lora_checkpoint_merged_and_as_peft_adapter(tmp_path, lora_run):
    ckpt = lora_run / "checkpoints"
    refused = _run(["-m", "recipes.convert", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "plain"], expect_rc=2)
    assert "--merge-lora" in refused.stderr and "--lora-adapter" in refused.stderr
    _run(["-m", "recipes.convert", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "merged", "--merge-lora"])
    _same(lora_run / "hf" / "model.safetensors", tmp_path / "merged" / "model.safetensors")
    _run(["-m", "recipes.convert", "to-hf", "--ckpt", ckpt, "--out", tmp_path / "adapter", "--lora-adapter"])
    _same(lora_run / "hf_lora" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    # the adapters only: base weights stay with the base (the merged export holds them)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes * 5 < (tmp_path / "merged" / "model.safetensors").stat().st_size


def test_tiny_cpu_lora_yaml_loads_and_checks():
    from recipes.config import load_config, resolve_path
    from recipes.trainer import SFTConfig, check_config, lora_of

    cfg = load_config(SFTConfig, resolve_path("nemo_configs/sft/tiny_cpu_lora.yaml"))
    check_config(cfg)
    assert lora_of(cfg).r == 8 and cfg.model.init_checkpoint == "runs/sft-tiny/hf"
    bad = load_config(SFTConfig, resolve_path("nemo_configs/sft/tiny_cpu_lora.yaml"),
                      ["peft.lora.target_modules=[q_proj]"])
    with pytest.raises(ValueError, match=r"peft.lora.target_modules: \['q_proj'\] match no adaptable layer"):
        check_config(bad)


def test_grpo_takes_peft_lora():
    from recipes.config import ConfigError, load_config, resolve_path
    from recipes.grpo import GRPOConfig, check_config
    from recipes.trainer import lora_of

    path = resolve_path("nemo_configs/grpo/tiny_cpu.yaml")
    cfg = load_config(GRPOConfig, path, ["peft.lora.enabled=true", "peft.lora.r=16"])
    check_config(cfg)
    assert lora_of(cfg).r == 16 and lora_of(load_config(GRPOConfig, path)) is None
    with pytest.raises(ConfigError, match=r"peft.lora.r must be >= 1"):
        check_config(load_config(GRPOConfig, path, ["peft.lora.enabled=true", "peft.lora.r=0"]))


@pytest.mark.slow
def test_bench_sft_reports_lora_against_full_fine_tuning(tmp_path):
    out = tmp_path / "bench.json"
    _run(["-m", "recipes.cli", "bench", "sft", "n_per_level=20", "steps=1", "seq_length=128", "micro_batch_size=2",
          "lora_r=4", "--output", out])
    result = json.loads(out.read_text())
    lora, full = result["lora"], result["packed"]
    # Adam's two fp32 moments per trainable element (an fp32 model: no separate main weights), adapters only
    assert lora["optimizer_bytes"] == 8 * lora["trainable_params"] and full["optimizer_bytes"] == 8 * full[
        "trainable_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    assert result["lora_vs_full"]["optimizer_bytes"] == [lora["optimizer_bytes"], full["optimizer_bytes"]]
    assert lora["step_s"] > 0 and full["step_s"] > 0
