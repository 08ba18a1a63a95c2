"""Benchmarks as lists of problems: {id, benchmark, problem, answer[, level]}.

Each built-in benchmark is a dataset of `recipes.data.catalog` (resolved through the data root) with
how to read its problem, reference answer and id; any other JSONL works with `name: jsonl` and its field names.
The embedded arithmetic task reads its fixed held-out split from `recipes.task`. What the model is asked for each
problem is `recipes.evaluation.prompts`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from recipes.data import catalog
from recipes.grader import last_boxed


def _gsm8k_answer(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


def _minerva_answer(row: dict) -> str:
    answer = last_boxed(row["solution"])
    if answer is None:
        raise ValueError("solution has no \\boxed{} answer")
    return answer


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    problem_field: str
    answer: Callable[[dict], object]  # the reference answer of a row (a string, or a list of them)
    id_field: str | None


BUILTIN: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("problem", lambda r: r["answer"], "unique_id"),
    "aime24": BenchmarkSpec("problem", lambda r: str(r["answer"]), "id"),
    # AMC23 answers are floats in the file (27.0): the integer is the answer
    "amc23": BenchmarkSpec("problem", lambda r: f"{float(r['answer']):g}", "id"),
    "gsm8k": BenchmarkSpec("question", _gsm8k_answer, None),
    "minerva_math": BenchmarkSpec("problem", _minerva_answer, "idx"),
    # final_answer is a list: every answer must be given (in any order)
    "olympiadbench": BenchmarkSpec("question", lambda r: r["final_answer"], "id"),
}
NAMES = (*BUILTIN, "embedded", "jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return catalog.read_jsonl(path)


def load_benchmark(cfg, data_root: str | None = None) -> list[dict]:
    """Problems of one benchmark (a `BenchmarkConfig`), the first `limit` of them when set.

    A built-in benchmark is read from `data_root` (see `catalog.data_root`) unless `cfg.path` names a file.
    """
    if cfg.name == "embedded":
        from recipes import task

        problems = [dict(p.to_dict(), benchmark="embedded") for p in task.heldout_problems(cfg.levels, cfg.n_per_level)]
        return problems[: cfg.limit] if cfg.limit else problems
    if cfg.name == "jsonl":
        if not cfg.path:
            raise ValueError("benchmark 'jsonl' needs a path")
        path = Path(cfg.path)
        rows = _read_jsonl(path)
        out = []
        for i, row in enumerate(rows):
            for field in (cfg.problem_field, cfg.answer_field):
                if field not in row:
                    raise ValueError(f"{path}:{i + 1}: no field '{field}' (fields: {', '.join(row)})")
            pid = row.get(cfg.id_field) if cfg.id_field else None
            out.append({"id": str(pid if pid is not None else i), "benchmark": cfg.label or path.stem,
                        "problem": row[cfg.problem_field], "answer": row[cfg.answer_field]})
        return out[: cfg.limit] if cfg.limit else out
    if cfg.name not in BUILTIN:
        raise ValueError(f"unknown benchmark '{cfg.name}'; choose one of {', '.join(NAMES)}")
    spec = BUILTIN[cfg.name]
    path = Path(cfg.path) if cfg.path else catalog.path_of(cfg.name, data_root)
    rows = _read_jsonl(path)
    if cfg.limit:
        rows = rows[: cfg.limit]
    out = []
    for i, row in enumerate(rows):
        try:
            answer = spec.answer(row)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}:{i + 1}: cannot read the answer: {err}") from None
        pid = row.get(spec.id_field) if spec.id_field else None
        out.append({"id": str(pid if pid is not None else i), "benchmark": cfg.label or cfg.name,
                    "problem": row[spec.problem_field], "answer": answer})
    return out
