"""`nrr bench eval`: grading throughput and the fast-path hit rate on real benchmark answers."""

from recipes.bench.eval import bench_eval


def test_bench_eval_reports_throughput_and_fast_path_rate():
    result = bench_eval(per_benchmark=10)
    assert result["samples"] == 2 * (10 + 10 + 10 + 10 + 10 + 10)
    assert result["graded_samples_per_s"] > 0
    methods = result["methods"]
    assert sum(methods.values()) == result["samples"] and methods["no_answer"] == 0
    fast = (methods["exact"] + methods["numeric"]) / result["samples"]
    assert abs(result["fast_path_hit_rate"] - fast) < 1e-3 and fast > 0.5
    # each reference graded against itself is correct, so at least half of every benchmark's samples are
    assert all(b["correct_rate"] >= 0.5 for b in result["per_benchmark"].values())
