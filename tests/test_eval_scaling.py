"""Test-time scaling in `nrr eval`: budget forcing's control of the thinking (against a scripted model whose every
step is known), self-consistency and best-of-N curves by hand, and a real run writing the curves and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.evaluation.scaling import (FORCED_CLOSE, ScalingConfig, best_of, budget_forced, check_scaling,
                                        sample_curves)
from recipes.generation.backend import Completion, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


class ScriptedModel:
    """A stand-in for a model, written for this test: it thinks in words 't', closes its thinking after
    `think_words` of them, thinks `after_wait` words more when its thinking ends in 'Wait', then answers
    '\\boxed{N}' with N the number of 't' it wrote. One word is one token; max_tokens is honoured."""

    def __init__(self, think_words: int, after_wait: int):
        self.think_words, self.after_wait, self.calls = think_words, after_wait, []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def next_words(self, text: str) -> list[str]:
        if "</think>" in text:
            return [f"\\boxed{{{text.split().count('t')}}}", "<eos>"]
        thought = text.split().count("t")
        target = self.think_words + self.after_wait * text.count("Wait")
        return ["t"] * max(0, target - thought) + ["</think>", f"\\boxed{{{max(target, thought)}}}", "<eos>"]

    def generate(self, prompts, params: SamplingParams):
        self.calls.append(params.max_tokens)
        out = []
        for prompt in prompts:
            words = self.next_words(prompt)
            if "<eos>" in words[:params.max_tokens + 1] and words.index("<eos>") <= params.max_tokens:
                words, reason = words[:words.index("<eos>")], "stop"
            else:
                words, reason = words[:params.max_tokens], "length"
            out.append([Completion(token_ids=[], text=" " + " ".join(words), finish_reason=reason,
                                   num_tokens=len(words))])
        return out


def force(model, budget, waits=0):
    (comp,) = budget_forced(model, ["<think>"], budget, SamplingParams(), ScalingConfig(wait_rounds=waits,
                                                                                       answer_tokens=4),
                            model.count_tokens)
    return comp


def test_budget_forcing_caps_thinking_and_wait_extends_it():
    model = ScriptedModel(think_words=6, after_wait=2)
    capped = force(model, budget=3)
    assert capped.text == " t t t" + FORCED_CLOSE + " \\boxed{3}"  # closed for the model at 3, then its answer
    assert capped.finish_reason == "stop"
    free = force(model, budget=10)
    assert free.text.split().count("t") == 6 and free.text.endswith("\\boxed{6}")  # its own length, under the cap
    extended = force(model, budget=10, waits=1)
    # the close after 6 suppressed once: 'Wait', 2 more words, then it closes (6 + 1 + 2 = 9 <= 10)
    assert extended.text.split() == ["t"] * 6 + ["Wait", "t", "t", "</think>", "\\boxed{8}"]
    capped_wait = force(model, budget=7, waits=3)
    # 6 words: a 'Wait' would take the budget's last token and leave none to think with: closed where it stands
    assert capped_wait.text.split() == ["t"] * 6 + ["</think>", "\\boxed{6}"]
    assert all(n >= 1 for n in model.calls)


def rec(pid, idx, answer, correct, fmt=True, tokens=10):
    return {"id": pid, "sample_idx": idx, "predicted_answer": answer, "is_correct": correct, "format_ok": fmt,
            "num_generated_tokens": tokens}


def test_self_consistency_and_best_of_curves_by_hand():
    records = [
        # p1: right answer 3 in samples 1, 2 (wrong 5 first): maj@1 wrong, maj@2 tie -> 5 (earliest), maj@4 -> 3
        rec("p1", 0, "5", False), rec("p1", 1, "3", True), rec("p1", 2, "3", True), rec("p1", 3, "7", False),
        # p2: right at sample 0 only, but its format is broken; sample 1 is well formed and shorter
        rec("p2", 0, "4", True, fmt=False, tokens=30), rec("p2", 1, "9", False, tokens=20),
        rec("p2", 2, "9", False, tokens=10), rec("p2", 3, "1", False),
    ]
    curves = sample_curves(records, "agreement")
    tokens = 110 / 8  # mean tokens per sample: p1 4 x 10, p2 30 + 20 + 10 + 10
    assert [pt["k"] for pt in curves["self_consistency"]] == [1, 2, 4]
    assert [pt["tokens"] for pt in curves["self_consistency"]] == [round(k * tokens, 1) for k in (1, 2, 4)]
    # maj@1: p2 right; maj@2: p1 tie -> '5' wrong, p2 tie -> '4' right; maj@4: p1 '3' right, p2 '9' wrong
    assert [pt["accuracy"] for pt in curves["self_consistency"]] == [0.5, 0.5, 0.5]
    # agreement picks the sample of the most-voted answer (ties: the earliest): the same choices as the vote
    assert [pt["accuracy"] for pt in curves["best_of"]] == [0.5, 0.5, 0.5]
    p2 = [r for r in records if r["id"] == "p2"]
    assert best_of(p2, 4, "format")["sample_idx"] == 2  # well formed, then the shortest
    assert best_of(p2, 1, "format")["sample_idx"] == 0
    fmt = sample_curves(records, "format")["best_of"]
    # k=1: p2 sample 0 right; k=2: p1 sample 0 (equal format, equal length: earliest) wrong, p2 sample 1 wrong
    assert [pt["accuracy"] for pt in fmt] == [0.5, 0.0, 0.0]


def test_bad_scaling_settings():
    with pytest.raises(ValueError, match="positive token counts"):
        check_scaling(ScalingConfig(thinking_budgets=[8, 0]))
    with pytest.raises(ValueError, match="wait_rounds"):
        check_scaling(ScalingConfig(wait_rounds=-1))


@pytest.mark.slow
def test_eval_writes_budget_runs_curves_and_the_plot(tmp_path):
    out = tmp_path / "eval"
    args = [sys.executable, "-m", "recipes.cli", "eval", "run", "--config", "nemo_configs/eval/embedded.yaml",
            "model=recipes/assets/models/tiny-qwen2/config.json", f"output_dir={out}", "generation.backend=hf",
            "benchmarks=[{name: embedded, levels: [1], n_per_level: 3}]", "generation.k=2",
            "generation.temperature=1.0", "generation.max_tokens=24", "scaling.thinking_budgets=[4, 8]",
            "scaling.answer_tokens=6", "progress=false"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scaling = json.loads((out / "summary.json").read_text())["benchmarks"]["embedded"]["scaling"]
    assert [pt["k"] for pt in scaling["self_consistency"]] == [1, 2]
    budgets = scaling["budget_forcing"]
    assert [pt["budget"] for pt in budgets] == [4, 8]
    for pt in budgets:
        samples = [json.loads(x) for x in (out / f"embedded.budget{pt['budget']}.jsonl").read_text().splitlines()]
        assert len(samples) == 3
        # a random model never closes its thinking: the cap closes it, once, and the answer follows in its own
        # budget (token counts are not compared: a random byte-level model's text re-encodes to other lengths)
        assert all(s["generation"].count("</think>") == 1 for s in samples)
        assert all(s["answer_tokens"] > 0 for s in samples)
    assert "Accuracy against generated tokens" in (out / "report.html").read_text()
