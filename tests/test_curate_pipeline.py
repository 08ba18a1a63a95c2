"""`nrr curate` end to end on Ray (Curator's RayDataExecutor) with the embedded teacher: defect
recall against the teacher's own labels, the report, and SIGKILL during generation + rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.teacher.traces import RESPONSE_DEFECTS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_PER_LEVEL = 400  # levels 1-3, 2 samples each: 2,400 records
STAGES = ["read", "generate", "parse", "truncation", "format", "correctness", "length", "repetition", "language",
          "dedup_exact", "dedup_fuzzy", "decontam", "select", "write"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.cli", "curate", "--no-progress",
            f"output_dir={out}", f"input.path={out}/problems.jsonl",
            f"embedded_problems.n_per_level={N_PER_LEVEL}", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curate_reference")
    r = subprocess.run(_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r.stdout


def test_embedded_run_removes_every_defect_class_and_reports_each_stage(reference_run):
    out, stdout = reference_run
    report = json.loads((out / "report.json").read_text())
    labels = report["teacher_labels"]
    for defect in (*RESPONSE_DEFECTS, "contaminated"):
        s = labels[defect]
        assert s["records"] >= 15, (defect, s)
        assert s["removed"] / s["records"] >= 0.99, (defect, s)
    assert labels["none"]["removed_share"] <= 0.01, labels["none"]

    # the same numbers from the written records and the teacher's server-side log
    corpus = _jsonl(out / "curated.jsonl")
    rejected = _jsonl(out / "rejected.jsonl")
    ids = [r["id"] for r in corpus] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids)) == 3 * N_PER_LEVEL * 2
    assert all(r["teacher_label"] == "none" for r in corpus)
    assert len(_jsonl(out / "teacher_log.jsonl")) == len(ids)

    # per-stage counts: each stage takes what the one before it kept
    stages = report["stages"]
    assert [s["stage"] for s in stages] == STAGES
    assert stages[1]["in"] == 2 * stages[0]["out"]
    for before, after in zip(stages[1:], stages[2:]):
        assert after["in"] == before["out"] and after["removed"] == sum(after["reasons"].values())
    assert stages[-1]["out"] == report["corpus"] == len(corpus)
    assert "| dedup_fuzzy |" in (out / "report.md").read_text()
    assert (out / "length_hist.png").stat().st_size > 1000 and (out / "pass_rate_hist.png").stat().st_size > 1000
    assert report["decontamination"]["matches"] > 0
    assert "corpus:" in stdout

    # chat format with provenance
    rec = corpus[0]
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["teacher"] == "nrr-embedded-teacher" and set(rec["filters"]) >= {"format", "correctness", "dedup_fuzzy"}
    import pandas as pd

    assert list(pd.read_parquet(out / "curated.parquet")["id"]) == [r["id"] for r in corpus]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_sigkill_during_generation_then_rerun_equals_an_uninterrupted_run(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    results = out / "generations.jsonl"
    slow = ["generation.teacher_overrides=[latency_s=0.01]", "generation.concurrency=4"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(out, *slow), cwd=ROOT, env=_env(), stdout=log, stderr=log,
                                start_new_session=True)
    total = 3 * N_PER_LEVEL * 2
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if results.exists() and results.read_bytes().count(b"\n") >= 300:
            break
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = results.read_bytes().count(b"\n")
    assert 300 <= done_before < total  # killed in the middle of generation

    r = subprocess.run(_cmd(out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    # the rerun stopped what the killed run left behind (its Ray processes, found by their marker)
    time.sleep(1.0)
    assert not [p for p in _session_pids(proc.pid) if p != proc.pid]

    # same corpus, same rejected records, nothing missing, nothing asked twice
    assert (out / "curated.jsonl").read_text() == (ref_out / "curated.jsonl").read_text()
    assert [r["id"] for r in _jsonl(out / "rejected.jsonl")] == [r["id"] for r in _jsonl(ref_out / "rejected.jsonl")]
    lines = [json.loads(line) for line in results.read_bytes().splitlines() if line.strip().endswith(b"}")]
    keys = [(rec["problem_id"], rec["sample_index"]) for rec in lines if rec.get("status") == "ok"]
    assert len(keys) == len(set(keys)) == total
    gen = json.loads((out / "report.json").read_text())["stages"][1]
    assert gen["resumed"] >= done_before - 1 and gen["requested"] == total - gen["resumed"]
