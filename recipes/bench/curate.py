"""Curation benchmark: records/s of each filter stage, and the grader's fast path against math-verify.

    nrr bench curate [n_problems=600] [n_samples=2]
    nrr bench curate soak=true [soak_problems=90]

Filter throughput is measured on embedded-teacher traces (defects included), applying each
judge to every record. The grader part grades every benchmark reference answer against itself
(boxed, as a model would write it) and against another problem's answer, once with
`recipes.grader.grade` (fast path first) and once with math-verify alone, and reports the
speed-up and whether the verdicts agree.

The soak (`soak=true`) runs the whole curation (`nrr curate`, on Ray) against the embedded teacher failing on
purpose: 10 % 429, 10 % 500, 5 % hangs (longer than the client's timeout) and 5 % cut-off JSON per request,
and counts where every (problem, sample) ended: in the corpus, rejected with a reason, or failed with an error
class. `accounted_for` says whether those add up to every record, each with its reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from recipes.data import catalog


def _traces(n_problems: int, n_samples: int) -> list[dict]:
    from curator_pipelines.filters import parse_response
    from recipes import task
    from recipes.config import load_config
    from recipes.teacher.server import TeacherServerConfig
    from recipes.teacher.traces import make_trace

    cfg = load_config(TeacherServerConfig, Path(__file__).resolve().parents[2] / "nemo_configs/teacher/embedded.yaml")
    problems = task.train_problems([1, 2, 3], max(1, n_problems // 3), seed=1)
    records = []
    for p in problems:
        for s in range(n_samples):
            t = make_trace(p.question, s, cfg.traces, max_tokens=512)
            records.append({"problem_id": p.id, "problem": p.question, "reference": p.answer, "response": t.text,
                            "finish_reason": t.finish_reason, **parse_response(t.text)})
    return records


def bench_filters(n_problems: int = 600, n_samples: int = 2) -> dict:
    from curator_pipelines.config import DecontamConfig, DedupConfig, FilterConfig
    from curator_pipelines.decontam import build_index
    from curator_pipelines.dedup import exact_duplicates, fuzzy_duplicates
    from curator_pipelines.filters import JUDGES, parse_response

    import datasketch  # noqa: F401 - its import (scipy) is not the filter's cost

    records = _traces(n_problems, n_samples)
    cfg = FilterConfig()
    out: dict[str, dict] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        out[name] = {"records": len(records), "seconds": round(seconds, 4),
                     "records_per_s": round(len(records) / seconds, 1) if seconds > 0 else None}

    timed("parse", lambda: [parse_response(r["response"]) for r in records])
    for name, judge in JUDGES.items():
        timed(f"filter_{name}", lambda judge=judge: [judge(r, cfg) for r in records])
    docs = [(i, r["problem"], r["response"]) for i, r in enumerate(records)]
    timed("dedup_exact", lambda: exact_duplicates(docs))
    timed("dedup_fuzzy", lambda: fuzzy_duplicates(docs, DedupConfig()))
    index = build_index(DecontamConfig())
    timed("decontam_match", lambda: [index.match(r["problem"]) for r in records])
    return out


def _benchmark_answers(limit_per_file: int) -> list[str]:
    answers = []
    for path in (catalog.path_of(name) for name in catalog.BENCHMARKS):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows[:limit_per_file]:
            if "final_answer" in row:
                ans = row["final_answer"]
                ans = ans[0] if isinstance(ans, list) and len(ans) == 1 else ans
            elif path.stem == "gsm8k":
                ans = row["answer"].split("####")[-1].strip()
            elif "answer" in row:
                ans = row["answer"]
            else:
                from recipes.grader import last_boxed

                ans = last_boxed(row.get("solution", ""))
            if isinstance(ans, (str, int, float)) and str(ans).strip():
                answers.append(str(ans).strip())
    return answers


def bench_grader(limit_per_file: int = 200, timeout: float = 5.0) -> dict:
    """grade() (fast path, then math-verify) against math-verify alone on benchmark answer pairs."""
    from math_verify import parse, verify

    from recipes import grader

    answers = _benchmark_answers(limit_per_file)
    # a correct pair (the answer itself) and a wrong one (the next problem's answer) per answer
    pairs = [(a, a) for a in answers] + [(answers[(i + 1) % len(answers)], a) for i, a in enumerate(answers)]
    # start-up out of the timing: the grader's math-verify worker process, math-verify's imports
    grader.grade("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")

    def mv(pred: str, ref: str) -> bool:
        try:
            gold = parse(f"${ref}$", parsing_timeout=int(timeout))
            ans = parse(f"${pred}$", parsing_timeout=int(timeout))
            return bool(gold) and bool(ans) and bool(verify(gold, ans, timeout_seconds=int(timeout)))
        except Exception:  # noqa: BLE001 - a checker failure is a wrong answer, as in the grader
            return False

    mv("1", "1")

    def timed_calls(fn, with_method: bool = False):
        verdicts, methods, seconds = [], [], []
        for p, r in pairs:
            start = time.perf_counter()
            out = fn(p, r)
            seconds.append(time.perf_counter() - start)
            verdicts.append(out[0] if with_method else out)
            methods.append(out[1] if with_method else "math_verify")
        return verdicts, methods, seconds

    grader.reset_stats()
    fast, methods, t_fast = timed_calls(lambda p, r: grader.grade_with_method(p, r, timeout=timeout), True)
    stats = grader.stats()
    slow, _, t_slow = timed_calls(mv)
    on_fast = [i for i, m in enumerate(methods) if m in ("exact", "numeric")]
    fast_sum = sum(t_fast[i] for i in on_fast)
    disagree = [{"predicted": p, "reference": r, "grade": f, "math_verify": s}
                for (p, r), f, s in zip(pairs, fast, slow) if f != s]
    return {
        "pairs": len(pairs),
        "grade_seconds": round(sum(t_fast), 4),
        "math_verify_seconds": round(sum(t_slow), 4),
        "speedup": round(sum(t_slow) / sum(t_fast), 2) if sum(t_fast) > 0 else None,
        # on the pairs the fast path decides, what skipping math-verify saves
        "fast_path_pairs": len(on_fast),
        "fast_path_speedup": round(sum(t_slow[i] for i in on_fast) / fast_sum, 1) if fast_sum > 0 else None,
        "fast_path_rate": round(grader.fast_path_rate(), 4),
        "methods": stats,
        "identical_verdicts": not disagree,
        "disagreements": len(disagree),
        "disagreement_examples": disagree[:10],
    }


SOAK_FAULTS = {"rate_429": 0.10, "rate_500": 0.10, "rate_hang": 0.05, "rate_malformed_json": 0.05}


def bench_soak(n_problems: int = 90, n_samples: int = 2, out_dir: str | None = None, seed: int = 0) -> dict:
    """The curation under injected faults: where every record ended, by reason, and the wall time."""
    import tempfile

    from curator_pipelines.config import CurateConfig
    from curator_pipelines.pipeline import run_curation
    from recipes.config import load_config

    root = Path(__file__).resolve().parents[2]
    out = Path(out_dir or tempfile.mkdtemp(prefix="nrr-soak-"))
    faults = [f"faults.{k}={v}" for k, v in SOAK_FAULTS.items()] + ["faults.hang_s=2.0", f"faults.seed={seed}"]
    overrides = [f"output_dir={out}", f"input.path={out}/problems.jsonl", "output.histograms=false",
                 f"embedded_problems.n_per_level={max(1, n_problems // 3)}", f"generation.n_samples={n_samples}",
                 # a hang outlives the client's timeout: it is retried as a timeout
                 "generation.timeout_s=1.0", "generation.max_retries=2", "generation.backoff_s=0.05",
                 "generation.backoff_max_s=0.5", f"generation.teacher_overrides=[{','.join(faults)}]"]
    cfg = load_config(CurateConfig, root / "nemo_configs/curate/embedded.yaml", overrides)
    started = time.perf_counter()
    report = run_curation(cfg, show_progress=False)
    seconds = time.perf_counter() - started

    def jsonl(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    corpus, rejected = jsonl("curated.jsonl"), jsonl("rejected.jsonl")
    failed = [r for r in rejected if r["reason"] == "generation_failed"]
    filtered = [r for r in rejected if r["reason"] != "generation_failed"]
    log = jsonl("teacher_log.jsonl")
    ids = [r["id"] for r in corpus + rejected]
    records = report["records"]
    return {
        "problems": report["problems"],
        "records": records,
        "requests_answered": len(log),  # by the teacher (a hang counts when it ends)
        "injected_faults": _count(e["fault"] for e in log if "fault" in e),
        "in_corpus": len(corpus),
        "rejected_by_filters": len(filtered),
        "rejected_reasons": _count(r["reason"] for r in filtered),
        "generation_failed": len(failed),
        "failed_by_class": _count(r["generation_error_class"] for r in failed),
        "retried_records": sum(1 for r in jsonl("generations.jsonl") if r.get("attempts", 1) > 1),
        # every record once, each rejected one with its reason (a failed one with its error class too)
        "accounted_for": (len(ids) == len(set(ids)) == records
                          and all(r["reason"] for r in filtered)
                          and all(r["generation_error_class"] and r["generation_error"] for r in failed)),
        "wall_seconds": round(seconds, 1),
        "pipeline_seconds": report["pipeline_seconds"],
        "output_dir": str(out),
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench_curate(n_problems: int = 600, n_samples: int = 2, grader_limit_per_file: int = 200, soak: bool = False,
                 soak_problems: int = 90) -> dict:
    """Filter-stage throughput and the grader's fast-path speed-up (one dict, for `nrr bench curate`); with
    `soak`, the curation under injected faults instead (`bench_soak`)."""
    if soak:
        return {"soak": bench_soak(soak_problems, n_samples)}
    return {"filters": bench_filters(n_problems, n_samples), "grader": bench_grader(grader_limit_per_file)}


if __name__ == "__main__":
    print(json.dumps(bench_curate(), indent=2))
