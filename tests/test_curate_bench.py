"""`recipes.bench.curate`: filter throughput and the grader's fast path against math-verify alone."""

from recipes.bench.curate import bench_curate


def test_bench_curate_reports_filter_speed_and_grader_speedup_with_identical_verdicts():
    """What the benchmark counts and compares; its speeds are reported, not asserted (they move with the load on a
    shared CI machine: `nrr bench curate` is where they are read)."""
    result = bench_curate(n_problems=150, n_samples=2, grader_limit_per_file=25)
    filters = result["filters"]
    for stage in ("parse", "filter_truncation", "filter_format", "filter_correctness", "filter_length",
                  "filter_repetition", "filter_language", "dedup_exact", "dedup_fuzzy", "decontam_match"):
        assert filters[stage]["records"] == 150 * 2 and filters[stage]["records_per_s"] > 0, stage
    g = result["grader"]
    assert g["pairs"] >= 200 and g["identical_verdicts"], g["disagreement_examples"]
    assert g["fast_path_rate"] > 0.5 and g["fast_path_speedup"] > 0 and g["speedup"] > 0
