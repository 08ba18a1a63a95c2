"""The shared answer grader: hand-checked verdicts on real benchmark answer formats, extraction,
self-consistency on every benchmark, and bounded time on pathological responses."""

import json
import threading
import time
from pathlib import Path

import pytest

from recipes import grader
from recipes.grader import extract_answer, final_answer, grade, grade_response

CASES = Path(__file__).parent / "data" / "grader_cases.jsonl"


def _cases():
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def test_hand_checked_cases():
    cases = _cases()
    assert len(cases) >= 200
    assert {c["benchmark"] for c in cases} == {"math500", "aime24", "amc23", "gsm8k", "minerva", "olympiadbench"}
    assert sum(c["expected"] for c in cases) < len(cases) - 100  # plenty of wrong answers too
    wrong = []
    for c in cases:
        got = grade(c["predicted"], c["reference"])
        if got != c["expected"]:
            wrong.append((c["predicted"], c["reference"], c["expected"]))
    assert not wrong, f"{len(wrong)} verdicts differ: {wrong[:10]}"


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        (r"\frac12", "0.5", True),
        ("1/2", "0.5", True),
        (r"\frac12", "1/2", True),
        (r"(3,\pi/2)", r"\left( 3, \frac{\pi}{2} \right)", True),
        ("90", r"90^\circ", True),
        ("0.51", r"\frac12", False),
        (r"(3,\pi/3)", r"\left( 3, \frac{\pi}{2} \right)", False),
        ("89", r"90^\circ", False),
    ],
)
def test_equivalent_forms(predicted, reference, expected):
    assert grade(predicted, reference) is expected


def _benchmark_references(data_root):
    bench = data_root / "benchmarks"

    def rows(name):
        return [json.loads(line) for line in (bench / name).read_text().splitlines() if line.strip()]

    return {
        "math500": [r["answer"] for r in rows("math500.jsonl")],
        "aime24": [r["answer"] for r in rows("aime24.jsonl")],
        "amc23": [r["answer"] for r in rows("amc23.jsonl")],
        "gsm8k": [r["answer"].split("####")[-1].strip() for r in rows("gsm8k.jsonl")],
        "minerva": [grader.last_boxed(r["solution"]) for r in rows("minerva_math.jsonl")],
        "olympiadbench": [r["final_answer"] for r in rows("olympiadbench.jsonl")],
    }


def test_every_benchmark_reference_grades_itself(data_root):
    for name, refs in _benchmark_references(data_root).items():
        assert refs and all(r is not None for r in refs), name
        for ref in refs:
            text = ref if isinstance(ref, str) else grader._as_text(ref)
            assert grade(text, ref), (name, ref)
            result = grade_response(f"<think>\nwork\n</think>\n\nSo the answer is $\\boxed{{{text}}}$.", ref)
            assert result.correct and result.method == "exact", (name, ref, result)


def test_extract_answer_conventions():
    assert extract_answer(r"first \boxed{1}, then \boxed{\frac{a}{b+\{c\}}}.") == r"\frac{a}{b+\{c\}}"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"so \boxed 5.") == "5"
    assert extract_answer(r"\boxed{2} and finally \boxed{3") == "2"  # an unclosed last box: the one before
    assert extract_answer("Natalia sold 48+24 = 72 clips.\n#### 72") == "72"
    assert extract_answer("Thus, the final answer is $\\frac{3}{4}$.") == r"\frac{3}{4}"
    assert extract_answer("blah\nAnswer: 12 apples") == "12 apples"
    assert extract_answer("**Final Answer:** 9") == "9"
    assert extract_answer("I get 41 and then 42.") is None
    assert extract_answer("I get 41 and then 42.", last_number=True) == "42"
    assert extract_answer("") is None and extract_answer(None) is None
    # a think block: only the part after it counts; an unclosed one has no answer yet
    assert final_answer("<think>\n\\boxed{1}\n</think>\n\n\\boxed{2}") == "2"
    assert final_answer("<think>\nmaybe \\boxed{1}") is None
    assert final_answer("<think>\n\\boxed{1}\n</think>\n\nno box") is None


def test_grade_response_methods_and_stats():
    grader.reset_stats()
    assert grade_response("no answer here", "3") == grader.GradeResult(None, False, "no_answer")
    assert grade_response(r"\boxed{3}", "3").method == "exact"
    assert grade_response(r"\boxed{3.0}", "3").method == "numeric"
    assert grade_response(r"\boxed{\sqrt{9}}", "3") == grader.GradeResult(r"\sqrt{9}", True, "math_verify")
    assert grader.stats() == {"exact": 1, "numeric": 1, "math_verify": 1, "timeout": 0, "no_answer": 1}
    assert grader.fast_path_rate() == pytest.approx(2 / 3)


def test_math_verify_path_works_from_threads():
    # math-verify's signal.alarm timeouts fail outside the main thread; the worker process does not care
    results = []

    def work():
        results.append(grade(r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_pathological_responses_are_bounded():
    grade("1", r"\sqrt{1}")  # the worker is up: its start is not what is measured
    huge_box = "\\boxed{" + "1+" * 500_000 + "1}"  # about 1 MB
    deep = "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"
    unclosed = "\\boxed{" * 200_000
    for response in (huge_box, deep, unclosed, "The answer is " + "x" * 1_000_000):
        start = time.monotonic()
        result = grade_response(response, "3")
        assert time.monotonic() - start < 1.0
        assert result.correct is False and result.method == "no_answer"
    # sympy-hostile expressions go to math-verify and are stopped by the timeout, worker restarted
    for answer in ("9^{9^{9^{9}}}", "(" * 900 + "1" + ")" * 900):
        assert grade("1", r"\sqrt{1}")  # (re)start the worker outside the measured call
        start = time.monotonic()
        result = grade_response(f"\\boxed{{{answer}}}", "3", timeout=1.0)
        elapsed = time.monotonic() - start
        assert result.correct is False and result.method == "timeout", result
        assert elapsed < 1.0 + 0.5
    start = time.monotonic()
    assert grade_response(r"\boxed{\sqrt{9}}", "3").correct  # a fresh worker after the timeout
    assert time.monotonic() - start < grader.STARTUP_TIMEOUT


# One cut at the think block for every stage: (response with {A} for the right answer, {W} a wrong one, verdict)
CUT_CASES = [
    ("<think>\nwork \\boxed{{{W}}}\n</think>\n\n\\boxed{{{A}}}", True),  # closed: the answer part decides
    ("<think>\nwork \\boxed{{{A}}}", False),  # unclosed: no answer yet, whatever the thinking boxed
    ("<think>\n\\boxed{{{W}}}\n</think>\n\\boxed{{{W}}}</think>\n\n\\boxed{{{A}}}", True),  # two closes: after the last
    ("<think>\nx\n</think>\n\n\\boxed{{{A}}}\n</think>\n\nno box", False),
    ("so the answer is \\boxed{{{A}}}", True),  # no think block: all of it is the answer
    ("work\n</think>\n\n\\boxed{{{A}}}", True),  # the opening tag was in the prompt
]


def test_one_cut_gives_the_same_verdict_in_curation_rewards_grpo_heldout_and_evaluation():
    from curator_pipelines.filters import judge_correctness, parse_response
    from curator_pipelines.config import FilterConfig
    from recipes import task
    from recipes.generation import Completion
    from recipes.evaluation.runner import build_record
    from recipes.tokenizer import load
    from recipes.grpo import HeldoutConfig, heldout_accuracy
    from recipes.rl.rewards import RewardsConfig, Sample, accuracy

    problems = task.heldout_problems([2], 4)

    class ScriptedEngine:
        """The rollout engine's generate() answering each held-out prompt with the case's text (no model)."""

        def __init__(self, template: str):
            self.template = template

        def count_tokens(self, text):
            return len(text)

        def generate(self, prompts, params):
            assert len(prompts) == len(problems)
            return [[Completion([], self.template.format(A=p.answer, W=int(p.answer) + 1), "stop")] * params.n
                    for p in problems]

    for template, expected in CUT_CASES:
        verdicts = {}
        for p in problems:
            text = template.format(A=p.answer, W=int(p.answer) + 1)
            verdicts.setdefault("curation", set()).add(
                judge_correctness({**parse_response(text), "reference": p.answer}, FilterConfig())[0])
            verdicts.setdefault("reward", set()).add(accuracy(Sample(response=text, answer=p.answer), RewardsConfig()) == 1.0)
            record = build_record({"id": p.id, "benchmark": "embedded", "problem": p.question, "answer": p.answer}, 0,
                                  Completion([], text, "stop", num_tokens=10), True, lambda s: len(s), 5.0)
            verdicts.setdefault("evaluation", set()).add(record["is_correct"])
        heldout = heldout_accuracy(ScriptedEngine(template), load(), HeldoutConfig(levels=[2], per_level=4), 64)["L2"]
        verdicts["grpo_heldout"] = {heldout == 1.0} if heldout in (0.0, 1.0) else {None}
        assert verdicts == dict.fromkeys(verdicts, {expected}), (template, verdicts)
