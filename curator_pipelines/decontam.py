"""Stage 6: decontaminate against evaluation sets (n-gram overlap on problems), reporting each match.

Sources: the named benchmarks of the data root and any other JSONL in `benchmark_paths` (word n-grams; a problem shorter than n words
must equal a benchmark problem after normalisation) and the embedded task's held-out split
(`recipes.task.heldout_problems`, exact match of the expression).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.config import DecontamConfig
from curator_pipelines.records import apply_verdicts
from recipes.data import catalog

MATCHES = "nrr_decontam_matches"
_WORD = re.compile(r"\w+")
_PROBLEM_FIELDS = ("problem", "question", "prompt")
_ID_FIELDS = ("id", "unique_id", "idx")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _expr_key(text: str) -> str:
    return re.sub(r"\s+", "", text)


class ContaminationIndex:
    """Where each benchmark n-gram (and whole short problem) comes from."""

    def __init__(self, n: int):
        self.n = n
        self.ngrams: dict[tuple[str, ...], str] = {}
        self.whole: dict[tuple[str, ...], str] = {}
        self.expressions: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def add(self, text: str, ref: str) -> None:
        w = words(text)
        self.whole.setdefault(tuple(w), ref)
        for i in range(len(w) - self.n + 1):
            self.ngrams.setdefault(tuple(w[i : i + self.n]), ref)

    def add_benchmark_file(self, path: Path) -> None:
        count = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                text = next((rec[k] for k in _PROBLEM_FIELDS if isinstance(rec.get(k), str)), None)
                if text is None:
                    continue
                rid = next((rec[k] for k in _ID_FIELDS if rec.get(k) is not None), lineno)
                self.add(text, f"{path.stem}:{rid}")
                count += 1
        self.sizes[path.stem] = count

    def add_embedded_heldout(self, levels: list[int], per_level: int) -> None:
        from recipes import task

        problems = task.heldout_problems(levels, per_level)
        for p in problems:
            self.expressions[_expr_key(p.question)] = f"embedded-heldout:{p.id}"
        self.sizes["embedded-heldout"] = len(problems)

    def match(self, problem: str) -> tuple[str, str] | None:
        """(source reference, how it matched) for a contaminated problem, else None."""
        ref = self.expressions.get(_expr_key(problem))
        if ref:
            return ref, "heldout_expression"
        w = words(problem)
        if len(w) < self.n:
            ref = self.whole.get(tuple(w))
            return (ref, "whole_problem") if ref and w else None
        for i in range(len(w) - self.n + 1):
            ref = self.ngrams.get(tuple(w[i : i + self.n]))
            if ref:
                return ref, f"{self.n}-gram: {' '.join(w[i : i + self.n])}"
        return None


def build_index(cfg: DecontamConfig, data_root: str | None = None) -> ContaminationIndex:
    index = ContaminationIndex(cfg.ngram)
    for name in cfg.benchmarks:
        index.add_benchmark_file(catalog.path_of(name, data_root))
    for path in cfg.benchmark_paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"decontam.benchmark_paths: {path} is not a file")
        index.add_benchmark_file(Path(path))
    if cfg.embedded_heldout:
        index.add_embedded_heldout(cfg.heldout_levels, cfg.heldout_per_level)
    return index


class DecontamStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "decontam"
    resources = Resources(cpus=1.0)

    def __init__(self, cfg: DecontamConfig, data_root: str | None = None):
        self.cfg = cfg
        self.data_root = data_root

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df = task.to_pandas()
        index = build_index(self.cfg, self.data_root)
        cache: dict[str, tuple[str, str] | None] = {}
        verdicts = {}
        matches = []
        for pos, (pid, problem, kept) in enumerate(zip(df["problem_id"], df["problem"], df["kept"])):
            if not kept:
                continue
            if pid not in cache:
                cache[pid] = index.match(problem)
                if cache[pid]:
                    matches.append({"problem_id": pid, "problem": problem[:200], "source": cache[pid][0],
                                    "how": cache[pid][1]})
            hit = cache[pid]
            verdicts[pos] = (False, 1.0, "contaminated") if hit else (True, 0.0, "")
        metadata = dict(task._metadata)
        metadata[MATCHES] = matches
        metadata["nrr_decontam_sources"] = index.sizes
        out = apply_verdicts(df, self.name, verdicts, metadata, started)
        return DocumentBatch(dataset_name=task.dataset_name, data=out, _metadata=metadata)
