"""Each reward function on responses whose reward is known by construction."""

import pytest

from recipes import task
from recipes.response_format import format_response
from recipes.rl.rewards import REWARDS, RewardsConfig, Sample, check_weights, extract_code, score

CFG = RewardsConfig(overlong_max_tokens=100, overlong_cache_tokens=20, length_target_tokens=50)


def _r(name, response, **kw):
    return REWARDS[name](Sample(response=response, **kw), CFG)


def test_accuracy_uses_the_final_answer():
    p = task.generate(3, 1, seed=1)[0]
    good = task.assistant_response(p)
    assert _r("accuracy", good, answer=p.answer) == 1.0
    wrong = format_response(task.cot_text(p), f"\\boxed{{{int(p.answer) + 1}}}")
    assert _r("accuracy", wrong, answer=p.answer) == 0.0
    # a right number inside the reasoning does not count when the final answer is wrong
    tricky = format_response(f"\\boxed{{{p.answer}}}", "\\boxed{123456}")
    assert _r("accuracy", tricky, answer=p.answer) == 0.0


def test_verified_steps_counts_rewrites_before_the_first_wrong_one():
    # (3+4)*5-2 -> 7*5-2 ; 35-2 ; 33
    def steps(thinking):
        return _r("steps", format_response(thinking, "\\boxed{33}"), problem="(3+4)*5-2")

    assert steps("7*5-2;35-2;33") == 1.0
    assert steps("7*5-2;36-2;34") == pytest.approx(1 / 3)  # the second rewrite is wrong: later ones do not count
    assert steps("7*5-2;35-2") == pytest.approx(2 / 3)
    assert steps("8*5-2;35-2;33") == 0.0
    assert steps(" 7*5-2 ; 35-2 ; 33 ") == 1.0  # spacing around separators is not an error
    assert _r("steps", format_response("33", "\\boxed{33}"), problem="What is 33?") == 0.0  # not a task problem
    assert _r("steps", format_response("33", "\\boxed{33}"), problem="33") == 0.0  # nothing to rewrite


def test_format():
    assert _r("format", format_response("3+4=7", "\\boxed{7}")) == 1.0
    assert _r("format", "<think>\n3+4=7\n") == 0.0  # never closed
    assert _r("format", format_response("3+4=7", "7")) == 0.0  # no boxed answer
    assert _r("format", format_response("3+4=7", "\\boxed{7} \\boxed{8}")) == 0.0  # two answers
    assert _r("format", format_response(None, "\\boxed{7}")) == 0.0  # empty reasoning
    assert _r("format", "\\boxed{7}") == 0.0


def test_language_consistency():
    assert _r("language", format_response("add then multiply", "\\boxed{1}")) == 1.0
    assert _r("language", format_response("12+3=15", "\\boxed{15}")) == 1.0  # no letters
    mixed = format_response("add 加法", "\\boxed{1}")  # 3 latin letters, 2 CJK
    assert _r("language", mixed) == pytest.approx(3 / 5)


@pytest.mark.parametrize("n, truncated, expected", [
    (10, False, 0.0), (80, False, 0.0), (90, False, -0.5), (100, False, -1.0), (101, False, -1.0), (50, True, -1.0),
])
def test_overlong_soft_penalty(n, truncated, expected):
    assert _r("overlong", "x", n_tokens=n, truncated=truncated) == pytest.approx(expected)


def test_length_penalty():
    assert _r("length", "x", n_tokens=50) == 0.0
    assert _r("length", "x", n_tokens=75) == pytest.approx(-0.5)
    assert _r("length", "x", n_tokens=500) == -1.0


def test_code_execution_in_sandbox():
    tests = [{"stdin": "2 3\n", "stdout": "5"}, {"stdin": "10 -4\n", "stdout": "6"}]
    right = format_response("sum them", "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    half = format_response("sum them", "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b) if a > 5 else a + b)\n```")
    loops = format_response("x", "```python\nwhile True:\n    pass\n```")
    assert extract_code(right).startswith("a, b")
    assert _r("code", right, tests=tests) == 1.0
    assert _r("code", half, tests=tests) == 0.5
    assert REWARDS["code"](Sample(loops, tests=tests[:1]), RewardsConfig(code_timeout_s=0.5)) == 0.0
    assert _r("code", format_response("x", "no code"), tests=tests) == 0.0


def test_weighted_sum_and_components():
    p = task.generate(2, 1, seed=3)[0]
    cfg = RewardsConfig(weights={"accuracy": 1.0, "format": 0.5, "overlong": 1.0},
                        overlong_max_tokens=100, overlong_cache_tokens=20)
    samples = [Sample(task.assistant_response(p), p.answer, n_tokens=30),
               Sample("<think>\n1+1", p.answer, n_tokens=100, truncated=True)]
    totals, parts = score(samples, cfg)
    assert parts == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0], "overlong": [0.0, -1.0]}
    assert totals == [1.5, -1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        check_weights(RewardsConfig(weights={"acuracy": 1.0}))
