"""The record schema of a curation run and the bookkeeping every stage shares.

One row per (problem, sample). A row is never deleted by a filter: it is marked (`kept` False,
`dropped_by`, `drop_reason`), so the report can count every stage's input and output and the
rejected records can be written with their reasons. Each filter also stores its own verdict and
score in `f_<name>_pass` / `f_<name>_score` / `f_<name>_reason` (provenance of the kept records; a kept record
may have a reason too, e.g. "unverified", counted in the stage's `kept_flagged`).
"""

from __future__ import annotations

import time

import pandas as pd

# the generate stage's failure summary, in the batch metadata (the report reads it)
FAILURES = "nrr_generation_failures"

# the per-stage counts travel with the batch in task._metadata[STAGE_LOG]
STAGE_LOG = "nrr_stage_log"


def record_id(problem_id: str, sample_index: int) -> str:
    return f"{problem_id}#{sample_index}"


def log_stage(metadata: dict, stage: str, n_in: int, n_out: int, reasons: dict | None = None,
              seconds: float | None = None, **extra) -> None:
    """Append one stage's counts to the batch metadata (the report reads them back)."""
    entry = {"stage": stage, "in": int(n_in), "out": int(n_out), "removed": int(n_in - n_out),
             "reasons": {k: int(v) for k, v in (reasons or {}).items()}}
    if seconds is not None:
        entry["seconds"] = round(seconds, 4)
    entry.update(extra)
    metadata.setdefault(STAGE_LOG, []).append(entry)


def apply_verdicts(df: pd.DataFrame, name: str, verdicts: dict[int, tuple[bool, float | None, str]],
                   metadata: dict, started: float) -> pd.DataFrame:
    """Store a filter's verdicts (row position -> (pass, score, reason)) and drop the failures.

    Only rows still kept are judged; the others keep empty verdict columns for this filter.
    """
    df = df.copy()
    n_in = int(df["kept"].sum())
    passed = [None] * len(df)
    scores = [None] * len(df)
    reasons_col = [""] * len(df)
    counts: dict[str, int] = {}
    flagged: dict[str, int] = {}  # passes with a reason (correctness: "unverified" records kept)
    for pos, (ok, score, reason) in verdicts.items():
        passed[pos], scores[pos], reasons_col[pos] = bool(ok), score, reason
        if not ok:
            counts[reason] = counts.get(reason, 0) + 1
        elif reason:
            flagged[reason] = flagged.get(reason, 0) + 1
    df[f"f_{name}_pass"] = pd.array(passed, dtype="boolean")
    df[f"f_{name}_score"] = pd.array(scores, dtype="Float64")
    df[f"f_{name}_reason"] = reasons_col
    fail = df[f"f_{name}_pass"].fillna(True).eq(False).to_numpy()
    df.loc[fail, "kept"] = False
    df.loc[fail, "dropped_by"] = name
    df.loc[fail, "drop_reason"] = [reasons_col[i] for i in range(len(df)) if fail[i]]
    log_stage(metadata, name, n_in, int(df["kept"].sum()), counts, time.perf_counter() - started,
              **({"kept_flagged": flagged} if flagged else {}))
    return df


def to_jsonable(value):
    """pandas/numpy scalars and NA to plain JSON values."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        return value.item()
    return value
