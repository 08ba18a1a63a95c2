"""`nrr curate --config nemo_configs/curate/vllm_cpu.yaml` against a real vLLM OpenAI server on CPU,
serving a tiny random-init Qwen2 with the project's tokenizer (its output is garbage: this checks
the real client path end to end, not the traces)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes import tokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ROOT / "recipes/assets/models/tiny-qwen2")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.load().save(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_curate_against_a_vllm_cpu_server(tmp_path):
    model = _tiny_model(tmp_path / "tiny-qwen2")
    port = _free_port()
    log = open(tmp_path / "vllm.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                               "--dtype", "float32", "--max-model-len", "512", "--port", str(port)],
                              stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not come up in 300 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        out = tmp_path / "curate"
        r = subprocess.run(
            [sys.executable, "-m", "recipes.cli", "curate", "--config", "nemo_configs/curate/vllm_cpu.yaml",
             "--no-progress", f"output_dir={out}", f"input.path={out}/problems.jsonl",
             f"generation.base_url=http://127.0.0.1:{port}/v1", f"generation.model={model}"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-4000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

    report = json.loads((out / "report.json").read_text())
    gen = report["stages"][1]
    assert gen["stage"] == "generate" and gen["in"] == gen["out"] == 8 * 2  # every request answered by vLLM
    results = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(results) == 16 and all(r["status"] == "ok" and r["teacher"] == str(model) for r in results)
    assert {r["finish_reason"] for r in results} <= {"stop", "length"}
    # random weights: nothing is a well-formed correct trace, and every removal has its reason
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) + report["corpus"] == 16 and all(r["reason"] for r in rejected)
