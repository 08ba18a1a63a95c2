"""Stage 7: keep up to k correct traces per problem, label difficulty, order the corpus.

Difficulty comes from the teacher's pass rate on the problem (correct, well-formed samples over all
samples asked). Selection prefers traces with distinct reasoning. The order is a curriculum
(shortest first), the input order, or a seeded shuffle; a share of records can be turned into
no-think answers (an empty think block), spread evenly through the order.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.config import SelectConfig
from curator_pipelines.dedup import normalize
from curator_pipelines.records import log_stage


def difficulty(pass_rate: float, cfg: SelectConfig) -> str:
    if pass_rate >= cfg.easy_pass_rate:
        return "easy"
    if pass_rate < cfg.hard_pass_rate:
        return "hard"
    return "medium"


def think_off_positions(n: int, ratio: float) -> set[int]:
    """Evenly spread positions: position i is no-think when floor((i+1)r) > floor(ir)."""
    if ratio <= 0:
        return set()
    return {i for i in range(n) if int((i + 1) * ratio) > int(i * ratio)}


def select(df: pd.DataFrame, cfg: SelectConfig) -> tuple[pd.DataFrame, dict]:
    df = df.copy()
    # a trace dataset's records may have no reference: they do not count, and a problem with none has no pass rate
    has_ref = df["reference"].notna() if "reference" in df else pd.Series(True, index=df.index)
    generated = df["response"].notna() & has_ref
    correct = df["f_correctness_pass"].fillna(False).astype(bool) if "f_correctness_pass" in df else generated
    per_problem = pd.DataFrame({"pid": df["problem_id"], "gen": generated, "ok": correct & generated, "ref": has_ref})
    rates = per_problem.groupby("pid", sort=False).agg(gen=("gen", "sum"), ok=("ok", "sum"), ref=("ref", "any"))
    rates["pass_rate"] = np.where(rates["gen"] > 0, rates["ok"] / rates["gen"].clip(lower=1),
                                  np.where(rates["ref"], 0.0, np.nan))
    rates["difficulty"] = [difficulty(r, cfg) if ref else "unverified"
                           for r, ref in zip(rates["pass_rate"], rates["ref"])]
    df["pass_rate"] = df["problem_id"].map(rates["pass_rate"]).astype(float)
    df["difficulty"] = df["problem_id"].map(rates["difficulty"])

    n_in = int(df["kept"].sum())
    chosen: list[int] = []
    for _, group in df[df["kept"]].groupby("problem_id", sort=False):
        group = group.sort_values("sample_index")
        picks: list[int] = []
        if cfg.prefer_distinct:
            seen: set[str] = set()
            for idx, think in zip(group.index, group["think"]):
                key = normalize(think or "")
                if key not in seen:
                    seen.add(key)
                    picks.append(idx)
        picks += [i for i in group.index if i not in picks]
        chosen += picks[: cfg.max_per_problem]
    over = df["kept"] & ~df.index.isin(chosen)
    df.loc[over, "kept"] = False
    df.loc[over, "dropped_by"] = "select"
    df.loc[over, "drop_reason"] = "over_max_per_problem"

    sel = df.loc[chosen]
    if cfg.order == "curriculum":
        length = sel["f_length_score"] if "f_length_score" in sel else sel["response"].str.len()
        sel = sel.assign(_len=length.astype(float)).sort_values(["_len", "record_id"], kind="stable")
    elif cfg.order == "shuffle":
        order = list(sel.index)
        random.Random(cfg.seed).shuffle(order)
        sel = sel.loc[order]
    df["order"] = pd.array([pd.NA] * len(df), dtype="Int64")
    df.loc[sel.index, "order"] = np.arange(len(sel))
    off = think_off_positions(len(sel), cfg.think_off_ratio)
    # a trace dataset's own no-think records stay so; think_off_ratio turns a share of the rest into no-think
    df["enable_thinking"] = df["enable_thinking"].astype(bool) if "enable_thinking" in df else True
    df.loc[[idx for i, idx in enumerate(sel.index) if i in off], "enable_thinking"] = False
    stats = {"n_in": n_in, "n_out": len(sel), "over_max_per_problem": int(over.sum()),
             "difficulty": {k: int(v) for k, v in rates["difficulty"].value_counts().items()},
             "think_off": len(off)}
    return df, stats


class SelectStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "select"
    resources = Resources(cpus=1.0)

    def __init__(self, cfg: SelectConfig):
        self.cfg = cfg

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df, stats = select(task.to_pandas(), self.cfg)
        metadata = dict(task._metadata)
        reasons = {"over_max_per_problem": stats["over_max_per_problem"]} if stats["over_max_per_problem"] else {}
        log_stage(metadata, self.name, stats["n_in"], stats["n_out"], reasons, time.perf_counter() - started,
                  difficulty=stats["difficulty"], think_off=stats["think_off"])
        return DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=metadata)
