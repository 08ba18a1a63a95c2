"""A run's samples and metrics also in NeMo-Skills' layout, for tools that read NeMo-Skills evaluations.

`<output_dir>/nemo_skills/<benchmark>/` holds what NeMo-Skills' `ns eval` writes to `eval-results/<benchmark>/`:
- `output-rs<seed>.jsonl`, one file per random seed, one line per problem in the benchmark's order (NeMo-Skills'
  metrics read the files line by line side by side); sample i of every problem is seed i. A greedy run (k=1,
  temperature 0) writes `output.jsonl` instead, NeMo-Skills' name for it.
- `metrics.json`: {benchmark: {evaluation mode: metrics}}, as `summarize_results --save_metrics_path` writes it.
`<output_dir>/nemo_skills/metrics.json` holds every benchmark of the run, as `summarize_results` writes it
(`python -m nemo_skills.pipeline.summarize_results <output_dir>/nemo_skills` recomputes it from the files).
Built-in benchmarks take NeMo-Skills' dataset names (math500 -> math-500), from which it picks the metric type
(math); any other label (embedded, a jsonl file) is kept, and its summaries need `--metric_type math`.

Followed (NVIDIA/NeMo-Skills at 0b012df): the file names from nemo_skills/pipeline/utils/generation.py
(`get_chunked_rs_filename`) and nemo_skills/pipeline/summarize_results.py; the record fields from
nemo_skills/inference/generate.py and nemo_skills/inference/model/base.py (`generation`, `num_generated_tokens`,
`finish_reason`, `num_reasoning_tokens`, `num_answer_tokens`) and nemo_skills/evaluation/evaluator/math.py
(`predicted_answer`, `symbolic_correct`); the metrics from nemo_skills/evaluation/metrics/base.py, math_metrics.py
and compute_metrics.py: pass@k (unbiased, over all samples) and pass@1[avg-of-k] for k = 1..n, majority@k for
k = 2..n (ties between answers average their correctness), `no_answer`, rates in percent, `num_entries`,
`avg_tokens`, the `*_statistics` of pass@1[avg-of-k], and no pass@1[avg-of-1]. Not written: `gen_seconds`
(no per-sample generation times here).

The files are derived from `<output_dir>/<benchmark>.jsonl` after each benchmark, so a resumed run rewrites them
whole; each is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from recipes.evaluation.metrics import pass_at_k

DATASET_NAMES = {"math500": "math-500"}  # ours -> NeMo-Skills' where they differ


def dataset_name(label: str) -> str:
    return DATASET_NAMES.get(label, label)


def to_record(rec: dict) -> dict:
    """One sample with NeMo-Skills' field names (the input fields first, then what generation and grading add)."""
    out = {"id": rec["id"], "problem": rec["problem"], "expected_answer": rec["expected_answer"]}
    if rec.get("level") is not None:
        out["level"] = rec["level"]
    return {**out, "generation": rec["generation"], "predicted_answer": rec["predicted_answer"],
            "symbolic_correct": bool(rec["is_correct"]), "num_generated_tokens": rec["num_generated_tokens"],
            "num_reasoning_tokens": rec["thinking_tokens"], "num_answer_tokens": rec["answer_tokens"],
            "finish_reason": rec["finish_reason"]}


def _majority(answers: list, scores: list[bool]) -> float:
    votes = Counter((a, s) for a, s in zip(answers, scores) if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [score for (_, score), count in votes.items() if count == top]
    return sum(tied) / len(tied)


def _statistics(per_problem: list[list[float]], k: int) -> dict:
    runs = [statistics.fmean(scores[i] for scores in per_problem) for i in range(k)]
    std_dev = statistics.stdev(runs)
    return {"avg": statistics.fmean(statistics.fmean(s[:k]) for s in per_problem),
            "std_dev_across_runs": std_dev,
            "avg_sample_std_dev": statistics.fmean(statistics.stdev(s[:k]) for s in per_problem),
            "std_err_across_runs": std_dev / math.sqrt(k)}


def compute_metrics(samples: list[list[dict]]) -> dict:
    """NeMo-Skills' math metrics of a benchmark: one list of n NeMo-Skills records per problem."""
    total, n = len(samples), len(samples[0])
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    scores: dict[str, list[list[float]]] = defaultdict(list)
    tokens = 0.0
    for preds in samples:
        tokens += sum(p["num_generated_tokens"] for p in preds) / n
        for method, field in (("reasoning_tokens", "num_reasoning_tokens"), ("answer_tokens", "num_answer_tokens")):
            scores[method].append([float(p[field]) for p in preds])
        correct = [bool(p["symbolic_correct"]) for p in preds]
        scores["symbolic_correct"].append([float(c) for c in correct])
        answers = [p["predicted_answer"] for p in preds]
        none = [a is None for a in answers]
        for k in range(1, n + 1):
            sums[f"pass@{k}"]["symbolic_correct"] += pass_at_k(n, sum(correct), k)
            sums[f"pass@{k}"]["no_answer"] += all(none[:k])
            sums[f"pass@1[avg-of-{k}]"]["symbolic_correct"] += sum(correct[:k]) / k
            sums[f"pass@1[avg-of-{k}]"]["no_answer"] += sum(none[:k]) / k
        for k in range(2, n + 1):
            sums[f"majority@{k}"]["symbolic_correct"] += _majority(answers[:k], correct[:k])
            sums[f"majority@{k}"]["no_answer"] += all(none[:k])
    common = {"num_entries": total, **({"avg_tokens": int(tokens / total)} if tokens > 0 else {})}
    out = {mode: {**common, **{key: 100.0 * v / total for key, v in values.items()}} for mode, values in sums.items()}
    for k in range(2, n + 1):
        for method, per_problem in scores.items():
            out[f"pass@1[avg-of-{k}]"][f"{method}_statistics"] = _statistics(per_problem, k)
    out.pop("pass@1[avg-of-1]", None)
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # not *.jsonl: NeMo-Skills' readers glob for those
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_benchmark(root: Path, label: str, problem_ids: list[str], records: list[dict], k: int,
                    greedy: bool) -> dict:
    """Write one benchmark's files under root/<dataset name>/ (problems with all k samples, in benchmark order);
    returns its metrics. Older output*.jsonl files there (another k, greedy vs sampled) are removed."""
    by = {(str(r["id"]), r["sample_idx"]): r for r in records}
    ids = [i for i in problem_ids if all((i, s) in by for s in range(k))]
    if not ids:
        return {}
    folder = root / dataset_name(label)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["output.jsonl"] if greedy and k == 1 else [f"output-rs{s}.jsonl" for s in range(k)]
    for stale in set(p.name for p in folder.glob("output*.jsonl")) - set(names):
        (folder / stale).unlink()
    samples = [[to_record(by[(i, s)]) for s in range(k)] for i in ids]
    for s, name in enumerate(names):
        _write(folder / name, "".join(json.dumps(row[s], ensure_ascii=False) + "\n" for row in samples))
    metrics = compute_metrics(samples)
    _write(folder / "metrics.json", json.dumps({dataset_name(label): metrics}, indent=2))
    return metrics


def write_summary(root: Path, metrics: dict[str, dict]) -> None:
    """root/metrics.json: {dataset name: metrics} of every benchmark written."""
    if metrics:
        _write(root / "metrics.json", json.dumps({dataset_name(b): m for b, m in metrics.items() if m}, indent=2))
