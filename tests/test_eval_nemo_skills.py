"""`nemo_skills_layout: true`: samples and metrics also in NeMo-Skills' files, checked against values computed by
hand for a scripted stand-in backend (fixed completions, no model).

MATH-500[:3] x 4 samples; correctness per sample (1 right, 0 wrong, - no answer):
  A (polar point): 1 1 0 0   answers X X 7 7   (a 2-2 tie at k=4)
  B (p - q):       0 0 0 1   answers 7 8 7 p-q
  C (14/3):        - - 1 1
"""

import json
from pathlib import Path

import pytest

from recipes.evaluation import run_eval, runner
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig
from recipes.generation import Completion

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FOLDER = ROOT / "recipes/assets/models/tiny-qwen2"  # a model folder for the tokenizer; no weights load
A, B, C = r"\left( 3, \frac{\pi}{2} \right)", "p - q", r"\frac{14}{3}"


def _says(answer):
    return "<think>\nwork\n</think>\n\n" + (f"The answer is \\boxed{{{answer}}}." if answer else "I do not know.")


SCRIPT = {"Convert the point": [A, A, "7", "7"], "Define": ["7", "8", "7", B], "If $f(x)": [None, None, C, C]}


class ScriptedBackend:
    """A scripted stand-in for a generation backend: sample s of a problem is SCRIPT's s-th answer, 10 * (s + 1)
    tokens long; a token is a whitespace-separated word (so each response thinks for 1 token)."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        answers = [next(v for key, v in SCRIPT.items() if key in p) for p in prompts]
        return [[Completion([0] * 10 * (s + 1), _says(a[s]), "stop") for s in range(params.n)] for a in answers]

    def count_tokens(self, text):
        return len(text.split())

    def close(self):
        pass


def _run(out: Path, monkeypatch, k=4, temperature=0.7) -> ScriptedBackend:
    backend = ScriptedBackend()
    monkeypatch.setattr(runner, "make_backend", lambda cfg, model_dir: backend)
    run_eval(EvalConfig(model=str(TOKENIZER_FOLDER), benchmarks=[BenchmarkConfig(name="math500", limit=3)],
                        generation=GenerationConfig(backend="hf", k=k, temperature=temperature, batch_size=2),
                        output_dir=str(out), nemo_skills_layout=True, report=False, progress=False))
    return backend


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nemo_skills_files_hold_the_hand_computed_values(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch)
    folder = tmp_path / "nemo_skills" / "math-500"  # NeMo-Skills' dataset name: it picks the math metrics
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"] + [f"output-rs{s}.jsonl" for s in range(4)]
    problems = [json.loads(line) for line in (ROOT / "recipes/assets/data/benchmarks/math500.jsonl").open()][:3]
    for s in range(4):  # one line per problem, in the benchmark's order, in every seed's file
        rows = _lines(folder / f"output-rs{s}.jsonl")
        assert [r["problem"] for r in rows] == [p["problem"] for p in problems]
        assert [r["expected_answer"] for r in rows] == [A, B, C]
    assert _lines(folder / "output-rs2.jsonl")[0] == {
        "id": "test/precalculus/807.json", "problem": problems[0]["problem"], "expected_answer": A,
        "generation": "<think>\nwork\n</think>\n\nThe answer is \\boxed{7}.", "predicted_answer": "7",
        "symbolic_correct": False, "num_generated_tokens": 30, "num_reasoning_tokens": 1, "num_answer_tokens": 29,
        "finish_reason": "stop"}
    assert [r["symbolic_correct"] for r in _lines(folder / "output-rs3.jsonl")] == [False, True, True]
    assert [r["predicted_answer"] for r in _lines(folder / "output-rs0.jsonl")] == [A, "7", None]

    m = json.loads((folder / "metrics.json").read_text())
    assert list(m) == ["math-500"]
    m = m["math-500"]
    assert set(m) == {"pass@1", "pass@2", "pass@3", "pass@4", "pass@1[avg-of-2]", "pass@1[avg-of-3]",
                      "pass@1[avg-of-4]", "majority@2", "majority@3", "majority@4"}  # no pass@1[avg-of-1]
    assert all(v["num_entries"] == 3 and v["avg_tokens"] == 25 for v in m.values())
    pct = lambda x: pytest.approx(100 * x / 3)  # noqa: E731  (sums over the 3 problems, in percent)
    expected = {  # mode: (symbolic_correct summed over problems, no_answer summed over problems)
        "pass@1": (2 / 4 + 1 / 4 + 2 / 4, 1), "pass@2": (5 / 6 + 1 / 2 + 5 / 6, 1),  # 1 - C(n-c,k)/C(n,k)
        "pass@3": (1 + 3 / 4 + 1, 0), "pass@4": (3, 0),
        "pass@1[avg-of-2]": (1 + 0 + 0, 1), "pass@1[avg-of-3]": (2 / 3 + 0 + 1 / 3, 2 / 3),
        "pass@1[avg-of-4]": (2 / 4 + 1 / 4 + 2 / 4, 2 / 4),
        "majority@2": (1 + 0 + 0, 1), "majority@3": (1 + 0 + 1, 0), "majority@4": (0.5 + 0 + 1, 0),  # tie: 0.5
    }
    for mode, (correct, no_answer) in expected.items():
        assert (m[mode]["symbolic_correct"], m[mode]["no_answer"]) == (pct(correct), pct(no_answer)), mode
    # across the 4 runs (seed s of every problem): 1/3, 1/3, 1/3, 2/3 correct
    assert m["pass@1[avg-of-4]"]["symbolic_correct_statistics"] == pytest.approx({
        "avg": 5 / 12, "std_dev_across_runs": 1 / 6, "std_err_across_runs": 1 / 12,
        "avg_sample_std_dev": (2 * (1 / 3) ** 0.5 + 0.5) / 3})
    assert m["pass@1[avg-of-4]"]["answer_tokens_statistics"]["avg"] == pytest.approx(24)  # 9, 19, 29, 39
    assert "symbolic_correct_statistics" not in m["pass@1"]
    assert json.loads((tmp_path / "nemo_skills" / "metrics.json").read_text()) == {"math-500": m}


def test_nemo_skills_files_are_rewritten_on_resume_and_greedy_runs_write_output_jsonl(tmp_path, monkeypatch):
    _run(tmp_path, monkeypatch)
    folder = tmp_path / "nemo_skills" / "math-500"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "output-rs1.jsonl").unlink()
    assert _run(tmp_path, monkeypatch).calls == 0  # everything was generated: nothing again, the files rewritten
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not list((tmp_path / "nemo_skills").rglob(".*.tmp"))

    greedy = tmp_path / "greedy"
    _run(greedy, monkeypatch, k=1, temperature=0.0)
    folder = greedy / "nemo_skills" / "math-500"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "output.jsonl"]  # NeMo-Skills' greedy name
    m = json.loads((folder / "metrics.json").read_text())["math-500"]
    assert list(m) == ["pass@1"]
    assert m["pass@1"] == {"num_entries": 3, "avg_tokens": 10, "symbolic_correct": pytest.approx(100 / 3),
                           "no_answer": pytest.approx(100 / 3)}
