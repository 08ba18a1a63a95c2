"""The datasets this repository ships, where they live, and how to build them again from their sources.

One data root holds them: `recipes/assets/data/` in the repository, or `$NRR_DATA_ROOT`, or a config's
`data_root` key (in that order of precedence: config, environment, repository). Configs name a dataset
(`math500`, `gsm8k_train`, ...); `path_of(name)` resolves it. `SHA256SUMS` beside the files records
what was shipped, and `README.md` there names each file's source and license.

`nrr data prepare NAME|all` writes a dataset into the data root in the shipped schema: from the
dataset hub with `datasets` where one is reachable, or from a local source given with `--from` (a
folder written by `datasets.save_to_disk`, a `.parquet` file or a `.jsonl` file in the upstream
schema). Each file is written in the serialisation its upstream copy used, so a source holding the
same records gives the shipped bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

DATA_ROOT_ENV = "NRR_DATA_ROOT"
REPOSITORY_DATA_ROOT = Path(__file__).resolve().parents[1] / "assets" / "data"
CHECKSUMS = "SHA256SUMS"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    file: str  # relative to the data root
    fields: tuple[str, ...]  # the shipped schema, in the order each record is written
    hub: tuple[str, str | None, str]  # (dataset id, config name, split) of the public source
    # how the upstream file was serialised: `json` (json.dumps, ASCII escapes), `json_utf8`
    # (json.dumps, UTF-8 kept), `pandas` (DataFrame.to_json(orient="records", lines=True))
    writer: str = "json"
    copies: tuple[tuple[str, str], ...] = ()  # (field, from_field): a field the source may lack, copied
    license: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "math500": DatasetSpec("benchmarks/math500.jsonl",
                           ("problem", "solution", "answer", "subject", "level", "unique_id"),
                           ("HuggingFaceH4/MATH-500", None, "test"), license="MIT (Hendrycks MATH)"),
    "aime24": DatasetSpec("benchmarks/aime24.jsonl", ("id", "problem", "solution", "answer", "url", "question"),
                          ("HuggingFaceH4/aime_2024", None, "train"), writer="pandas",
                          copies=(("question", "problem"),), license="competition problems"),
    "amc23": DatasetSpec("benchmarks/amc23.jsonl", ("id", "problem", "answer", "url", "question"),
                         ("math-ai/amc23", None, "test"), writer="pandas",
                         copies=(("problem", "question"), ("question", "problem")), license="competition problems"),
    "gsm8k": DatasetSpec("benchmarks/gsm8k.jsonl", ("question", "answer"), ("openai/gsm8k", "main", "test"),
                         license="MIT"),
    "minerva_math": DatasetSpec("benchmarks/minerva_math.jsonl", ("problem", "solution", "type", "idx"),
                                ("math-ai/minervamath", None, "test"), license="MIT OCW"),
    "olympiadbench": DatasetSpec("benchmarks/olympiadbench.jsonl",
                                 ("id", "subfield", "context", "question", "solution", "final_answer",
                                  "is_multiple_answer", "unit", "answer_type", "error"),
                                 ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"), writer="json_utf8",
                                 license="see OlympiadBench"),
    "gsm8k_train": DatasetSpec("gsm8k/train.jsonl", ("question", "answer"), ("openai/gsm8k", "main", "train"),
                               license="MIT (gsm8k/LICENSE)"),
}
# sorted: decontamination credits an n-gram to the first benchmark that has it
BENCHMARKS = tuple(sorted(name for name, spec in DATASETS.items() if spec.file.startswith("benchmarks/")))


def data_root(override: str | os.PathLike | None = None) -> Path:
    """The folder datasets are read from: a config's `data_root`, else $NRR_DATA_ROOT, else the repository's."""
    return Path(override or os.environ.get(DATA_ROOT_ENV) or REPOSITORY_DATA_ROOT)


def spec_of(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def path_of(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where dataset `name` is under the data root; a clear error when it is not there."""
    path = data_root(root) / spec_of(name).file
    if not path.exists():
        raise FileNotFoundError(f"dataset '{name}' not found at {path}: run `nrr data prepare {name}` "
                                f"(or set {DATA_ROOT_ENV} / the config's data_root to a folder that has it)")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_checksums(root: Path = REPOSITORY_DATA_ROOT) -> dict[str, str]:
    """{relative file: sha256} from a `SHA256SUMS` file (the `sha256sum` format)."""
    out = {}
    for line in (root / CHECKSUMS).read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped); a line that is not JSON is an error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON: {err}") from None
    return rows


# --------------------------------------------------------------------------------------------
# Building a dataset from its source


def read_source(source: str | os.PathLike, split: str) -> list[dict]:
    """Records of a local source: a `datasets` folder (the split, when it holds several), parquet or JSONL."""
    path = Path(source)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split '{split}' (splits: {', '.join(ds)})")
            ds = ds[split]
        return ds.to_list()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl" and path.exists():
        return read_jsonl(path)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    raise ValueError(f"{path}: give a dataset folder (datasets.save_to_disk), a .parquet or a .jsonl file")


def read_hub(spec: DatasetSpec) -> list[dict]:
    import datasets

    hub_id, config, split = spec.hub
    return datasets.load_dataset(hub_id, config, split=split).to_list()


def to_schema(name: str, rows: list[dict], where: str) -> list[dict]:
    """The shipped fields of each record, in order; missing columns are named in the error."""
    spec = spec_of(name)
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    for field, from_field in spec.copies:
        if field not in columns and from_field in columns:
            rows = [{**r, field: r[from_field]} for r in rows]
            columns.add(field)
    missing = [f for f in spec.fields if f not in columns]
    if not rows:
        raise ValueError(f"{where}: no records")
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)} for dataset '{name}' "
                         f"(has: {', '.join(sorted(columns))})")
    return [{f: r.get(f) for f in spec.fields} for r in rows]


def serialise(rows: list[dict], writer: str) -> bytes:
    if writer == "pandas":
        import pandas as pd

        return pd.DataFrame(rows).to_json(orient="records", lines=True, force_ascii=True).encode("utf-8")
    ensure_ascii = writer == "json"
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows).encode("utf-8")


def prepare(name: str, source: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> Path:
    """Write dataset `name` into the data root from `source` (or the hub); returns the file written."""
    spec = spec_of(name)
    rows = read_source(source, spec.hub[2]) if source else read_hub(spec)
    data = serialise(to_schema(name, rows, str(source or spec.hub[0])), spec.writer)
    out = data_root(root) / spec.file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)  # a reader never sees half a file
    return out


def status(root: str | os.PathLike | None = None) -> list[dict]:
    """One row a dataset: present or not, its checksum, and whether it is the shipped file."""
    folder = data_root(root)
    shipped = recorded_checksums()
    rows = []
    for name, spec in DATASETS.items():
        path = folder / spec.file
        digest = sha256(path) if path.exists() else None
        state = "missing" if digest is None else ("shipped" if digest == shipped.get(spec.file) else "differs")
        hub_id, config, split = spec.hub
        rows.append({"name": name, "file": str(path), "state": state, "sha256": digest,
                     "source": f"{hub_id}{f' ({config})' if config else ''}, split {split}", "license": spec.license})
    return rows
