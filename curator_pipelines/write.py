"""Stage 8a: write the corpus as chat-format JSONL and Parquet, and the rejected records with reasons.

A corpus record is a trace record (`recipes.data.trace_record`): `messages` = [user, assistant] (what SFT trains
on), `enable_thinking`, and its provenance: teacher, problem id, sample index, reference, difficulty and pass
rate, and every filter's verdict and score.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.records import log_stage, to_jsonable
from recipes.response_format import format_response
from recipes.data.trace_record import make_record, write_records

CORPUS_JSONL = "curated.jsonl"
CORPUS_PARQUET = "curated.parquet"
REJECTED_JSONL = "rejected.jsonl"


def filter_names(df: pd.DataFrame) -> list[str]:
    return [c[2:-5] for c in df.columns if c.startswith("f_") and c.endswith("_pass")]


def _filters(row: dict, names: list[str]) -> dict:
    return {n: {"pass": to_jsonable(row.get(f"f_{n}_pass")), "score": to_jsonable(row.get(f"f_{n}_score")),
                "reason": row.get(f"f_{n}_reason") or ""} for n in names}


def corpus_record(row: dict, names: list[str]) -> dict:
    think = bool(row.get("enable_thinking", True))
    assistant = row["response"] if think else format_response(None, row["answer_part"])
    rec = make_record(
        row["record_id"], row["problem"], assistant, problem_id=row["problem_id"], reference=row["reference"],
        source=row.get("source"), teacher=row.get("teacher"), enable_thinking=think,
        sample_index=int(row["sample_index"]),
        predicted=row.get("predicted"),
        difficulty=row.get("difficulty"),
        pass_rate=to_jsonable(row.get("pass_rate")),
        n_tokens=to_jsonable(row.get("f_length_score")),
        extra=json.loads(row["extra"]) if row.get("extra") else {},
        filters=_filters(row, names),
    )
    if row.get("teacher_label") is not None:
        rec["teacher_label"] = row["teacher_label"]
    if isinstance(row.get("reasoning_field"), str):  # the thinking came apart from the answer
        rec["reasoning_field"] = row["reasoning_field"]
    return rec


def rejected_record(row: dict, names: list[str]) -> dict:
    return {
        "id": row["record_id"],
        "problem_id": row["problem_id"],
        "sample_index": int(row["sample_index"]),
        "dropped_by": row.get("dropped_by"),
        "reason": row.get("drop_reason"),
        "generation_error": row.get("gen_error"),
        "generation_error_class": row.get("gen_error_class"),
        "teacher_label": row.get("teacher_label"),
        "finish_reason": row.get("finish_reason"),
        "problem": row["problem"],
        "response": row.get("response"),
        "filters": _filters(row, names),
    }


def write_outputs(df: pd.DataFrame, out_dir: Path, jsonl: bool = True, parquet: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = filter_names(df)
    rows = df.to_dict("records")
    selected = sorted((r for r in rows if r["kept"]), key=lambda r: int(r["order"]))
    corpus = [corpus_record(r, names) for r in selected]
    rejected = [rejected_record(r, names) for r in rows if not r["kept"]]
    written = []
    if jsonl:
        write_records(corpus, out_dir / CORPUS_JSONL)
        written.append(CORPUS_JSONL)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{**r, "extra": json.dumps(r["extra"]), "filters": json.dumps(r["filters"])}
                                      for r in corpus])
        pq.write_table(table, out_dir / CORPUS_PARQUET)
        written.append(CORPUS_PARQUET)
    write_records(rejected, out_dir / REJECTED_JSONL)
    written.append(REJECTED_JSONL)
    return {"corpus": len(corpus), "rejected": len(rejected), "files": written}


class WriteStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "write"
    resources = Resources(cpus=1.0)

    def __init__(self, out_dir: str, jsonl: bool = True, parquet: bool = True):
        self.out_dir = out_dir
        self.jsonl = jsonl
        self.parquet = parquet

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df = task.to_pandas()
        info = write_outputs(df, Path(self.out_dir), self.jsonl, self.parquet)
        metadata = dict(task._metadata)
        log_stage(metadata, self.name, info["corpus"], info["corpus"], None, time.perf_counter() - started,
                  files=info["files"])
        return DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=metadata)
