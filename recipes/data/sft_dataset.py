"""Chat corpora -> token examples with an assistant-only loss mask -> batches.

A corpus is the project's trace records (what curation writes: `messages`, a user turn and an assistant turn
`<think>\\n...\\n</think>\\n\\n\\boxed{..}` or the no-think form, plus provenance fields kept out of the
tokens) or a public trace dataset in any schema `recipes.data.schemas` reads (OpenR1-Math, Llama-Nemotron,
OpenThoughts, NuminaMath, OpenAI messages). Conversations are rendered with the model's own chat template and
tokenized with its tokenizer (`recipes.tokenizer.ChatTokenizer`); the loss covers the assistant turn and its
end-of-turn token, nothing of the prompt or the role headers.

Bad input never gets silently truncated: a record without `messages`, one longer than
`seq_length`, or token ids the model cannot embed raise a `DataError` naming the file and line, or
are counted and skipped when `on_bad_record: skip`.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Literal

import numpy as np

from recipes import response_format as rf
from recipes.data.packing import Example, Row, collate, pack, pad
from recipes.data.trace_record import DataError, corpus_files, make_record, read_records, write_records
from recipes.tokenizer import ChatTokenizer, check_messages


@dataclasses.dataclass
class TaskCorpusConfig:
    """The embedded task's reference traces, used when no corpus path is given."""

    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    n_per_level: int | list[int] = 20000  # or one count per level
    seed: int = 0
    valid_per_level: int = 50  # taken from the train split with another seed, for validation loss
    spell_out_rate: float = 0.0  # share of traces that write hard operations out (see task.solve_steps)


@dataclasses.dataclass
class DataConfig:
    train_path: str | None = None  # a trace corpus or dataset (file or folder); None: the embedded task corpus
    valid_path: str | None = None  # None: validation rows come from the embedded task (or none)
    schema: str = "auto"  # the datasets' schema (recipes.data.schemas: openr1, nemotron, openthoughts, ...)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # schema field -> the dataset's column
    task: TaskCorpusConfig = dataclasses.field(default_factory=TaskCorpusConfig)
    seq_length: int = 128
    packing: bool = True  # first-fit-decreasing packing; false: one example per row, padded
    think_ratio: float | None = None  # share of records trained in think form; the rest drop their thinking
    on_bad_record: Literal["error", "skip"] = "error"
    max_records: int | None = None  # read at most this many records per split (quick runs)


# ------------------------------------------------------------------------------ reading and tokenizing


def corpus_records(path: str | Path, cfg: DataConfig):
    """(where, record or DataError) of a corpus: the project's records as they are, any other schema mapped to
    them by `recipes.data.schemas` (whose errors name the file and row and stop the read)."""
    if cfg.schema == "record" or (cfg.schema == "auto" and not cfg.fields and _is_record_corpus(path)):
        return read_records(path)
    from recipes.data.schemas import DatasetSource, read_traces

    return read_traces(DatasetSource(str(path), schema=cfg.schema, fields=dict(cfg.fields)))


def _is_record_corpus(path: str | Path) -> bool:
    """Whether `path` holds the project's trace records: JSONL/Parquet whose first record has `id` and `messages`
    (read line by line, so a bad line can be skipped instead of stopping the read)."""
    try:
        for _, rec in read_records(path):
            if isinstance(rec, dict):
                return "messages" in rec and "id" in rec
    except DataError:
        return False
    return False


def tokenize_conversation(messages: list[dict], tokenizer: ChatTokenizer,
                          enable_thinking: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, mask) of the conversation in the model's chat template; mask is 1 on the assistant turn and its
    end-of-turn token. A think mode the template cannot switch to is left to the template's default."""
    if enable_thinking not in tokenizer.thinking_modes:
        enable_thinking = None
    try:
        ids, mask = tokenizer.tokenize_conversation(messages, enable_thinking=enable_thinking)
    except ValueError as err:
        raise DataError(str(err)) from None
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.float32)


def drop_thinking(messages: list[dict]) -> list[dict]:
    """The no-think form of a conversation: assistant turns keep only their answer part."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            _, answer, _ = rf.split_response(m["content"])
            m = {**m, "content": rf.format_response(None, answer)}
        out.append(m)
    return out


def has_thinking(messages: list[dict]) -> bool:
    for m in messages:
        if m["role"] == "assistant":
            thinking, _, _ = rf.split_response(m["content"])
            if thinking:
                return True
    return False


def to_example(messages: list[dict], seq_length: int, vocab_size: int, where: str, tokenizer: ChatTokenizer,
               enable_thinking: bool | None = None) -> Example:
    ids, mask = tokenize_conversation(messages, tokenizer, enable_thinking)
    n = len(ids) - 1  # inputs are ids[:-1], labels ids[1:]
    if n > seq_length:
        raise DataError(f"record has {n} tokens, longer than seq_length={seq_length} (raise data.seq_length "
                        "or filter the corpus; records are never truncated)")
    if ids.max() >= vocab_size:
        raise DataError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}: "
                        "tokenizer/model mismatch")
    if mask[1:].sum() == 0:
        raise DataError("the assistant turn is empty: no tokens to train on")
    return Example(ids[:-1].copy(), ids[1:].copy(), mask[1:].copy(), where)


@dataclasses.dataclass
class CorpusStats:
    records: int = 0
    examples: int = 0
    think: int = 0
    no_think: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _skip_reason(err: DataError) -> str:
    text = str(err)
    for key in ("messages", "longer than seq_length", "vocabulary", "invalid JSON", "assistant"):
        if key in text:
            return {"longer than seq_length": "too_long", "vocabulary": "vocab", "invalid JSON": "json",
                    "messages": "messages", "assistant": "no_assistant"}[key]
    return "other"


def load_examples(path: str | Path, cfg: DataConfig, vocab_size: int, tokenizer: ChatTokenizer,
                  seed: int = 0) -> tuple[list[Example], CorpusStats]:
    """Read and tokenize a corpus. Bad records raise (naming file:line) or are counted and skipped."""
    check_vocab(tokenizer, vocab_size)
    stats = CorpusStats()
    examples: list[Example] = []
    for index, (where, rec) in enumerate(corpus_records(path, cfg)):
        if cfg.max_records is not None and stats.records >= cfg.max_records:
            break
        stats.records += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict) or "messages" not in rec:
                raise DataError("record has no 'messages' field (expected chat format: "
                                "{'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}], ...})")
            try:
                messages = check_messages(rec["messages"])
            except ValueError as err:
                raise DataError(str(err)) from None
            think = rec.get("enable_thinking")
            # the think/no-think mix: a per-record coin from (seed, index) keeps the choice stable
            if cfg.think_ratio is not None and has_thinking(messages):
                if random.Random(f"{seed}:think:{index}").random() >= cfg.think_ratio:
                    messages, think = drop_thinking(messages), False
            example = to_example(messages, cfg.seq_length, vocab_size, where, tokenizer, think)
        except DataError as err:
            if cfg.on_bad_record == "error":
                raise DataError(f"{where}: {err}") from None
            reason = _skip_reason(err)
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
            continue
        if has_thinking(messages):
            stats.think += 1
        else:
            stats.no_think += 1
        stats.examples += 1
        stats.tokens += len(example)
        stats.loss_tokens += int(example.loss_mask.sum())
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable records ({stats.records} read, skipped {stats.skipped})")
    return examples, stats


def check_vocab(tokenizer: ChatTokenizer, model_vocab_size: int) -> None:
    """Fail clearly when the tokenizer cannot feed the model (a tokenizer/model mismatch)."""
    try:
        tokenizer.check_model_vocab(model_vocab_size)
    except ValueError as err:
        raise DataError(str(err)) from None


# ------------------------------------------------------------------------------ the embedded corpus


def task_records(levels: list[int], n_per_level: int | list[int], seed: int, think: bool = True,
                 spell_out_rate: float = 0.0) -> list[dict]:
    """Reference traces of the embedded task as trace records (a spell_out_rate share of them with the hard
    operations written out)."""
    from recipes import task

    records = []
    for p in task.train_problems(levels, n_per_level, seed=seed):
        spell_out = spell_out_rate > 0 and random.Random(f"{seed}:spell:{p.id}").random() < spell_out_rate
        records.append(make_record(p.id, p.question, task.assistant_response(p, think=think, spell_out=spell_out),
                                   problem_id=p.id, reference=p.answer, source="task-reference",
                                   teacher="reference-solver", enable_thinking=think, level=p.level))
    return records


def write_task_corpus(cfg: TaskCorpusConfig, out_dir: str | Path) -> tuple[Path, Path | None]:
    """Write train (and validation) JSONL corpora of the embedded task; returns their paths."""
    out = Path(out_dir)
    records = task_records(cfg.levels, cfg.n_per_level, cfg.seed, spell_out_rate=cfg.spell_out_rate)
    train = write_records(records, out / "train.jsonl")
    valid = None
    if cfg.valid_per_level > 0:
        # another seed of the train split: unseen problems, still disjoint from the held-out benchmark
        valid_records = task_records(cfg.levels, cfg.valid_per_level, cfg.seed + 1_000_003,
                                     spell_out_rate=cfg.spell_out_rate)
        train_ids = {r["id"] for r in records}
        valid = write_records([r for r in valid_records if r["id"] not in train_ids], out / "valid.jsonl")
    return train, valid


# ------------------------------------------------------------------------------ batches


def build_rows(examples: list[Example], seq_length: int, packing: bool, pad_id: int) -> list[Row]:
    return (pack if packing else pad)(examples, seq_length, pad_id)


class RowSampler:
    """Global batches of rows in a fixed order: epoch e is a permutation seeded by (seed, e).

    Stateless by design: global batch k is a function of k alone, so resuming at step k replays the
    exact data order of an uninterrupted run.
    """

    def __init__(self, rows: list[Row], global_batch_size: int, seed: int, shuffle: bool = True):
        if not rows:
            raise ValueError("no rows to sample from")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.rows)
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n)}
        return self._perms[epoch]

    @property
    def steps_per_epoch(self) -> float:
        return len(self.rows) / self.global_batch_size

    def global_batch(self, k: int) -> list[Row]:
        n = len(self.rows)
        out = []
        for pos in range(k * self.global_batch_size, (k + 1) * self.global_batch_size):
            epoch, i = divmod(pos, n)
            out.append(self.rows[self._order(epoch)[i]])
        return out


def micro_batches(rows: list[Row], micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """This data-parallel rank's share of a global batch, cut into collated micro batches."""
    if len(rows) % (micro_batch_size * dp_size):
        raise ValueError(f"global batch of {len(rows)} rows is not divisible by micro_batch_size*dp "
                         f"({micro_batch_size}*{dp_size})")
    per_rank = len(rows) // dp_size
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [collate(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
