"""`nrr curate --config nemo_configs/curate/vllm_cpu.yaml` against a real vLLM OpenAI server on CPU,
serving a tiny random-init Qwen2 with the project's tokenizer (its output is garbage: this checks
the real client path end to end, not the traces). The same server is then the teacher of on-policy
distillation behind an endpoint (`distill.teacher_url`): its prompt log-probs against transformers', the
tokenizer check, and a short GRPO run that uses it."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

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
        url = f"http://127.0.0.1:{port}/v1"
        _endpoint_teacher_scores_as_transformers(model, url, tmp_path)
        _grpo_distills_from_the_endpoint(model, url, tmp_path / "opd")
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


def _endpoint_teacher_scores_as_transformers(model: Path, url: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from recipes import tokenizer
    from recipes.config import ConfigError
    from recipes.distillation import (DistillConfig, check_endpoint_tokenizer, connect_teacher_endpoint,
                                      endpoint_teacher_logprobs)
    from recipes.generation.openai_endpoint import EndpointCapabilityError
    from recipes.grpo import Group, build_batch

    tok = tokenizer.load(model)
    endpoint = connect_teacher_endpoint(DistillConfig(teacher_url=url, teacher_model=str(model)), tok)  # ids agree
    prompts = [tok.prompt_ids("Compute 2 + 3."), tok.prompt_ids("Compute (7 - 4) * 6.")]
    responses = [tok.encode(text) for text in ("<think>\n2 + 3 = 5\n</think>\n\\boxed{5}", "18", "\\boxed{21} or not")]
    groups = [Group({"id": i}, prompt, resp, [False, False], [0.0, 1.0], {})
              for i, (prompt, resp) in enumerate([(prompts[0], responses[:2]), (prompts[1], responses[1:])])]
    batch = build_batch(groups, True, tok.pad_id)
    rows = [gr.prompt + r for gr in groups for r in gr.responses]
    got = endpoint_teacher_logprobs(endpoint, rows, batch["tokens"].shape[1])
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():  # right padding: a row's own positions see none of it
        want = hf(batch["tokens"]).logits.float().log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]
    for i, row in enumerate(rows):  # every position of the row, aligned with labels as the trainer's log-probs
        assert torch.allclose(got[i, :len(row) - 1], want[i, :len(row) - 1], atol=1e-4, rtol=0), i
        assert (got[i, len(row) - 1:] == 0).all()
    assert (batch["loss_mask"] * got).abs().sum() > 0
    # a row longer than the served context (--max-model-len 512) is named as such, with its length
    with pytest.raises(EndpointCapabilityError, match="cannot score a row of 600 tokens: it is longer than the "
                                                      "served model's context"):
        endpoint.prompt_logprobs([[5] * 600])

    # a student whose tokenizer gives two digits each other's ids
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (other / name).write_bytes((model / name).read_bytes())
    spec = json.loads((model / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["3"], vocab["7"] = vocab["7"], vocab["3"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=rf"the endpoint's tokenizer \(model {model}\) is not the student's "
                                          rf"\({other}\)"):
        check_endpoint_tokenizer(endpoint, tokenizer.load(other))
    endpoint.close()


def _grpo_distills_from_the_endpoint(model: Path, url: str, run_dir: Path) -> None:
    from recipes.metrics import read_metrics

    args = [f"output_dir={run_dir}", "model.init_checkpoint=null", "grpo.steps=2", "grpo.prompts_per_step=2",
            "grpo.group_size=4", "grpo.micro_batch_size=4", "grpo.minibatches=2", "rollout.backend=hf",
            "rollout.max_tokens=16", "eval.levels=[]", "logging.progress=false", "logging.tensorboard=false",
            "checkpoint.every_steps=0", f"distill.teacher_url={url}", f"distill.teacher_model={model}",
            "distill.mode=on_policy"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "recipes.grpo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    gaps = [r["distill/reverse_kl"] for r in read_metrics(run_dir) if "reward/mean" in r]
    # two random inits: the student's samples score lower under the teacher than under the student itself
    assert len(gaps) == 2 and all(math.isfinite(g) and g > 0 for g in gaps), gaps
