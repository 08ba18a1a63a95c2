"""`nrr bench eval`: how fast the shared grader grades, and how often its fast path decides.

Responses are built from the real benchmark answers: each reference answer boxed as written (a
correct response) and the boxed answer of another problem of the same benchmark (almost always a
wrong one, of a realistic form). The fast path (string / number / structure) should decide most of
them; the rest go to math-verify in its worker process.
"""

from __future__ import annotations

import random
import time

from recipes import grader
from recipes.evaluation.benchmarks import BUILTIN, load_benchmark
from recipes.evaluation.config import BenchmarkConfig


def _boxed(answer) -> str:
    return f"<think>\nwork\n</think>\n\nThe answer is $\\boxed{{{grader._as_text(answer)}}}$."


def bench_eval(per_benchmark: int = 100, seed: int = 0, timeout: float = 5.0) -> dict:
    rng = random.Random(seed)
    pairs: list[tuple[str, str, object]] = []
    for name in BUILTIN:
        problems = load_benchmark(BenchmarkConfig(name=name, limit=per_benchmark))
        answers = [p["answer"] for p in problems]
        for p in problems:
            pairs.append((name, _boxed(p["answer"]), p["answer"]))
            pairs.append((name, _boxed(rng.choice(answers)), p["answer"]))
    grader.grade("1", r"\sqrt{1}")  # start the math-verify worker before timing
    grader.reset_stats()
    per_bench: dict[str, dict] = {}
    start = time.perf_counter()
    for name, response, reference in pairs:
        result = grader.grade_response(response, reference, timeout=timeout)
        b = per_bench.setdefault(name, {"samples": 0, "fast": 0, "correct": 0})
        b["samples"] += 1
        b["fast"] += result.method in ("exact", "numeric")
        b["correct"] += result.correct
    seconds = time.perf_counter() - start
    return {
        "samples": len(pairs),
        "seconds": round(seconds, 3),
        "graded_samples_per_s": round(len(pairs) / seconds, 1),
        "fast_path_hit_rate": round(grader.fast_path_rate(), 4),
        "methods": grader.stats(),
        "per_benchmark": {
            name: {"samples": b["samples"], "fast_path_hit_rate": round(b["fast"] / b["samples"], 4),
                   "correct_rate": round(b["correct"] / b["samples"], 4)}
            for name, b in per_bench.items()
        },
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_eval(), indent=2))
