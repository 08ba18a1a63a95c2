"""Metrics over graded samples (one record per (problem, sample)).

- pass@1: the mean over problems of (correct samples / samples), with its standard error across
  problems (sample standard deviation / sqrt(problems)).
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct), averaged.
- maj@k: a vote over the first k samples of a problem. Answers vote by their normalised form
  (`grader.normalize`); samples without an answer do not vote. Ties go to the answer whose first
  vote came earliest (the lowest sample index); the problem counts as solved when that answer
  was graded correct.
- lengths: thinking and answer tokens, averaged over all, correct and wrong samples.
- self-reflection: markers ("wait", "let me check", "alternatively", "verify", ...) in the thinking
  (the whole response when it has no think block): the share of responses with at least one, and
  markers per 1,000 generated tokens.
- format compliance: the response ends its think block (when thinking was asked for) and commits to an
  answer; truncation: generation stopped at max_tokens.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict

from recipes.grader import normalize

REFLECTION_MARKERS = (
    "wait", "let me check", "let me verify", "let me double-check", "double-check", "double check",
    "alternatively", "verify", "re-check", "recheck", "hmm", "on second thought", "let me reconsider",
    "i made a mistake", "let me re-",
)
_MARKER_RE = re.compile("|".join(rf"\b{re.escape(m)}" for m in REFLECTION_MARKERS), re.I)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(samples: list[dict], k: int) -> bool:
    """maj@k for one problem; `samples` sorted by sample index, each with predicted_answer/is_correct."""
    votes: dict[str, list] = {}  # normalised answer -> [count, first index, correct]
    for i, s in enumerate(samples[:k]):
        if s.get("predicted_answer") is None:
            continue
        key = normalize(str(s["predicted_answer"]))
        if key not in votes:
            votes[key] = [0, i, bool(s["is_correct"])]
        votes[key][0] += 1
    if not votes:
        return False
    best = max(votes.values(), key=lambda v: (v[0], -v[1]))  # most votes, then earliest first vote
    return best[2]


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def reflection_count(text: str) -> int:
    return len(_MARKER_RE.findall(text or ""))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def group_by_problem(records: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by[str(r["id"])].append(r)
    for samples in by.values():
        samples.sort(key=lambda r: r["sample_idx"])
    return dict(by)


def accuracy_metrics(records: list[dict]) -> dict:
    """pass@1 (+ standard error), pass@k and maj@k for k in 1, 2, 4, ..., n."""
    by = group_by_problem(records)
    if not by:
        return {"problems": 0, "samples": 0}
    n = min(len(s) for s in by.values())  # every problem is scored on the same number of samples
    per_problem = [sum(bool(r["is_correct"]) for r in s[:n]) / n for s in by.values()]
    out = {
        "problems": len(by),
        "samples": sum(len(s) for s in by.values()),
        "samples_per_problem": n,
        "pass@1": statistics.fmean(per_problem),
        "pass@1_se": statistics.stdev(per_problem) / math.sqrt(len(per_problem)) if len(per_problem) > 1 else 0.0,
        "pass@k": {},
        "maj@k": {},
    }
    for k in ks_for(n):
        out["pass@k"][str(k)] = statistics.fmean(
            pass_at_k(n, sum(bool(r["is_correct"]) for r in s[:n]), k) for s in by.values()
        )
        out["maj@k"][str(k)] = statistics.fmean(float(majority_correct(s, k)) for s in by.values())
    return out


def paired_difference(a: list[dict], b: list[dict], group: str | None = "level") -> dict:
    """Model b's pass@1 minus model a's on the problems both answered, with the paired standard error: the
    sample standard deviation of the per-problem differences / sqrt(problems). Pairing removes the spread of
    problem difficulty, which two independent standard errors would count twice. Overall and per `group`
    (e.g. level): {"all": {...}, "by_<group>": {value: {...}}}, each {problems, a, b, diff, se}."""
    def per_problem(records):
        return {pid: (statistics.fmean(bool(r["is_correct"]) for r in s), s[0].get(group) if group else None)
                for pid, s in group_by_problem(records).items()}

    pa, pb = per_problem(a), per_problem(b)
    shared = sorted(pa.keys() & pb.keys())

    def stats(ids):
        d = [pb[i][0] - pa[i][0] for i in ids]
        return {"problems": len(ids), "a": statistics.fmean(pa[i][0] for i in ids),
                "b": statistics.fmean(pb[i][0] for i in ids), "diff": statistics.fmean(d),
                "se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0}

    out = {"all": stats(shared) if shared else {"problems": 0}}
    if group:
        values = sorted({pa[i][1] for i in shared if pa[i][1] is not None}, key=lambda v: (str(type(v)), v))
        out[f"by_{group}"] = {str(v): stats([i for i in shared if pa[i][1] == v]) for v in values}
    return out


def length_metrics(records: list[dict]) -> dict:
    def avg(field: str, subset: list[dict]) -> float | None:
        return _mean([float(r[field]) for r in subset if r.get(field) is not None])

    correct = [r for r in records if r["is_correct"]]
    wrong = [r for r in records if not r["is_correct"]]
    out = {}
    for field in ("num_generated_tokens", "thinking_tokens", "answer_tokens"):
        out[field] = {"all": avg(field, records), "correct": avg(field, correct), "wrong": avg(field, wrong)}
    return out


def behaviour_metrics(records: list[dict]) -> dict:
    if not records:
        return {}
    markers = [int(r.get("reflection_markers", 0)) for r in records]
    tokens = sum(int(r.get("num_generated_tokens") or 0) for r in records)
    return {
        "reflection_rate": sum(m > 0 for m in markers) / len(records),
        "reflections_per_1k_tokens": 1000.0 * sum(markers) / tokens if tokens else 0.0,
        "format_compliance": sum(bool(r.get("format_ok")) for r in records) / len(records),
        "truncation_rate": sum(bool(r.get("truncated")) for r in records) / len(records),
        "no_answer_rate": sum(r.get("predicted_answer") is None for r in records) / len(records),
    }


def summarize(records: list[dict]) -> dict:
    """Every metric of one benchmark's records; per level too when the problems have levels."""
    out = {**accuracy_metrics(records), "lengths": length_metrics(records), **behaviour_metrics(records)}
    levels = sorted({r["level"] for r in records if r.get("level") is not None})
    if levels:
        out["by_level"] = {
            str(lvl): accuracy_metrics([r for r in records if r.get("level") == lvl]) for lvl in levels
        }
    return out
