"""On-policy distillation and KDRL in the GRPO loop: the per-token signals by hand, the config's bad inputs, the
teacher/student tokenizer check, and runs where the teacher really shapes the student."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.config import ConfigError, load_config
from recipes.distillation import (DistillConfig, build_frozen_teacher, check_distill, connect_teacher_endpoint,
                                  kl_coef_at, kl_rows, on_policy_advantages)
from recipes.generation.openai_endpoint import EndpointCapabilityError, OpenAIBackend, logprobs_of_tokens
from recipes.grpo import GRPOConfig, check_config
from recipes.metrics import read_metrics
from recipes.trainer import ModelConfig, ParallelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/assets/models/tiny-qwen2"


def test_on_policy_advantages_by_hand():
    teacher = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -3.0, -1.0, -1.0]])
    student = torch.tensor([[-1.5, -1.0, -0.5, -0.2], [-0.3, -2.0, -4.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    reward_adv = torch.tensor([1.0, -0.5])
    adv = on_policy_advantages(teacher, student, mask, reward_adv, DistillConfig(teacher="t", coef=2.0))
    # 2 * (teacher - student) inside the responses, 0 outside
    assert torch.allclose(adv, torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.4, -2.0, 6.0, 0.0]]))
    mixed = on_policy_advantages(teacher, student, mask, reward_adv,
                                 DistillConfig(teacher="t", coef=1.0, reward_weight=0.5))
    # + 0.5 * the row's reward advantage on its response tokens only
    assert torch.allclose(mixed, torch.tensor([[0.0, -0.5, 0.5, 0.0], [-0.05, -1.25, 2.75, 0.0]]))


def test_kdrl_schedule_and_reward_guided_rows():
    cfg = DistillConfig(teacher="t", mode="kdrl", kl_coef=0.2, kl_coef_end=0.0)
    assert [round(kl_coef_at(cfg, s, 5), 6) for s in range(5)] == [0.2, 0.15, 0.1, 0.05, 0.0]
    assert kl_coef_at(DistillConfig(teacher="t", mode="kdrl", kl_coef=0.3), 7, 10) == 0.3  # constant
    rewards = torch.tensor([1.0, 0.0, 0.5, -0.2])
    assert kl_rows(rewards, cfg).tolist() == [False, True, False, True]
    assert kl_rows(rewards, DistillConfig(teacher="t", mode="kdrl", reward_guided=False)).all()


def test_bad_distill_settings_are_config_errors():
    for override, message in [("distill.kl_coef=1.5", r"distill.kl_coef=1.5: .* \[0, 1\]"),
                              ("distill.kl_coef_end=-0.1", r"distill.kl_coef_end=-0.1: .* \[0, 1\]"),
                              ("distill.mode=sft", "'distill.mode' must be one of 'on_policy' | 'kdrl' | 'topk', "
                                                   "got 'sft'"),
                              ("distill.coef=0", "needs a positive teacher weight"),
                              ("distill.top_k=0", r"distill.top_k=0: .* \(>= 1\)"),
                              ("distill.alpha=1.5", r"distill.alpha=1.5: .* \[0, 1\]"),
                              ("distill.kind=jsd", "'distill.kind' must be one of 'forward' | 'reverse' | 'mixed', "
                                                   "got 'jsd'"),
                              ("parallel.pp=2", "distill.mode=topk runs without pipeline parallelism: "
                                                "parallel.pp=2")]:
        overrides = ["distill.teacher=t", "distill.mode=kdrl", override] if "kl_coef" in override \
            else ["distill.teacher=t", "distill.mode=topk", override] if "mode" not in override \
            else ["distill.teacher=t", override]
        with pytest.raises(ConfigError, match=message):
            check_config(load_config(GRPOConfig, None, overrides))
    with pytest.raises(ConfigError, match="share the loss's one KL term"):
        check_config(load_config(GRPOConfig, None, ["distill.teacher=t", "distill.mode=kdrl", "loss.kl_coef=0.1"]))
    check_distill(DistillConfig(kl_coef=7.0))  # no teacher: the section is not used


def test_bad_endpoint_teacher_settings_are_config_errors(monkeypatch):
    url = ["distill.teacher_url=http://127.0.0.1:1/v1", "distill.teacher_model=teacher"]
    for overrides, message in [
            (["distill.teacher=t", *url], "distill.teacher and distill.teacher_url are both set"),
            (["distill.teacher_url=http://127.0.0.1:1/v1"], "needs distill.teacher_model"),
            ([*url, "rollout.temperature=0.7"], r"rollout.temperature=0.7: the endpoint scores the teacher at "
                                                r"temperature 1 .* set rollout.temperature=1.0"),
            ([*url, "distill.teacher_hf_config=x.json"], "teacher_hf_config describes a checkpoint teacher"),
            ([*url, "distill.mode=kdrl", "loss.kl_coef=0.1"], "share the loss's one KL term"),
            ([*url, "distill.mode=topk"], "distill.mode=topk with distill.teacher_url: .* give the teacher as a "
                                          "checkpoint")]:
        with pytest.raises(ConfigError, match=message):
            check_config(load_config(GRPOConfig, None, overrides))
    check_config(load_config(GRPOConfig, None, [*url, "distill.mode=kdrl"]))
    monkeypatch.delenv("NRR_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match="distill.teacher_api_key_env names the env var 'NRR_TEST_TEACHER_KEY'"):
        connect_teacher_endpoint(DistillConfig(teacher_url="http://127.0.0.1:1/v1", teacher_model="t",
                                               teacher_api_key_env="NRR_TEST_TEACHER_KEY"), None)


def test_an_endpoint_without_prompt_log_probs_or_a_tokenizer_cannot_be_the_teacher():
    from recipes import tokenizer
    from recipes.teacher.server import TeacherServer, TeacherServerConfig

    with TeacherServer(TeacherServerConfig()) as server:  # the project's teacher: text completions only
        endpoint = OpenAIBackend(server.base_url, server.cfg.model, api_key_env=None)
        with pytest.raises(EndpointCapabilityError, match=rf"the endpoint {server.base_url} refused a prompt log-prob "
                                                          r"request \(HTTP 400: .*'prompt' must be a non-empty "
                                                          r"string.*\): a teacher endpoint must .*prompt_logprobs"):
            endpoint.prompt_logprobs([[5, 6, 7]])
        endpoint.close()
        cfg = DistillConfig(teacher_url=server.base_url, teacher_model=server.cfg.model)
        with pytest.raises(ConfigError, match=rf"distill.teacher_url={server.base_url}: the endpoint .* has no "
                                              r"tokenizer route: POST http://127.0.0.1:\d+/tokenize answered HTTP "
                                              r"404 .*cannot be checked against the student's"):
            connect_teacher_endpoint(cfg, tokenizer.load())
    # what a server that took the request but returned no (or other) prompt log-probs hands back
    with pytest.raises(EndpointCapabilityError, match="answered without prompt log-probs"):
        logprobs_of_tokens(None, [5, 6], "http://x/v1")
    with pytest.raises(EndpointCapabilityError, match="returned 1 prompt log-probs for a prompt of 2 tokens"):
        logprobs_of_tokens([None], [5, 6], "http://x/v1")
    with pytest.raises(EndpointCapabilityError, match="no log-prob for token 6 at position 1"):
        logprobs_of_tokens([None, {"7": {"logprob": -0.1}}], [5, 6], "http://x/v1")
    entries = [None, {"6": {"logprob": -1.5, "rank": 3}, "9": {"logprob": -0.2, "rank": 1}}, {"6": {"logprob": -0.7}}]
    assert logprobs_of_tokens(entries, [5, 6, 6], "http://x/v1") == [-1.5, -0.7]


def make_teacher(folder: Path, seed: int, tokenizer_from: Path = TINY) -> Path:
    """A teacher in HF format: the tiny architecture with its own random weights, and a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(TINY, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    token = next(t for t in vocab if t not in ("<|endoftext|>",) and len(t) == 1)
    vocab[token + "\u2063"] = vocab.pop(token)  # the same size, one token spelled differently
    (other / "tokenizer.json").write_text(json.dumps(spec))
    teacher = make_teacher(tmp_path / "teacher", seed=7, tokenizer_from=other)
    with pytest.raises(ConfigError, match="is not the student's"):
        build_frozen_teacher(str(teacher), None, ModelConfig(hf_config=str(TINY / "config.json")),
                             ParallelConfig(), seed=0, dtype=torch.float32)


def _grpo(run_dir: Path, *overrides: str) -> list[dict]:
    args = [f"output_dir={run_dir}", "model.init_checkpoint=null", "grpo.prompts_per_step=4", "grpo.group_size=4",
            "grpo.micro_batch_size=8", "grpo.minibatches=2", "rollout.backend=hf", "rollout.max_tokens=24",
            "eval.levels=[]", "logging.progress=false", "training.lr=1.0e-3", "training.min_lr=1.0e-3",
            "checkpoint.every_steps=0", "logging.tensorboard=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "recipes.grpo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [r for r in read_metrics(run_dir) if "reward/mean" in r]


@pytest.mark.slow
def test_on_policy_distillation_pulls_the_student_to_its_teacher_and_kdrl_follows_its_schedule(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", seed=7)
    rows = _grpo(tmp_path / "opd", f"distill.teacher={teacher}", "distill.mode=on_policy", "grpo.steps=6",
                 "rewards.weights={accuracy: 1.0}")
    gaps = [r["distill/reverse_kl"] for r in rows]
    assert len(gaps) == 6 and gaps[0] > 0.05, gaps  # two random inits disagree
    assert max(gaps[-2:]) < 0.5 * gaps[0], gaps  # the student's own samples now score close to the teacher's

    rows = _grpo(tmp_path / "kdrl", f"distill.teacher={teacher}", "distill.mode=kdrl", "distill.kl_coef=0.2",
                 "distill.kl_coef_end=0.0", "grpo.steps=3", "rewards.weights={accuracy: 1.0}")
    assert [round(r["distill/kl_coef"], 6) for r in rows] == [0.2, 0.1, 0.0]
    # a random student earns no reward: reward-guided masking leaves the KL term on every response
    assert [r["distill/kl_rows"] for r in rows] == [1.0, 1.0, 1.0]
    assert rows[0]["kl"] > 0  # the KL to the teacher is measured on the trained tokens

    # top-k: the student's distribution on the teacher's 16 likeliest tokens per position pulled to the teacher's
    rows = _grpo(tmp_path / "topk", f"distill.teacher={teacher}", "distill.mode=topk", "distill.top_k=16",
                 "grpo.steps=3", "rewards.weights={accuracy: 1.0}")
    kls = [r["distill/topk_kl"] for r in rows]
    assert len(kls) == 3 and kls[0] > 0.02, kls
    assert kls[-1] < 0.3 * kls[0], kls


def test_nrr_distill_requires_a_teacher(capsys):
    from recipes.cli import main

    assert main(["distill", "distill.teacher=null"]) == 2
    assert "nrr distill needs a teacher" in capsys.readouterr().err
    assert main(["distill", "mode=rejection_sample"]) == 2
    assert "rejection sampling is `nrr grpo rejection-sample`" in capsys.readouterr().err

