"""The shared answer grader: hand-checked verdicts on real benchmark answer formats, extraction,
self-consistency on every benchmark, and bounded time on pathological responses."""

import json
import threading
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
    """Extraction is linear and gives up on what is no answer (speed: `nrr bench eval`); math-verify calls that
    overrun are stopped by the response's budget, their worker restarted."""
    huge_box = "\\boxed{" + "1+" * 500_000 + "1}"  # about 1 MB
    deep = "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"
    unclosed = "\\boxed{" * 200_000
    for response in (huge_box, deep, unclosed, "The answer is " + "x" * 1_000_000):
        result = grade_response(response, "3")
        assert result.correct is False and result.method == "no_answer"
    # sympy-hostile expressions go to math-verify and are stopped by the timeout, worker restarted
    for answer in ("9^{9^{9^{9}}}", "(" * 900 + "1" + ")" * 900):
        result = grade_response(f"\\boxed{{{answer}}}", "3", timeout=1.0)
        assert result.correct is False and result.method == "timeout", result
    assert grade_response(r"\boxed{\sqrt{9}}", "3").correct  # a fresh worker after the timeout


def test_the_budget_is_per_response_not_per_math_verify_call():
    """A right list answer whose items match the reference only through math-verify, in reverse order: 528 calls
    (32 + 31 + ... + 1), each quick on its own. The response's one budget runs out: it is scored incorrect with
    method "timeout" (with a budget per call, all of them would run and it would be correct)."""
    predicted = ", ".join(f"\\sqrt{{{k * k}}}" for k in range(grader.MAX_LIST_ITEMS, 0, -1))
    reference = [str(k) for k in range(1, grader.MAX_LIST_ITEMS + 1)]
    assert grade_response(r"\boxed{\sqrt{1024}}", "32", timeout=1.0) == \
        grader.GradeResult(r"\sqrt{1024}", True, "math_verify")  # one such call fits the budget
    result = grade_response(f"\\boxed{{{predicted}}}", reference, timeout=0.5)
    assert (result.correct, result.method) == (False, "timeout")


def test_threads_grade_on_their_own_workers_and_wait_for_one_within_their_budget(monkeypatch):
    """Two workers: while a hostile answer holds one, another thread is graded on the other; with both held, a
    third thread waits for a free one only as long as its own budget, then is scored "timeout"."""
    pool = grader._WorkerPool(2)
    monkeypatch.setattr(grader, "_WORKERS", pool)
    workers = [grader._MathVerifyWorker(), grader._MathVerifyWorker()]
    starts = [threading.Thread(target=w.ensure_started) for w in workers]  # both up front, side by side
    for t in starts:
        t.start()
    for t in starts:
        t.join()
    assert all(w.running() for w in workers)
    pool._all += workers
    pool._idle += workers
    held = []

    def hold():
        held.append(grade_response("\\boxed{9^{9^{9^{9}}}}", "3", timeout=4.0))

    try:
        first = threading.Thread(target=hold)
        first.start()
        assert grade_response(r"\boxed{\sqrt{9}}", "3", timeout=5.0) == \
            grader.GradeResult(r"\sqrt{9}", True, "math_verify")  # on the other worker ...
        assert not held  # ... while the first is held
        second = threading.Thread(target=hold)
        second.start()
        while pool._idle:  # until the second thread holds the other worker
            threading.Event().wait(0.02)
        assert grade_response(r"\boxed{\sqrt{9}}", "3", timeout=0.5).method == "timeout"
        assert not held  # it gave up waiting within its own budget, not when a worker came free
        first.join()
        second.join()
        assert len(held) == 2 and not any(r.correct for r in held)  # stopped by math-verify's alarm or the budget
    finally:
        pool.kill()


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
