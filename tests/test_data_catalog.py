"""The repository carries its data: shipped copies checked against their checksums (and their source when
it is beside the repository), `nrr data prepare` rebuilding them byte for byte from upstream-schema
copies, one data root for every config, and a clone with no sibling folder running the data tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.data import catalog

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "launchers" / "k8s_crds"
# where the shipped copies were taken from (present on the development machines, not in a user's clone)
SOURCES = {catalog.REPOSITORY_DATA_ROOT: ROOT.parent / "shared" / "data", CRDS: ROOT.parent / "shared" / "k8s-crds"}


def nrr(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipes.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in catalog.path_of(name, catalog.REPOSITORY_DATA_ROOT).read_text().splitlines()]


@pytest.mark.parametrize("folder", [catalog.REPOSITORY_DATA_ROOT, CRDS], ids=["data", "k8s_crds"])
def test_shipped_copies_match_their_checksums_and_their_source(folder):
    recorded = catalog.recorded_checksums(folder)
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != catalog.CHECKSUMS}
    files.discard("README.md") if folder == catalog.REPOSITORY_DATA_ROOT else None  # the data's own provenance page
    assert files == set(recorded), "every shipped file has a recorded checksum, and nothing recorded is missing"
    for name, digest in recorded.items():
        assert catalog.sha256(folder / name) == digest, f"{folder / name} changed since it was recorded"
    source = SOURCES[folder]
    if source.exists():  # the copy and its source must not drift apart
        for name, digest in recorded.items():
            assert catalog.sha256(source / name) == digest, f"{source / name} differs from the shipped copy"
    if folder == catalog.REPOSITORY_DATA_ROOT:
        assert {spec.file for spec in catalog.DATASETS.values()} <= set(recorded)


def test_prepare_rebuilds_the_shipped_files_from_upstream_schema_copies(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "root"
    # MATH-500 as the hub serves it: a DatasetDict folder, columns in another order, one extra column
    rows = [{"unique_id": r["unique_id"], "extra": 1, **{k: v for k, v in r.items() if k != "unique_id"}}
            for r in _rows("math500")]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "math500_hf"))
    # AIME 2024 as parquet without the `question` copy of `problem` (the shipped file carries both)
    aime = [{k: v for k, v in r.items() if k != "question"} | {"year": 2024} for r in _rows("aime24")]
    pq.write_table(pa.Table.from_pylist(aime), tmp_path / "aime24.parquet")
    # OlympiadBench as JSONL with shuffled keys (lists, nulls and non-ASCII text)
    rng = random.Random(0)
    with open(tmp_path / "olympiad.jsonl", "w", encoding="utf-8") as f:
        for r in _rows("olympiadbench"):
            keys = list(r)
            rng.shuffle(keys)
            f.write(json.dumps({k: r[k] for k in keys}) + "\n")
    for name, source in [("math500", "math500_hf"), ("aime24", "aime24.parquet"), ("olympiadbench", "olympiad.jsonl")]:
        res = nrr("data", "prepare", name, "--from", str(tmp_path / source), "--data-root", str(out))
        assert res.returncode == 0, res.stderr
        written = out / catalog.DATASETS[name].file
        assert written.read_bytes() == (catalog.REPOSITORY_DATA_ROOT / catalog.DATASETS[name].file).read_bytes(), name
    listing = {r["name"]: r["state"] for r in catalog.status(out)}
    assert listing == {n: ("shipped" if n in ("math500", "aime24", "olympiadbench") else "missing")
                       for n in catalog.DATASETS}
    with open(out / catalog.DATASETS["math500"].file, "a") as f:
        f.write("\n")
    assert catalog.status(out)[0]["state"] == "differs"


def test_a_source_with_missing_columns_is_named(tmp_path):
    src = tmp_path / "math500.jsonl"
    src.write_text("".join(json.dumps({"problem": r["problem"], "level": r["level"]}) + "\n"
                           for r in _rows("math500")[:3]))
    res = nrr("data", "prepare", "math500", "--from", str(src), "--data-root", str(tmp_path / "root"))
    assert res.returncode == 2
    assert "missing column(s) solution, answer, subject, unique_id" in res.stderr and str(src) in res.stderr
    assert not (tmp_path / "root").exists()
    listing = nrr("data", "list")
    assert listing.returncode == 0 and listing.stdout.count("shipped") == len(catalog.DATASETS)


def test_configs_resolve_datasets_through_one_data_root(tmp_path, monkeypatch):
    from curator_pipelines.config import CurateConfig
    from curator_pipelines.decontam import build_index
    from curator_pipelines.pipeline import resolve_paths
    from recipes.config import ConfigError, load_config
    from recipes.evaluation.benchmarks import load_benchmark
    from recipes.evaluation.config import BenchmarkConfig

    env_root, cfg_root = tmp_path / "env", tmp_path / "cfg"
    for root, answer in ((env_root, "ENV"), (cfg_root, "CFG")):
        (root / "benchmarks").mkdir(parents=True)
        row = {**_rows("math500")[0], "answer": answer}
        (root / "benchmarks/math500.jsonl").write_text(json.dumps(row) + "\n")
    bench = BenchmarkConfig(name="math500", limit=1)
    assert load_benchmark(bench)[0]["answer"] == _rows("math500")[0]["answer"]  # the repository's copy
    monkeypatch.setenv(catalog.DATA_ROOT_ENV, str(env_root))
    assert load_benchmark(bench)[0]["answer"] == "ENV"
    assert load_benchmark(bench, str(cfg_root))[0]["answer"] == "CFG"  # a config's data_root wins
    with pytest.raises(FileNotFoundError, match="nrr data prepare aime24"):
        load_benchmark(BenchmarkConfig(name="aime24"))
    monkeypatch.delenv(catalog.DATA_ROOT_ENV)
    # the stages read their config's data_root: evaluation (before any model loads) and curation
    from recipes.evaluation.config import EvalConfig
    from recipes.evaluation.runner import run_eval

    with pytest.raises(FileNotFoundError, match=f"{cfg_root}.*aime24"):
        run_eval(EvalConfig(model="unused", benchmarks=[BenchmarkConfig(name="aime24")], data_root=str(cfg_root),
                            output_dir=str(tmp_path / "eval"), report=False, progress=False))
    with pytest.raises(FileNotFoundError, match=f"{cfg_root}.*gsm8k_train"):
        resolve_paths(load_config(CurateConfig, ROOT / "nemo_configs/curate/gsm8k_sft.yaml",
                                  [f"data_root={cfg_root}"]), ROOT)
    only_math = resolve_paths(load_config(CurateConfig, ROOT / "nemo_configs/curate/embedded.yaml",
                                          [f"data_root={cfg_root}", "decontam.benchmarks=[math500]"]), ROOT)
    assert build_index(only_math.decontam, only_math.data_root).sizes["math500"] == 1  # cfg_root's one-line copy

    # curation: every shipped config finds its input and its decontamination sources by name
    for path in sorted((ROOT / "nemo_configs/curate").glob("*.yaml")):
        cfg = resolve_paths(load_config(CurateConfig, path), ROOT)
        assert ROOT.resolve() in Path(cfg.input.path).parents, path
        index = build_index(cfg.decontam, cfg.data_root)
        assert set(index.sizes) >= set(catalog.BENCHMARKS), path
    gsm = resolve_paths(load_config(CurateConfig, ROOT / "nemo_configs/curate/gsm8k_sft.yaml"), ROOT)
    assert Path(gsm.input.path) == catalog.path_of("gsm8k_train").resolve()
    assert resolve_paths(gsm, ROOT).input.path == gsm.input.path  # a resolved (saved) config resolves again
    with pytest.raises(ConfigError, match="not both"):
        resolve_paths(load_config(CurateConfig, ROOT / "nemo_configs/curate/gsm8k_sft.yaml",
                                  ["input.path=other.jsonl"]), ROOT)
    with pytest.raises(ConfigError, match="set `path`"):
        resolve_paths(load_config(CurateConfig, None, ["output_dir=x"]), ROOT)


def test_nothing_reads_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    offenders = []
    for name in set(tracked) - {"tests/test_data_catalog.py"}:  # this file names the copies' source to compare
        path = ROOT / name
        if path.suffix in (".py", ".yaml", ".yml", ".toml", ".cfg") or name in ("Makefile", ".ci/run"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if "../shared" in text or 'parent / "shared"' in text:
                offenders.append(name)
    assert offenders == []


# The data-dependent tests, run again from a copy of the repository whose parent folder has nothing else
CLONE_TESTS = [
    "tests/test_data_catalog.py::test_shipped_copies_match_their_checksums_and_their_source",
    "tests/test_data_catalog.py::test_configs_resolve_datasets_through_one_data_root",
    "tests/test_grader.py::test_every_benchmark_reference_grades_itself",
    "tests/test_curate_stages.py::test_decontamination_finds_benchmarks_and_the_heldout_split",
    "tests/test_k8s_manifests.py",
]


@pytest.mark.slow
def test_a_clone_without_a_sibling_folder_runs_the_data_tests(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\0")
    if not any(files):
        pytest.skip("not a git checkout")
    clone = tmp_path / "alone" / "repo"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["repo"]
    env = {k: v for k, v in os.environ.items() if k not in (catalog.DATA_ROOT_ENV, "NRR_K8S_CRDS")}
    env["PYTHONPATH"] = str(clone)  # the copy's packages, not the installed checkout's
    probe = subprocess.run([sys.executable, "-c", "import recipes; print(recipes.__file__)"], cwd=clone, env=env,
                           capture_output=True, text=True)
    assert probe.stdout.strip() == str(clone / "recipes" / "__init__.py")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CLONE_TESTS], cwd=clone,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout
