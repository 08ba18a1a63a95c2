"""pass@k, maj@k and the behaviour metrics against values computed by hand."""

import math

import pytest

from recipes.evaluation.metrics import (
    accuracy_metrics,
    behaviour_metrics,
    ks_for,
    majority_correct,
    pass_at_k,
    reflection_count,
    summarize,
)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 7 / 10),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 9 / 10),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c < k: some correct sample is always drawn
        (5, 2, 5, 1.0),  # k = n
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (10, 3, 5, 1 - 21 / 252),  # C(7,5) = 21, C(10,5) = 252
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _s(answer, correct):
    return {"predicted_answer": answer, "is_correct": correct}


def test_majority_vote_ties_go_to_the_earliest_answer():
    samples = [_s("3", False), _s("4", True), _s("4", True), _s("3", False)]
    assert majority_correct(samples, 1) is False  # "3" alone
    assert majority_correct(samples, 2) is False  # 1-1 tie: "3" voted first
    assert majority_correct(samples, 3) is True  # "4" has two votes
    assert majority_correct(samples, 4) is False  # k = n, 2-2 tie: "3" voted first
    flipped = [_s("4", True), _s("3", False), _s("3", False), _s("4", True)]
    assert majority_correct(flipped, 4) is True


def test_majority_vote_groups_equal_forms_and_skips_missing_answers():
    samples = [_s(r"\dfrac12", True), _s("7", False), _s(r"\frac{1}{2}", True)]
    assert majority_correct(samples, 3) is True  # the two halves are one answer
    assert majority_correct([_s(None, False), _s(None, False), _s("5", True)], 3) is True
    assert majority_correct([_s(None, False), _s(None, False), _s("5", True)], 2) is False


def test_accuracy_metrics_by_hand():
    rows = []
    # problem a: answers 7 (right), 8, 9, 7 (right); problem b: all wrong
    for i, (ans, ok) in enumerate([("7", True), ("8", False), ("9", False), ("7", True)]):
        rows.append({"id": "a", "sample_idx": i, "predicted_answer": ans, "is_correct": ok})
    for i in range(4):
        rows.append({"id": "b", "sample_idx": 3 - i, "predicted_answer": str(i), "is_correct": False})
    m = accuracy_metrics(rows)
    assert m["problems"] == 2 and m["samples_per_problem"] == 4
    assert m["pass@1"] == pytest.approx(0.25)  # (2/4 + 0/4) / 2
    assert m["pass@1_se"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))  # stdev([0.5, 0]) / sqrt(2)
    assert m["pass@k"] == pytest.approx({"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5})
    assert m["maj@k"] == pytest.approx({"1": 0.5, "2": 0.5, "4": 0.5})  # a: "7" first / "7" twice; b: never
    assert ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]


def test_reflection_format_and_truncation():
    assert reflection_count("Wait, let me check that. Alternatively, verify by substitution. Hmm.") == 5
    assert reflection_count("The answer awaits no one.") == 0  # word boundaries: 'awaits' is not 'wait'
    rows = [
        {"id": "a", "sample_idx": 0, "predicted_answer": "1", "is_correct": True, "reflection_markers": 2,
         "num_generated_tokens": 100, "format_ok": True, "truncated": False,
         "thinking_tokens": 80, "answer_tokens": 20},
        {"id": "b", "sample_idx": 0, "predicted_answer": None, "is_correct": False, "reflection_markers": 0,
         "num_generated_tokens": 300, "format_ok": False, "truncated": True,
         "thinking_tokens": 300, "answer_tokens": 0},
    ]
    b = behaviour_metrics(rows)
    assert b == pytest.approx({"reflection_rate": 0.5, "reflections_per_1k_tokens": 5.0, "format_compliance": 0.5,
                               "truncation_rate": 0.5, "no_answer_rate": 0.5})
    s = summarize(rows)
    assert s["lengths"]["thinking_tokens"] == {"all": 190.0, "correct": 80.0, "wrong": 300.0}
    assert s["lengths"]["answer_tokens"]["correct"] == 20.0
