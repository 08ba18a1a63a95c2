"""Stage 1: read problems from JSONL, Parquet or a `datasets` folder, with a field mapping.

A malformed record (bad JSON, a missing field, bytes that are not UTF-8) stops the run with an
error naming the file and line, or, with `on_bad_record: skip`, goes to `quarantine.jsonl` with
the same information while every good record is read.

With `generation.source: traces` the input is a dataset of finished traces instead (OpenR1-Math-220k,
Llama-Nemotron post-training, OpenThoughts, ...: `recipes.data.schemas`): `ReadTracesStage` turns each trace
into the row the generation stage would have made, so every later stage treats both alike.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path

import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch, EmptyTask

from curator_pipelines.config import InputConfig
from curator_pipelines.records import log_stage, record_id


class BadRecordError(ValueError):
    """A malformed input record; the message starts with `file:line:`."""


def _input_files(cfg: InputConfig) -> list[tuple[Path, str]]:
    path = Path(cfg.path)
    if not path.exists():
        raise BadRecordError(f"{path}: input not found")
    if path.is_dir():
        if cfg.format == "datasets" or (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return [(path, "datasets")]
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet"))
        if not files:
            raise BadRecordError(f"{path}: no .jsonl or .parquet files in this folder")
        return [(p, "parquet" if p.suffix == ".parquet" else "jsonl") for p in files]
    fmt = cfg.format if cfg.format != "auto" else ("parquet" if path.suffix == ".parquet" else "jsonl")
    return [(path, fmt)]


def _iter_jsonl(path: Path):
    """(line number, dict | None, error | None, raw) for every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})", raw
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield lineno, None, f"invalid JSON ({err.msg} at column {err.colno})", raw
                continue
            if not isinstance(obj, dict):
                yield lineno, None, f"expected a JSON object, got {type(obj).__name__}", raw
                continue
            yield lineno, obj, None, raw


def _iter_table(path: Path, fmt: str):
    if fmt == "parquet":
        rows = pd.read_parquet(path).to_dict("records")
    else:
        import datasets

        rows = datasets.load_from_disk(str(path))
    for i, row in enumerate(rows, start=1):
        yield i, dict(row), None, None


def _field(obj: dict, name: str):
    value = obj
    for part in name.split("."):  # nested fields: "meta.answer"
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _answer(value, cfg: InputConfig) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):  # several final answers (OlympiadBench): all must match
        return json.dumps([str(v) for v in value])
    text = str(value)
    if cfg.answer_regex:
        m = re.search(cfg.answer_regex, text, re.S | re.M)
        if not m:
            return None
        text = m.group(1)
    return text.strip()


def read_problems(cfg: InputConfig, quarantine_path: str | Path | None = None) -> tuple[pd.DataFrame, int]:
    """All good records as a DataFrame, and how many went to quarantine."""
    rows: list[dict] = []
    quarantined: list[dict] = []
    seen_ids: dict[str, str] = {}

    def bad(path: Path, line: int, error: str, raw) -> None:
        where = f"{path}:{line}" if line else str(path)
        if cfg.on_bad_record == "error":
            raise BadRecordError(f"{where}: {error} (set input.on_bad_record=skip to quarantine bad records)")
        raw_text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
        quarantined.append({"file": str(path), "line": line, "error": error, "raw": raw_text})

    for path, fmt in _input_files(cfg):
        n_before = len(rows) + len(quarantined)
        iterator = _iter_jsonl(path) if fmt == "jsonl" else _iter_table(path, fmt)
        for lineno, obj, error, raw in iterator:
            if error is not None:
                bad(path, lineno, error, raw)
                continue
            problem = _field(obj, cfg.problem_field)
            answer = _answer(_field(obj, cfg.answer_field), cfg)
            missing = [name for name, v in ((cfg.problem_field, problem), (cfg.answer_field, answer))
                       if v is None or (isinstance(v, str) and not v.strip())]
            solution = None
            if cfg.solution_field:
                solution = _field(obj, cfg.solution_field)
                if solution is None:
                    missing.append(cfg.solution_field)
            pid = _field(obj, cfg.id_field) if cfg.id_field else None
            if cfg.id_field and pid is None:
                missing.append(cfg.id_field)
            if missing:
                bad(path, lineno, f"missing field {', '.join(repr(m) for m in missing)}", raw if raw else json.dumps(obj, default=str))
                continue
            pid = str(pid) if pid is not None else f"{path.stem}-{lineno}"
            if pid in seen_ids:  # (problem id, sample) keys the resume log: ids must be unique
                bad(path, lineno, f"duplicate id {pid!r} (first at {seen_ids[pid]})", raw if raw else json.dumps(obj, default=str))
                continue
            seen_ids[pid] = f"{path}:{lineno}"
            rows.append({
                "problem_id": pid,
                "problem": str(problem),
                "reference": answer,
                "solution": None if solution is None else str(solution),
                "source": f"{path.name}:{lineno}",
                "extra": json.dumps({k: _field(obj, k) for k in cfg.extra_fields}, default=str),
            })
            if cfg.limit and len(rows) >= cfg.limit:
                break
        if len(rows) + len(quarantined) == n_before:
            bad(path, 0, "empty file: no records", "")
        if cfg.limit and len(rows) >= cfg.limit:
            break

    if quarantine_path is not None and quarantined:
        Path(quarantine_path).parent.mkdir(parents=True, exist_ok=True)
        with open(quarantine_path, "w", encoding="utf-8") as f:
            for q in quarantined:
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
    if not rows:
        raise BadRecordError(f"{cfg.path}: no usable records ({len(quarantined)} quarantined)")
    return pd.DataFrame(rows), len(quarantined)


class ReadProblemsStage(ProcessingStage[EmptyTask, DocumentBatch]):
    """Reads every input file into one batch (the global stages downstream see the whole corpus)."""

    name = "read"
    resources = Resources(cpus=0.5)

    def __init__(self, cfg: InputConfig, quarantine_path: str):
        self.cfg = cfg
        self.quarantine_path = quarantine_path

    def process(self, task: EmptyTask) -> DocumentBatch:
        started = time.perf_counter()
        df, n_bad = read_problems(self.cfg, self.quarantine_path)
        metadata: dict = {}
        log_stage(metadata, self.name, len(df) + n_bad, len(df), {"quarantined": n_bad} if n_bad else {},
                  time.perf_counter() - started, unit="problems")
        return DocumentBatch(dataset_name="problems", data=df, _metadata=metadata)


# ------------------------------------------------------------------ finished traces (no generation)

# a trace record's own keys; the rest of it (schema, original id, the dataset's provenance) goes to `extra`
_RECORD_KEYS = ("id", "messages", "enable_thinking", "problem_id", "reference", "source", "teacher")


def trace_source(cfg: InputConfig, teacher: str | None = None):
    from recipes.data.schemas import DatasetSource

    # every generation is read (OpenR1's math-verify rejects too): the correctness filter judges and counts them
    return DatasetSource(cfg.path, schema=cfg.schema, fields=dict(cfg.fields), keep_incorrect=True, teacher=teacher)


def read_traces(cfg: InputConfig, teacher: str | None = None, first_only: bool = False) -> pd.DataFrame:
    """One row per trace, with the columns the generation stage gives its results (`kept` True): the problem,
    `response` (the assistant message), `enable_thinking` as the dataset has it, and in `extra` the schema,
    the dataset's record id, row and provenance. The schemas' DataError comes as a BadRecordError."""
    from recipes.data import schemas
    from recipes.data.trace_record import DataError

    rows: list[dict] = []
    n_samples: collections.Counter = collections.Counter()
    try:
        for where, rec in schemas.read_traces(trace_source(cfg, teacher)):
            turns = {m.get("role"): m.get("content") for m in rec["messages"]}
            if not isinstance(turns.get("user"), str) or not isinstance(turns.get("assistant"), str):
                raise BadRecordError(f"{where}: a trace needs a user and an assistant message")
            pid = str(rec["problem_id"])
            sample = n_samples[pid]  # the k-th trace of this problem in the dataset
            n_samples[pid] += 1
            provenance = {k: v for k, v in rec.items() if k not in _RECORD_KEYS and k != "schema"}
            rows.append({
                "problem_id": pid,
                "problem": turns["user"],
                "reference": None if rec.get("reference") is None else str(rec["reference"]),
                "source": rec.get("source") or Path(cfg.path).name,
                "extra": json.dumps({"schema": rec.get("schema", "record"), "original_id": rec.get("id"),
                                     "where": where, **provenance}, default=str, ensure_ascii=False),
                "sample_index": sample,
                "record_id": record_id(pid, sample),
                "response": turns["assistant"],
                "enable_thinking": bool(rec.get("enable_thinking", True)),
                "teacher": rec.get("teacher"),
                "kept": True,
                "dropped_by": None,
                "drop_reason": None,
            })
            if first_only or (cfg.limit and len(rows) >= cfg.limit):
                break
    except DataError as err:
        raise BadRecordError(str(err)) from None
    if not rows:
        raise BadRecordError(f"{cfg.path}: no traces in this dataset")
    return pd.DataFrame(rows)


class ReadTracesStage(ProcessingStage[EmptyTask, DocumentBatch]):
    """Reads a trace dataset into one batch of records as generated (the generation stage is left out)."""

    name = "read"
    resources = Resources(cpus=0.5)

    def __init__(self, cfg: InputConfig, teacher: str | None = None):
        self.cfg = cfg
        self.teacher = teacher

    def process(self, task: EmptyTask) -> DocumentBatch:
        started = time.perf_counter()
        df = read_traces(self.cfg, self.teacher)
        extra = [json.loads(e) for e in df["extra"]]
        think = int(df["enable_thinking"].sum())
        metadata: dict = {}
        log_stage(metadata, self.name, len(df), len(df), {}, time.perf_counter() - started, unit="traces",
                  dataset=self.cfg.path, schema=sorted({e["schema"] for e in extra}),
                  rows=len({e["where"] for e in extra}), problems=int(df["problem_id"].nunique()),
                  think=think, no_think=len(df) - think)
        return DocumentBatch(dataset_name="traces", data=df, _metadata=metadata)
