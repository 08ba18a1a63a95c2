"""The trace record: one conversation of a training corpus (what SFT trains on) and where it came from.

Every corpus writer builds its records with `make_record` and writes them with `write_records` (curation's
`curated.jsonl`, the embedded task corpus, rejection sampling); SFT reads any of them with `read_records`
(JSONL or Parquet, a file or a folder). One schema:

    {"id", "messages": [{"role": "user", "content"}, {"role": "assistant", "content"}], "enable_thinking",
     "problem_id", "reference", "source", "teacher", ...provenance fields of the writer}

The assistant content is `<think>\\n...\\n</think>\\n\\n<answer>` (or the no-think form); provenance fields
never reach the tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    """A problem with a corpus record, naming the file and line (or Parquet row)."""


def make_record(record_id: str, problem: str, response: str, *, problem_id: str, reference, source: str,
                teacher: str | None, enable_thinking: bool = True, **provenance) -> dict:
    return {"id": record_id,
            "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": response}],
            "enable_thinking": enable_thinking, "problem_id": problem_id, "reference": reference, "source": source,
            "teacher": teacher, **provenance}


def write_records(records: Iterable[dict], path: str | Path) -> Path:
    """JSONL, written to a temporary file and renamed: a reader never sees half a corpus."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def corpus_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".parquet"))
        if not files:
            raise DataError(f"{p}: no .jsonl or .parquet files in this folder")
        return files
    if not p.exists():
        raise DataError(f"{p}: corpus file not found")
    if p.suffix not in (".jsonl", ".parquet", ".json"):
        raise DataError(f"{p}: unsupported corpus format (expected .jsonl or .parquet)")
    return [p]


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for every record: where is 'file:line' (JSONL) or 'file:row N' (Parquet); a line
    that is not JSON comes as a DataError in place of the record."""
    for f in corpus_files(path):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, rec in enumerate(pq.read_table(f).to_pylist()):
                yield f"{f}:row {i + 1}", rec
            continue
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{f}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{f}:{lineno}", DataError(f"invalid JSON ({err.msg})")
