"""Stage 1: read problems from JSONL, Parquet or a `datasets` folder, with a field mapping.

A malformed record (bad JSON, a missing field, bytes that are not UTF-8) stops the run with an
error naming the file and line, or, with `on_bad_record: skip`, goes to `quarantine.jsonl` with
the same information while every good record is read.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch, EmptyTask

from curator_pipelines.config import InputConfig
from curator_pipelines.records import log_stage


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
