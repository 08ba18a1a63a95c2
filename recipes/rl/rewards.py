"""Reward functions: small, composable, each `fn(sample, cfg) -> float`, weighted in the YAML.

    rewards:
      weights: {accuracy: 1.0, format: 0.1, overlong: 1.0}

The total reward is the weighted sum; every component is logged on its own.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Callable

from recipes import response_format as ct


@dataclasses.dataclass
class Sample:
    """One response to score, with what the rewards need to know about its prompt."""

    response: str
    answer: str = ""  # the reference answer (math tasks)
    n_tokens: int = 0  # response length in tokens
    truncated: bool = False  # generation stopped at max tokens, not at EOS
    tests: list[dict] | None = None  # code tasks: [{"stdin": ..., "stdout": ...}]
    problem: str = ""  # the question (the `steps` reward checks the embedded task's rewrites against it)


@dataclasses.dataclass
class RewardsConfig:
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"accuracy": 1.0})
    language: str = "LATIN"  # the script the reasoning should stay in (a Unicode name prefix)
    overlong_max_tokens: int | None = None  # DAPO's L_max (None: GRPO's rollout.max_tokens, the generation budget)
    overlong_cache_tokens: int = 32  # penalty ramps linearly over the last this-many tokens
    length_target_tokens: int = 64  # `length`: responses longer than this lose reward linearly
    code_timeout_s: float = 2.0
    code_memory_mb: int = 256


def accuracy(s: Sample, cfg: RewardsConfig) -> float:
    """1 when the final answer matches the reference (the shared grader decides)."""
    from recipes.grader import grade_response

    return 1.0 if grade_response(s.response, s.answer).correct else 0.0


_BOXED = re.compile(r"\\boxed\{[^{}]*\}")


def format_reward(s: Sample, cfg: RewardsConfig) -> float:
    """1 for a closed `<think>` block followed by an answer with exactly one `\\boxed{}`, else 0."""
    thinking, answer, closed = ct.split_response(s.response)
    if not closed or thinking is None or not thinking.strip():
        return 0.0
    return 1.0 if len(_BOXED.findall(answer)) == 1 else 0.0


def language_consistency(s: Sample, cfg: RewardsConfig) -> float:
    """Share of letters in the reasoning that belong to the target script (1.0 with no letters)."""
    thinking, _, _ = ct.split_response(s.response)
    text = thinking if thinking is not None else s.response
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    target = cfg.language.upper()
    same = sum(1 for c in letters if unicodedata.name(c, "").startswith(target))
    return same / len(letters)


def overlong_penalty(s: Sample, cfg: RewardsConfig) -> float:
    """DAPO's soft overlong punishment: 0 up to L_max - cache, then linear down to -1 at L_max."""
    l_max, cache = cfg.overlong_max_tokens, cfg.overlong_cache_tokens
    if s.truncated or s.n_tokens > l_max:
        return -1.0
    if s.n_tokens <= l_max - cache:
        return 0.0
    return ((l_max - cache) - s.n_tokens) / cache


def length_penalty(s: Sample, cfg: RewardsConfig) -> float:
    """A plain length cost: 0 up to the target, then down to -1 at twice the target."""
    over = max(0, s.n_tokens - cfg.length_target_tokens)
    return -min(1.0, over / max(1, cfg.length_target_tokens))


def verified_steps(s: Sample, cfg: RewardsConfig) -> float:
    """Embedded arithmetic task: the share of the reference rewrites reproduced in order before the first wrong
    one (a process reward the task's own solver can check). 0 for problems that are not task expressions."""
    from recipes import task

    try:
        reference = task.solve_steps(s.problem)
    except (ValueError, SyntaxError, IndexError):
        return 0.0
    if not reference:  # a bare number: nothing to rewrite
        return 0.0
    thinking, _, _ = ct.split_response(s.response)
    written = [step.strip() for step in (thinking or "").strip().split(";")]
    right = 0
    for mine, ref in zip(written, reference):
        if mine != ref:
            break
        right += 1
    return right / len(reference)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_code(text: str) -> str | None:
    blocks = _CODE_BLOCK.findall(ct.split_response(text)[1])  # the answer part: an unclosed think block has none
    return blocks[-1] if blocks else None


def code_execution(s: Sample, cfg: RewardsConfig) -> float:
    """Share of tests whose stdout matches, running the response's last code block in the sandbox."""
    if not s.tests:
        return 0.0
    code = extract_code(s.response)
    if code is None:
        return 0.0
    from recipes.rl.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(timeout_s=cfg.code_timeout_s, memory_mb=cfg.code_memory_mb)
    passed = 0
    for test in s.tests:
        result = run_python(code, stdin=test.get("stdin", ""), limits=limits)
        if result.ok and result.stdout.strip() == str(test.get("stdout", "")).strip():
            passed += 1
    return passed / len(s.tests)


REWARDS: dict[str, Callable[[Sample, RewardsConfig], float]] = {
    "accuracy": accuracy,
    "format": format_reward,
    "language": language_consistency,
    "overlong": overlong_penalty,
    "length": length_penalty,
    "code": code_execution,
    "steps": verified_steps,
}


def check_weights(cfg: RewardsConfig) -> None:
    unknown = sorted(set(cfg.weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"rewards.weights: unknown reward(s) {unknown}; known: {sorted(REWARDS)}")


def score(samples: list[Sample], cfg: RewardsConfig) -> tuple[list[float], dict[str, list[float]]]:
    """(total reward per sample, {component: values}) for the weighted rewards in cfg."""
    check_weights(cfg)
    parts = {name: [REWARDS[name](s, cfg) for s in samples] for name, w in cfg.weights.items() if w != 0}
    totals = [sum(cfg.weights[name] * vals[i] for name, vals in parts.items()) for i in range(len(samples))]
    return totals, parts
