"""Public reasoning datasets, read through `datasets` and mapped to the project's trace records and prompt sets.

    read_traces(DatasetSource("OpenR1-Math-220k/data"))  -> (where, trace record): what SFT trains on
    read_prompts(DatasetSource("gsm8k/train.jsonl"))     -> (where, {id, problem, reference, tests, source}): GRPO

A dataset is a JSONL, JSON, Parquet or Arrow file, a folder of such files, or a `save_to_disk` folder. Its schema
is detected from its column names, most specific schema first, or named in the spec; `fields` renames the dataset's
columns to the names the schemas use, so a set with its own column names still maps onto one of them. Every row
comes with `where` (file and row), and every error about a row names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator

from recipes.response_format import format_response, split_response
from recipes.data.trace_record import DataError, make_record
from recipes.grader import last_boxed

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}  # suffix -> `datasets` builder
STREAM_BYTES = 1 << 30  # inputs larger than this are streamed, not converted into the `datasets` cache
KNOWN_SPLITS = {"train", "test", "validation", "valid", "dev", "eval"}
ID_COLUMNS = ("problem_id", "id", "uuid", "unique_id")  # a row's problem id; the problem text's hash without one


@dataclasses.dataclass
class DatasetSource:
    """One dataset to read: where it is, its schema ("auto": detected), and its columns' names in our terms."""

    path: str
    schema: str = "auto"
    split: str = "train"  # of a DatasetDict folder, or of a folder whose files are named by split (train-*.parquet)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # our field name -> the dataset's column
    keep_incorrect: bool = False  # OpenR1: keep the generations math-verify rejected too
    streaming: bool | None = None  # None: stream when the files exceed STREAM_BYTES
    source: str | None = None  # the records' `source` (default: the path's last component)
    teacher: str | None = None  # the model that wrote the responses, where the rows do not name one
    cache_dir: str | None = None  # the `datasets` cache (default: its own)


# ============================================================================== rows


def open_rows(path: str | Path, split: str | None = None, streaming: bool | None = None,
              cache_dir: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) for each row; where is 'file:row N' (N from 1), 'folder[split]:row N' for save_to_disk.

    Each file is loaded on its own (so a row knows its file, and files of a folder need not share a schema),
    streamed when asked or when the files exceed STREAM_BYTES, else converted once into the `datasets` cache.
    A save_to_disk folder is memory-mapped as it is; of a DatasetDict, `split` (default "train") is read.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: dataset not found")
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        yield from _saved_rows(p, split)
        return
    files = _data_files(p, split)
    if streaming is None:
        streaming = sum(f.stat().st_size for f in files) > STREAM_BYTES
    import datasets

    for f in files:
        done = 0
        try:
            ds = datasets.load_dataset(FORMATS[f.suffix], data_files=str(f), split="train", streaming=streaming,
                                       cache_dir=cache_dir)
            for done, row in enumerate(ds, 1):
                yield f"{f}:row {done}", row
        except Exception as err:  # the loaders' errors do not name the file
            raise DataError(_load_error(f, err, done)) from err


def _saved_rows(p: Path, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    label = ""
    if isinstance(ds, datasets.DatasetDict):
        label = split or "train"
        if label not in ds:
            raise DataError(f"{p}: no split '{label}' (splits: {', '.join(ds)})")
        ds, label = ds[label], f"[{label}]"
    for i, row in enumerate(ds, 1):
        yield f"{p}{label}:row {i}", row


def _data_files(p: Path, split: str | None) -> list[Path]:
    """The file, or the folder's data files; of a folder whose files name their split the Hub's way (`train.jsonl`,
    `train-00000-of-00002.parquet`, `train/x.json`), those of `split`."""
    if p.is_file():
        if p.suffix not in FORMATS:
            raise DataError(f"{p}: unsupported format (expected {', '.join(FORMATS)})")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.suffix in FORMATS and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"{p}: no {', '.join(FORMATS)} files in this folder")
    names = {f: {re.split(r"[-_.]", part)[0] for part in (*f.relative_to(p).parent.parts, f.stem)} for f in files}
    if split:
        if any(split in n for n in names.values()):
            return [f for f in files if split in names[f]]
        found = sorted(set().union(*names.values()) & KNOWN_SPLITS)
        if found:
            raise DataError(f"{p}: no files of split '{split}' (files of splits: {', '.join(found)})")
    return files


def _load_error(f: Path, err: Exception, done: int) -> str:
    """Name the first line that is not a JSON object (JSONL), else the file, the row reached and the cause."""
    if f.suffix == ".jsonl":
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    if line.strip() and not isinstance(json.loads(line), dict):
                        return f"{f}:{lineno}: not a JSON object"
                except json.JSONDecodeError as bad:
                    return f"{f}:{lineno}: invalid JSON ({bad.msg})"
    cause = err.__cause__ or err
    first = (str(cause).splitlines() or [""])[0][:300]
    return f"{f}: not readable as {FORMATS[f.suffix]} after row {done} ({type(cause).__name__}: {first})"


def _show(value) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _text(row: dict, col: str, where: str) -> str:
    value = row.get(col)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{col}' must be a non-empty string, got {_show(value)}")
    return value


def _opt_str(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _turns(msgs, where: str, col: str) -> tuple[str | None, list[dict]]:
    """(the system prompt or None, the other messages) of a list of {role, content} messages."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: '{col}' must be a list of {{role, content}} messages, got {_show(msgs)}")
    system = "\n\n".join(m["content"] for m in msgs if m.get("role") == "system") or None
    return system, [m for m in msgs if m.get("role") != "system"]


def _parts(response: str, where: str) -> tuple[str | None, str]:
    """(thinking or None, answer) of a response; a think block left open (a truncated response) is an error."""
    thinking, answer, closed = split_response(response)
    if thinking is not None and not closed:
        raise DataError(f"{where}: the response's <think> block is never closed (a truncated response)")
    return thinking or None, answer


def _trace(problem: str, thinking: str | None, answer: str, *, reference=None, system: str | None = None,
           teacher: str | None = None, **provenance) -> dict:
    """A response in our format: `<think>\\n{thinking}\\n</think>\\n\\n{answer}`, or the no-think form."""
    return {"problem": problem, "response": format_response(thinking, answer), "reference": _opt_str(reference),
            "enable_thinking": thinking is not None, "system": system, "teacher": teacher, "provenance": provenance}


# ============================================================================== trace schemas


def _openr1(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """One trace per generation math-verify accepted (all with keep_incorrect); one left unclosed is never kept."""
    # https://huggingface.co/datasets/open-r1/OpenR1-Math-220k
    gens, ok = row["generations"], row["correctness_math_verify"]
    if not isinstance(gens, list) or not isinstance(ok, list) or len(gens) != len(ok):
        raise DataError(f"{where}: 'generations' and 'correctness_math_verify' must be lists of one length, "
                        f"got {_show(gens)} and {_show(ok)}")
    problem = _text(row, "problem", where)
    out = []
    for k, (gen, correct) in enumerate(zip(gens, ok)):
        thinking, answer, closed = split_response(gen or "")
        if closed and (correct is True or spec.keep_incorrect):
            out.append(_trace(problem, thinking or None, answer, reference=row.get("answer"), generation=k,
                              correct=correct is True))
    return out


def _nemotron(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """`reasoning` "on": the output's think block is the thinking; "off": the output is the answer."""
    # https://huggingface.co/datasets/nvidia/Llama-Nemotron-Post-Training-Dataset
    system, turns = (None, [{"role": "user", "content": row["input"]}]) if isinstance(row["input"], str) \
        else _turns(row["input"], where, "input")
    if [m.get("role") for m in turns] != ["user"]:
        raise DataError(f"{where}: 'input' must hold one user turn, got roles {[m.get('role') for m in turns]}")
    if row["reasoning"] not in ("on", "off"):
        raise DataError(f"{where}: 'reasoning' must be 'on' or 'off', got {_show(row['reasoning'])}")
    thinking, answer = _parts(_text(row, "output", where), where)
    if (thinking is not None) != (row["reasoning"] == "on"):
        raise DataError(f"{where}: 'reasoning' is '{row['reasoning']}' but the output "
                        f"{'has' if thinking else 'has no'} thinking")
    return [_trace(turns[0]["content"], thinking, answer, system=_opt_str(row.get("system_prompt")) or system,
                   teacher=_opt_str(row.get("generator")), category=row.get("category"), license=row.get("license"),
                   used_in_training=row.get("used_in_training"))]


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_THOUGHT_RE = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>\s*<\|begin_of_solution\|>(.*?)"
                         r"(?:<\|end_of_solution\|>|$)", re.S)


def _openthoughts(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """The thought block becomes the think block, the solution block the answer."""
    # https://huggingface.co/datasets/open-thoughts/OpenThoughts-114k
    # https://huggingface.co/datasets/bespokelabs/Bespoke-Stratos-17k
    conv = row["conversations"]
    roles = [_ROLES.get(m.get("from")) if isinstance(m, dict) else None for m in conv or []]
    if roles != ["user", "assistant"] or not all(isinstance(m.get("value"), str) for m in conv):
        raise DataError(f"{where}: 'conversations' must be one user then one assistant {{from, value}}, "
                        f"got {_show(conv)}")
    m = _THOUGHT_RE.search(conv[1]["value"])
    if not m:
        raise DataError(f"{where}: the assistant value lacks <|begin_of_thought|>...<|end_of_thought|> "
                        "<|begin_of_solution|>...<|end_of_solution|>")
    return [_trace(conv[0]["value"], m.group(1).strip(), m.group(2).strip(), system=_opt_str(row.get("system")))]


def _numina(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """A worked solution without a think block; the reference is its last \\boxed{}."""
    # https://huggingface.co/datasets/AI-MO/NuminaMath-CoT
    solution = _text(row, "solution", where)
    return [_trace(_text(row, "problem", where), None, solution.strip(), reference=last_boxed(solution),
                   origin=row.get("source"))]


def _messages(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """OpenAI chat messages; the assistant's `reasoning_content` (or an inline think block) is the thinking."""
    # https://platform.openai.com/docs/api-reference/chat ; reasoning_content:
    # https://api-docs.deepseek.com/guides/reasoning_model
    system, turns = _turns(row["messages"], where, "messages")
    if [m.get("role") for m in turns] != ["user", "assistant"]:
        raise DataError(f"{where}: 'messages' must be one user then one assistant turn (and system turns), "
                        f"got roles {[m.get('role') for m in turns]}")
    reply = turns[1]
    thinking, answer = (reply["reasoning_content"].strip("\n"), reply["content"].strip()) \
        if reply.get("reasoning_content") else _parts(reply["content"], where)
    reference = row.get("reference") if row.get("reference") is not None else row.get("answer")
    return [_trace(turns[0]["content"], thinking, answer, reference=reference, system=system)]


def _pair(row: dict, spec: DatasetSource, where: str) -> list[dict]:
    """A problem and a response (which may hold a think block), with `thinking` apart where a set keeps it so."""
    thinking, answer = _parts(_text(row, "response", where), where)
    if row.get("thinking"):
        thinking, answer = str(row["thinking"]).strip("\n"), row["response"].strip()
    reference = row.get("reference") if row.get("reference") is not None else row.get("answer")
    return [_trace(_text(row, "problem", where), thinking, answer, reference=reference,
                   system=_opt_str(row.get("system")))]


# ============================================================================== prompt schemas


def _case(value, where: str, what: str) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: a test's {what} must be text, got {_show(value)}")
    return value


def _tests(value, where: str) -> list[dict]:
    """[{"stdin", "stdout"}] as the `code` reward runs them, from such a list, [{input, output}], or the
    {"inputs": [...], "outputs": [...]} of APPS / TACO (either as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: tests are not valid JSON ({err.msg})") from None
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:
        if value.get("fn_name"):
            raise DataError(f"{where}: call-based tests (fn_name {value['fn_name']!r}); the code reward runs "
                            "stdin/stdout programs")
        value = [{"stdin": i, "stdout": o} for i, o in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: tests must be a non-empty list of {{stdin, stdout}} cases, got {_show(value)}")
    pick = lambda t, a, b: t.get(a) if t.get(a) is not None else t.get(b)  # noqa: E731
    return [{"stdin": _case(pick(t, "stdin", "input") or "", where, "stdin"),
             "stdout": _case(pick(t, "stdout", "output"), where, "stdout")} for t in value]


def _prompt(problem: str, reference, tests: list[dict] | None = None) -> dict:
    return {"problem": problem, "reference": _opt_str(reference), "tests": tests}


def _plain_prompt(row: dict, spec: DatasetSource, where: str) -> dict:
    """The project's own prompt dict (problem, reference, tests), or a code set's prompt/question and tests."""
    # APPS (question, input_output): https://huggingface.co/datasets/codeparrot/apps
    col = next(c for c in ("prompt", "question", "problem") if row.get(c) is not None)
    tests = row["tests"] if row.get("tests") is not None else row.get("input_output")
    return _prompt(_text(row, col, where), row.get("reference"), _tests(tests, where) if tests else None)


def _gsm8k(row: dict, spec: DatasetSource, where: str) -> dict:
    """The reference is what follows the last `#### `, thousands separators dropped (as evaluation reads it)."""
    # https://huggingface.co/datasets/openai/gsm8k
    answer = _text(row, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K 'answer' has no '#### <final answer>' line")
    return _prompt(_text(row, "question", where), answer.rsplit("####", 1)[1].strip().replace(",", ""))


def _math(row: dict, spec: DatasetSource, where: str) -> dict:
    """The reference is `answer` (MATH-500), else the solution's last \\boxed{} (MATH)."""
    # https://huggingface.co/datasets/HuggingFaceH4/MATH-500 ; https://huggingface.co/datasets/EleutherAI/hendrycks_math
    reference = _opt_str(row.get("answer")) or last_boxed(row.get("solution") or "")
    if reference is None:
        raise DataError(f"{where}: no 'answer' and no \\boxed{{}} in 'solution'")
    return _prompt(_text(row, "problem", where), reference)


# ============================================================================== detection


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str
    kind: str  # "trace" or "prompt"
    required: tuple[str, ...]  # column names; "a|b": either
    adapt: Callable[[dict, DatasetSource, str], object]

    def missing(self, row: dict) -> list[str]:
        """The required columns the row lacks (or holds as null)."""
        return [r for r in self.required if all(row.get(c) is None for c in r.split("|"))]


# Most specific first: the first schema whose required columns a dataset has is its schema.
SCHEMAS = [
    Schema("record", "trace", ("messages", "reference", "problem_id"), lambda row, spec, where: [row]),  # ours
    Schema("openr1", "trace", ("problem", "generations", "correctness_math_verify"), _openr1),
    Schema("nemotron", "trace", ("input", "output", "reasoning"), _nemotron),
    Schema("openthoughts", "trace", ("conversations",), _openthoughts),
    Schema("numina", "trace", ("problem", "solution"), _numina),
    Schema("messages", "trace", ("messages",), _messages),
    Schema("pair", "trace", ("problem", "response"), _pair),
    Schema("code", "prompt", ("prompt|question|problem", "tests|input_output"), _plain_prompt),
    Schema("prompt", "prompt", ("problem", "reference"), _plain_prompt),
    Schema("gsm8k", "prompt", ("question", "answer"), _gsm8k),
    Schema("math", "prompt", ("problem", "answer|solution"), _math),
]
# The names `fields` may map a column to: every column a schema reads.
FIELD_NAMES = sorted({c for s in SCHEMAS for r in s.required for c in r.split("|")} | set(ID_COLUMNS)
                     | {"answer", "reference", "system", "system_prompt", "thinking", "generator", "source"})


def _no_match(columns, schemas: list[Schema], where: str, named: str | None = None) -> DataError:
    head = f"lack the columns of schema '{named}'" if named else "match no known schema"
    known = "\n".join(f"  {s.name}: {', '.join(s.required)}" for s in schemas)
    return DataError(f"{where}: columns [{', '.join(sorted(columns))}] {head}.\nKnown schemas (required columns; "
                     f"a|b: either):\n{known}\nName the schema with `schema`, or map your columns onto these names "
                     f"with `fields` (our name: your column), keys: {', '.join(FIELD_NAMES)}")


def detect_schema(columns, kind: str = "trace", where: str = "dataset") -> str:
    """The name of the first (most specific) schema of `kind` whose required columns are all among `columns`."""
    schemas = [s for s in SCHEMAS if s.kind == kind]
    cols = set(columns)
    for s in schemas:
        if all(any(c in cols for c in r.split("|")) for r in s.required):
            return s.name
    raise _no_match(cols, schemas, where)


def _rows(spec: DatasetSource, kind: str) -> Iterator[tuple[str, dict, Schema]]:
    """(where, row with `fields` applied, its schema); the schema is detected on the first row."""
    schemas = {s.name: s for s in SCHEMAS if s.kind == kind}
    if spec.schema != "auto" and spec.schema not in schemas:
        raise DataError(f"unknown {kind} schema '{spec.schema}' (known: auto, {', '.join(schemas)})")
    unknown = sorted(set(spec.fields) - set(FIELD_NAMES))
    if unknown:
        raise DataError(f"`fields` keys {unknown} name no field (keys: {', '.join(FIELD_NAMES)})")
    theirs = set(spec.fields.values())
    schema = None
    for where, row in open_rows(spec.path, spec.split, spec.streaming, spec.cache_dir):
        absent = sorted(theirs - set(row))
        if absent:
            raise DataError(f"{where}: `fields` names columns {absent} the dataset lacks "
                            f"(columns: {', '.join(sorted(row))})")
        row = {k: v for k, v in row.items() if k not in theirs} | {o: row[t] for o, t in spec.fields.items()}
        if schema is None:
            schema = schemas[spec.schema if spec.schema != "auto" else detect_schema(row, kind, where)]
            if spec.schema != "auto" and schema.missing({c: True for c in row}):
                raise _no_match(row, list(schemas.values()), where, spec.schema)
        missing = schema.missing(row)
        if missing:
            raise DataError(f"{where}: no value in column(s) {', '.join(missing)} that schema '{schema.name}' needs")
        yield where, row, schema


def _problem_id(row: dict, problem: str) -> str:
    for col in ID_COLUMNS:
        if row.get(col) is not None and row[col] != "":
            return str(row[col])
    return hashlib.sha1(problem.encode("utf-8")).hexdigest()[:16]


# ============================================================================== entry points


def read_traces(spec: DatasetSource) -> Iterator[tuple[str, dict]]:
    """(where, trace record) for SFT. Record id: the problem id (`-g{k}` for generation k of several); the
    system prompt, the schema and the dataset's own provenance are record fields that never reach the tokens."""
    source = spec.source or Path(spec.path).name
    for where, row, schema in _rows(spec, "trace"):
        for t in schema.adapt(row, spec, where):
            if schema.name == "record":
                yield where, t
                continue
            pid = _problem_id(row, t["problem"])
            k = t["provenance"].get("generation")
            extra = {"system": t["system"]} if t["system"] else {}
            yield where, make_record(pid if k is None else f"{pid}-g{k}", t["problem"], t["response"],
                                     problem_id=pid, reference=t["reference"], source=source,
                                     teacher=t["teacher"] or spec.teacher, enable_thinking=t["enable_thinking"],
                                     schema=schema.name, **extra, **t["provenance"])


def read_prompts(spec: DatasetSource) -> Iterator[tuple[str, dict]]:
    """(where, {id, problem, reference, tests, source}) for GRPO and rejection sampling; tests: code prompts'
    [{"stdin", "stdout"}], else None."""
    source = spec.source or Path(spec.path).name
    for where, row, schema in _rows(spec, "prompt"):
        p = schema.adapt(row, spec, where)
        yield where, {"id": _problem_id(row, p["problem"]), **p, "source": source}
