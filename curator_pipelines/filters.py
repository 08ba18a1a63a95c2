"""Stages 3-4: parse each response, then one stage per filter, each recording verdict and reason.

The judging functions are plain functions of one record (testable, and timed by
`recipes.bench.curate`); the stages apply them to the records still kept.
"""

from __future__ import annotations

import collections
import json
import time
import unicodedata

import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.config import FilterConfig
from curator_pipelines.records import apply_verdicts, log_stage
from recipes.response_format import THINK_CLOSE, THINK_OPEN, split_response

Verdict = tuple[bool, float | None, str]  # (pass, score, reason: "" when it passes)

# ------------------------------------------------------------------ parse


def parse_response(response: str | None) -> dict:
    """The think block and the final answer of one response."""
    from recipes.grader import final_answer

    # a failed generation's response is None, or NaN once Ray has carried the column through Arrow
    text = response if isinstance(response, str) else ""
    thinking, answer_part, closed = split_response(text)
    return {
        "think": thinking,
        "answer_part": answer_part,
        "think_closed": closed,
        "n_think_open": text.count(THINK_OPEN),
        "n_think_close": text.count(THINK_CLOSE),
        "predicted": final_answer(text),
    }


class ParseStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "parse"
    resources = Resources(cpus=1.0)

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df = task.to_pandas().copy()
        parsed = pd.DataFrame([parse_response(r) for r in df["response"]], index=df.index)
        df = pd.concat([df, parsed], axis=1)
        metadata = dict(task._metadata)
        n = int(df["kept"].sum())
        log_stage(metadata, self.name, n, n, None, time.perf_counter() - started)
        return DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=metadata)


# ------------------------------------------------------------------ the judges


def judge_truncation(rec: dict, cfg: FilterConfig) -> Verdict:
    if not (rec.get("response") or "").strip():
        return False, 0.0, "empty"
    if rec.get("finish_reason") == "length":
        return False, 0.0, "truncated"
    return True, 1.0, ""


def no_think(rec: dict) -> bool:
    """A no-think record (a trace dataset's reasoning-off rows): its think block is empty on purpose."""
    return rec.get("enable_thinking") is not None and not rec["enable_thinking"]


def has_reference(rec: dict) -> bool:
    return isinstance(rec.get("reference"), str)


def judge_format(rec: dict, cfg: FilterConfig) -> Verdict:
    n_open, n_close = rec["n_think_open"], rec["n_think_close"]
    if n_open == 0 and n_close == 0:
        return False, 0.0, "no_think_block"
    if n_open > 1 or n_close > 1:
        return False, 0.0, "multiple_think_blocks"
    if not rec["think_closed"]:
        return False, 0.0, "unclosed_think"
    if n_open == 1 and rec["response"].index(THINK_OPEN) > rec["response"].index(THINK_CLOSE):
        return False, 0.0, "think_tags_out_of_order"
    thinking = bool((rec.get("think") or "").strip())
    if not thinking and not no_think(rec):
        return False, 0.0, "empty_think"
    if thinking and no_think(rec):
        return False, 0.0, "thinking_in_no_think_record"
    # an answer the grader can read where there is a reference to grade it against, else any answer text
    if rec.get("predicted") is None and (has_reference(rec) or not (rec.get("answer_part") or "").strip()):
        return False, 0.0, "no_answer"
    return True, 1.0, ""


def reference_value(reference: str):
    """A reference answer as the grader takes it (several answers are stored as a JSON list)."""
    if reference.startswith("[") and reference.endswith("]"):
        try:
            value = json.loads(reference)
            if isinstance(value, list):
                return value
        except ValueError:
            pass
    return reference


def judge_correctness(rec: dict, cfg: FilterConfig) -> Verdict:
    from recipes.grader import grade

    if not has_reference(rec):  # nothing to verify against: kept or dropped as configured, counted either way
        return cfg.unverified == "keep", None, "unverified"
    ok = grade(rec.get("predicted"), reference_value(rec["reference"]), timeout=cfg.grade_timeout_s)
    return ok, float(ok), "" if ok else "wrong_answer"


def render_tokens(problem: str, response: str, cfg: FilterConfig,
                  enable_thinking: bool | None = None) -> tuple[int, int]:
    """(tokens of prompt + response, tokens of the response) as the student trains on them: its tokenizer and
    chat template, in the record's think mode where the template can switch to it (as SFT renders it)."""
    from recipes.tokenizer import load

    tok = load(cfg.student_tokenizer)
    think = None if enable_thinking is None else bool(enable_thinking)
    if think not in tok.thinking_modes:  # a mode the template cannot switch to: its default (as SFT does)
        think = None
    ids, mask = tok.tokenize_conversation([{"role": "user", "content": problem},
                                           {"role": "assistant", "content": response}], enable_thinking=think)
    return len(ids), sum(mask)


def judge_length(rec: dict, cfg: FilterConfig) -> Verdict:
    n, response = render_tokens(rec["problem"], rec["response"], cfg, rec.get("enable_thinking"))
    if n > cfg.max_tokens:
        return False, float(n), "too_long"
    if response - 1 < cfg.min_response_tokens:  # the response's tokens, without its end-of-turn token
        return False, float(n), "too_short"
    return True, float(n), ""


def ngram_repetition(text: str, n: int) -> tuple[int, float]:
    """(count of the most frequent character n-gram, share of characters inside repeated n-grams)."""
    if len(text) < n:
        return (1 if text else 0), 0.0
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    counts = collections.Counter(grams)
    covered = [False] * len(text)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return max(counts.values()), sum(covered) / len(text)


def judge_repetition(rec: dict, cfg: FilterConfig) -> Verdict:
    text = rec.get("think") or rec.get("response") or ""
    top, frac = ngram_repetition(text, cfg.ngram_chars)
    if top > cfg.max_ngram_repeats:
        return False, float(top), "looping"
    if frac > cfg.max_repeated_fraction:
        return False, float(top), "repetitive"
    return True, float(top), ""


def _script(ch: str) -> str:
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "UNKNOWN"
    head = name.split(" ", 1)[0]
    return "CJK" if head in ("CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC") else head


def foreign_letters(text: str, allowed: list[str]) -> tuple[int, int]:
    """(letters outside the allowed scripts, all letters)."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    allowed_set = set(allowed)
    return sum(1 for ch in letters if _script(ch) not in allowed_set), len(letters)


def judge_language(rec: dict, cfg: FilterConfig) -> Verdict:
    foreign, total = foreign_letters(rec.get("response") or "", cfg.allowed_scripts)
    ratio = foreign / total if total else 0.0
    if foreign >= cfg.min_foreign_chars and ratio > cfg.max_foreign_ratio:
        return False, ratio, "language_mixing"
    return True, ratio, ""


JUDGES = {
    "truncation": judge_truncation,
    "format": judge_format,
    "correctness": judge_correctness,
    "length": judge_length,
    "repetition": judge_repetition,
    "language": judge_language,
}


class FilterStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Applies one judge to every kept record; failures are marked, not deleted."""

    resources = Resources(cpus=1.0)

    def __init__(self, filter_name: str, cfg: FilterConfig):
        self.name = f"filter_{filter_name}"
        self.filter_name = filter_name
        self.cfg = cfg

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        df = task.to_pandas()
        judge = JUDGES[self.filter_name]
        verdicts = {}
        records = df.to_dict("records")
        for pos, rec in enumerate(records):
            if rec["kept"]:
                verdicts[pos] = judge(rec, self.cfg)
        metadata = dict(task._metadata)
        out = apply_verdicts(df, self.filter_name, verdicts, metadata, started)
        return DocumentBatch(dataset_name=task.dataset_name, data=out, _metadata=metadata)


def filter_stages(cfg: FilterConfig) -> list[FilterStage]:
    return [FilterStage(name, cfg) for name in JUDGES if getattr(cfg, name)]
