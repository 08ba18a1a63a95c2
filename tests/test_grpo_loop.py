"""The GRPO loop's pieces (configs, prompt sampler, batch layout, rejection sampling) and an end-to-end
run with vLLM rollouts whose resume from a checkpoint replays the uninterrupted run exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import response_format as ct
from recipes import task
from recipes.config import ConfigError, load_config
from recipes.grpo import GRPOConfig, Group, PromptSampler, PromptsConfig, build_batch, check_config, split_rows
from recipes.metrics import read_metrics
from recipes.rl.rejection_sampling import select_correct, to_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny_cpu", "dapo_tiny_cpu", "drgrpo_tiny_cpu", "opd_tiny_cpu", "kdrl_tiny_cpu"])
def test_configs_load_and_validate(name):
    cfg = load_config(GRPOConfig, ROOT / "nemo_configs" / "grpo" / f"{name}.yaml")
    check_config(cfg)
    assert (cfg.loss.variant, cfg.distill.teacher is not None and cfg.distill.mode) == {
        "tiny_cpu": ("grpo", False), "dapo_tiny_cpu": ("dapo", False), "drgrpo_tiny_cpu": ("dr_grpo", False),
        "opd_tiny_cpu": ("grpo", "on_policy"), "kdrl_tiny_cpu": ("grpo", "kdrl")}[name]


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_config(load_config(GRPOConfig, None, ["grpo.prompts_per_step=3", "grpo.group_size=4"]))
    with pytest.raises(ConfigError, match="unknown reward"):
        check_config(load_config(GRPOConfig, None, ["rewards.weights={acc: 1.0}"]))
    with pytest.raises(ConfigError, match="unknown key 'loss.varient'"):
        load_config(GRPOConfig, None, ["loss.varient=dapo"])


def test_prompt_sampler_is_a_function_of_step():
    s1, s2 = PromptSampler(PromptsConfig(levels=[2, 3], pool_per_level=50)), \
        PromptSampler(PromptsConfig(levels=[2, 3], pool_per_level=50))
    assert [p["id"] for p in s1.batch(7, 8)] == [p["id"] for p in s2.batch(7, 8)]
    assert [p["id"] for p in s1.batch(7, 8)] != [p["id"] for p in s1.batch(8, 8)]
    assert [p["id"] for p in s1.batch(7, 8, round_=1)] != [p["id"] for p in s1.batch(7, 8)]
    assert {p["level"] for p in s1.batch(0, 64)} == {2, 3}
    heldout = {p.question for p in task.heldout_problems([2, 3], 200)}
    assert not heldout & {p["problem"] for pool in s1.pools.values() for p in pool}


def test_prompt_sets_from_a_dataset_gsm8k_and_code(tmp_path, data_root):
    """GSM8K train prompts (the shipped copy) with their `#### N` answers, and a code prompt set whose tests reach
    the `code` reward."""
    from recipes.rl.rewards import RewardsConfig, Sample, score

    gsm8k = data_root / "gsm8k" / "train.jsonl"
    sampler = PromptSampler(PromptsConfig(dataset=str(gsm8k), limit=20))
    first = json.loads(gsm8k.read_text().splitlines()[0])
    pool = sampler.pools[None]
    assert len(pool) == 20 and pool[0]["problem"] == first["question"]
    assert pool[0]["answer"] == first["answer"].split("####")[-1].strip().replace(",", "")
    assert [p["id"] for p in sampler.batch(3, 5)] == [p["id"] for p in PromptSampler(sampler.cfg).batch(3, 5)]

    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"id": "c1", "prompt": "Print the sum of two integers read from stdin.",
                                "tests": [{"stdin": "2 3\n", "stdout": "5"}, {"stdin": "7 1\n", "stdout": "8"}]}) + "\n")
    (prompt,) = PromptSampler(PromptsConfig(dataset=str(code))).pools[None]
    right = ct.format_response("read, add", "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    wrong = ct.format_response("read, add", "```python\nprint(0)\n```")
    rewards, parts = score([Sample(r, prompt["answer"] or "", tests=prompt["tests"]) for r in (right, wrong)],
                           RewardsConfig(weights={"code": 1.0}))
    assert parts["code"] == [1.0, 0.0] and rewards == [1.0, 0.0]


def test_batch_layout_masks_exactly_the_response():
    g = Group(problem={}, prompt=[1, 2, 3], responses=[[10, 11], [12, 13, 14, 259]], truncated=[True, False],
              rewards=[0.0, 1.0], parts={})
    b = build_batch([g], std_normalize=False, pad_id=257)
    assert b["tokens"].shape == (2, 8)
    assert b["tokens"][1, :7].tolist() == [1, 2, 3, 12, 13, 14, 259]
    # position t predicts labels[t] = tokens[t+1]: the mask covers positions whose label is a response token
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert b["loss_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert [b["labels"][1, t].item() for t in range(2, 6)] == [12, 13, 14, 259]
    assert b["adv"].tolist() == [-0.5, 0.5]


def test_update_rows_are_cut_to_their_longest_response():
    short = Group(problem={}, prompt=[1, 2, 3], responses=[[10, 11], [12, 259]], truncated=[False, False],
                  rewards=[0.0, 1.0], parts={})
    long = Group(problem={}, prompt=[1, 2, 3], responses=[[10] * 14, [11, 259]], truncated=[True, False],
                 rewards=[0.0, 1.0], parts={})
    b = build_batch([short, long], std_normalize=True, pad_id=257)
    b["old_logp"] = torch.randn(b["tokens"].shape)
    assert b["tokens"].shape == (4, 24)  # prompt 3 + 14 response tokens, rounded up to 8
    few = split_rows(b, [0, 1, 3], mbs=2)  # without the long response: 3 + 2 tokens fit in 8 columns
    assert [m["tokens"].shape for m in few] == [(2, 8), (1, 8)]
    for key in ("tokens", "labels", "loss_mask", "old_logp", "position_ids"):
        assert torch.equal(torch.cat([m[key] for m in few]), b[key][[0, 1, 3], :8]), key
    assert torch.equal(torch.cat([m["adv"] for m in few]), b["adv"][[0, 1, 3]])
    assert sum(float(m["loss_mask"].sum()) for m in few) == float(b["loss_mask"][[0, 1, 3]].sum())  # nothing lost
    assert [m["tokens"].shape[1] for m in split_rows(b, [2, 0], mbs=2)] == [24]


def test_rejection_sampling_keeps_verified_distinct_responses():
    p = task.generate(2, 1, seed=5)[0]
    good = task.assistant_response(p)
    bad = ct.format_response(task.cot_text(p), f"\\boxed{{{int(p.answer) + 1}}}")
    unclosed = f"<think>\n\\boxed{{{p.answer}}}"
    kept = select_correct(p.to_dict(), [bad, good, good, unclosed])
    assert kept == [good]
    rec = to_record(p.to_dict(), good, 0, {"policy": "ckpt", "samples_per_problem": 4})
    assert rec["messages"] == [{"role": "user", "content": p.question}, {"role": "assistant", "content": good}]
    assert rec["reference"] == p.answer and rec["source"] == "rejection-sampling"
    assert rec["provenance"]["policy"] == "ckpt" and rec["problem_id"] == p.id


def _grpo(run_dir, *overrides, sigterm_before_step=None, kill_before_step=None, expect_rc=0):
    # random init: length and language rewards still differ inside a group, so updates are real
    args = [f"output_dir={run_dir}", "model.init_checkpoint=null", "grpo.prompts_per_step=4", "grpo.group_size=4",
            "grpo.micro_batch_size=8", "grpo.minibatches=2", "rollout.max_tokens=24",
            "loss.max_response_tokens=24", "rewards.weights={language: 1.0, overlong: 1.0, accuracy: 1.0}",
            "rewards.overlong_max_tokens=24", "rewards.overlong_cache_tokens=12", "eval.per_level=4",
            "eval.every_steps=0", "logging.progress=false", "training.lr=1.0e-3", "training.min_lr=1.0e-3",
            "checkpoint.every_steps=1", "checkpoint.keep_last=3", "loss.kl_coef=0.05", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "recipes.grpo"]
    if sigterm_before_step is not None:
        cmd = [sys.executable, str(ROOT / "tests" / "grpo_scripts" / "run_grpo.py"), "--sigterm-before-step",
               str(sigterm_before_step)]
    if kill_before_step is not None:  # a crash: whatever non-zero code torchrun reports; the log in a file
        from tests.jobs import kill_job

        cmd = [sys.executable, str(ROOT / "tests" / "grpo_scripts" / "run_grpo.py"), "--kill-before-step",
               str(kill_before_step)]
        log = Path(run_dir).with_suffix(".log")
        with open(log, "w") as out:  # not a pipe: processes a killed rank leaves behind would hold it open
            proc = subprocess.Popen([*cmd, *args], cwd=ROOT, env={**env, "NRR_TEST_JOB": str(run_dir)}, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=600)
            finally:
                kill_job(str(run_dir))
        assert rc not in (0, 75), log.read_text()[-4000:]
        return log.read_text()
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stderr[-4000:]
    if expect_rc:
        return proc
    return [r for r in read_metrics(run_dir) if "reward/mean" in r]


@pytest.mark.slow
def test_loop_runs_and_resume_replays_exactly(tmp_path):
    full = _grpo(tmp_path / "full", "grpo.steps=3")
    assert [r["step"] for r in full] == [1, 2, 3]
    for key in ("reward/mean", "reward/language/mean", "reward/overlong/mean", "accuracy", "response_len/mean",
                "response_len/clipped_share", "kl", "entropy", "clip_fraction", "gen_seconds", "train_seconds",
                "refit_seconds"):
        assert key in full[0], key
    assert full[0]["grad_norm"] > 0 and full[1]["kl"] > 0  # real updates moved the policy from the reference
    from recipes.megatron.providers import load_hf_config
    from recipes.metrics import model_flops_per_token

    hf = load_hf_config(ROOT / "recipes/assets/models/tiny-qwen2/config.json")
    for r in full:  # the training phase's throughput: every padded row of every epoch over its time
        assert r["tokens_per_s_per_gpu"] > 0 and r["gen_tokens_per_s"] > 0
        flops = r["model_tflops_per_gpu"] * 1e12 / r["tokens_per_s_per_gpu"]
        assert model_flops_per_token(hf, 8) < flops < model_flops_per_token(hf, 512)  # rows of 8..512 tokens
    assert (tmp_path / "full" / "report" / "reward_curve.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert set(summary["eval_after"]) == {"L3", "L4", "mean"}

    # SIGTERM during step 2 (no periodic checkpoints): step 2 is saved, the exit code asks for a requeue ...
    from recipes.megatron import checkpointing
    from recipes.resume import REQUEUE_EXIT_CODE

    part = tmp_path / "part"
    _grpo(part, "grpo.steps=3", "checkpoint.every_steps=0", sigterm_before_step=1, expect_rc=REQUEUE_EXIT_CODE)
    assert [r["step"] for r in read_metrics(part) if "reward/mean" in r] == [1, 2]
    assert checkpointing.saved_steps(part / "checkpoints") == [2] and not (part / "summary.json").exists()
    # ... a changed loss is refused on resume, naming the key ...
    proc = _grpo(part, "grpo.steps=3", "loss.kl_coef=0.1", expect_rc=2)
    assert "another config: loss.kl_coef: 0.05 -> 0.1. Resume" in proc.stderr, proc.stderr[-3000:]
    # ... the same command resumes at step 3, replaying the uninterrupted run, one metrics row per step
    resumed = _grpo(part, "grpo.steps=3")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    last = resumed[-1]
    assert last["step"] == 3
    for key in ("reward/mean", "response_len/mean", "loss", "kl", "grad_norm"):
        assert last[key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_tp2_sigkilled_mid_run_resumes_bit_for_bit(tmp_path):
    """GRPO at TP=2 (rollouts on rank 0 through the transformers backend, broadcast to both ranks), rank 0's
    process group SIGKILLed before step 3's rollouts: the rerun resumes from step 2 with every rank's RNG
    streams, the prompt sampler's position and the engine refit from the checkpoint, and reaches the
    uninterrupted run's numbers exactly, one metrics row per step."""
    from recipes.megatron import checkpointing

    common = ("parallel.tp=2", "rollout.backend=hf", "grpo.steps=3", "training.threads=1", "eval.levels=[]")
    full = _grpo(tmp_path / "full", *common)
    part = tmp_path / "part"
    log = _grpo(part, *common, kill_before_step=2)
    assert "Signal 9 (SIGKILL) received by PID" in log, log[-3000:]
    assert checkpointing.latest_step(part / "checkpoints") == 2
    resumed = _grpo(part, *common)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for mine, ref in zip(resumed, full):
        for key in ("reward/mean", "response_len/mean", "loss", "kl", "grad_norm", "entropy", "clip_fraction"):
            assert mine[key] == ref[key], (mine["step"], key)


def test_heldout_accuracy_greedy_and_pass_at_1_over_samples():
    """pass@1 with samples is the mean over every sampled response (hand-counted on scripted completions)."""
    from recipes.grpo import HeldoutConfig, heldout_accuracy
    from recipes.generation import Completion

    class ScriptedEngine:  # answers the i-th sample of every problem correctly when i < right[level]
        def __init__(self, right):
            self.right, self.calls = right, []

        def count_tokens(self, text):
            return len(text)

        def generate(self, prompts, params):
            n = params.n
            self.calls.append((len(prompts), n, params.temperature))
            out = []
            for text in prompts:
                p = next(p for p in problems if prompt_of[p.id] == text)
                answers = [p.answer if i < self.right[p.level] else p.answer + "1" for i in range(n)]
                out.append([Completion([], ct.format_response("x", task.answer_text(a)), "stop") for a in answers])
            return out

    from recipes.tokenizer import load

    tok = load()
    problems = task.heldout_problems([2, 3], 5)
    # the evaluation's prompt of the embedded benchmark: the problem alone as the user turn
    prompt_of = {p.id: tok.render([{"role": "user", "content": p.question}], add_generation_prompt=True)
                 for p in problems}
    engine = ScriptedEngine({2: 3, 3: 1})
    sampled = heldout_accuracy(engine, tok, HeldoutConfig(levels=[2, 3], per_level=5, temperature=0.6, samples=4), 64)
    assert sampled == {"L2": 0.75, "L3": 0.25, "mean": 0.5}
    assert engine.calls == [(5, 4, 0.6), (5, 4, 0.6)]
    greedy = heldout_accuracy(engine, tok, HeldoutConfig(levels=[2, 3], per_level=5, samples=4), 64)  # T=0: one response
    assert greedy == {"L2": 1.0, "L3": 1.0, "mean": 1.0} and engine.calls[-1] == (5, 1, 0.0)


def test_heldout_check_on_another_benchmark_uses_its_evaluation_prompt(data_root):
    """GRPO on a dataset's prompts checks a benchmark of that kind: GSM8K's first problems with the evaluation's
    math prompt, pass@1 by hand (the scripted engine answers the first two of four correctly)."""
    from recipes.generation import Completion
    from recipes.grpo import HeldoutConfig, heldout_accuracy
    from recipes.tokenizer import load

    rows = [json.loads(line) for line in (data_root / "benchmarks" / "gsm8k.jsonl").read_text().splitlines()[:4]]
    answers = [r["answer"].split("####")[-1].strip() for r in rows]
    seen = []

    class ScriptedEngine:
        def count_tokens(self, text):
            return len(text)

        def generate(self, prompts, params):
            seen.extend(prompts)
            return [[Completion([], ct.format_response("x", f"\\boxed{{{a if i < 2 else a + '0'}}}"), "stop")]
                    for i, a in enumerate(answers)]

    tok = load()
    result = heldout_accuracy(ScriptedEngine(), tok, HeldoutConfig(benchmark="gsm8k", per_level=4), 64)
    assert result == {"gsm8k": 0.5, "mean": 0.5}
    user = rows[0]["question"] + "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert seen[0] == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_set_schema_and_fields_reach_the_reader(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"task": "What is 2+5?", "gold": "7"}) + "\n")
    cfg = PromptsConfig(dataset=str(path), schema="prompt", fields={"problem": "task", "reference": "gold"})
    (prompt,) = PromptSampler(cfg).pools[None]
    assert (prompt["problem"], prompt["answer"]) == ("What is 2+5?", "7")
    from recipes.data.trace_record import DataError

    with pytest.raises(DataError, match="match no known schema"):
        PromptSampler(PromptsConfig(dataset=str(path)))
