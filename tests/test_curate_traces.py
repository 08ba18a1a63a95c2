"""`nrr curate` with `generation.source: traces`: a trace dataset (OpenR1, Llama-Nemotron schemas) curated as it is,
on Ray, through the generated path's stages; every count by hand. Config and input errors come before Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curator_pipelines.config import CurateConfig
from recipes.config import ConfigError, load_config
from recipes.response_format import format_response

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "nemo_configs/curate/existing_traces.yaml"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _curate(tmp_path: Path, data: Path, *overrides: str) -> tuple[dict, list[dict], list[dict]]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "recipes.cli", "curate", "--config", CONFIG, "--no-progress",
                        f"input.path={data}", f"output_dir={out}", "decontam.benchmarks=[math500]", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    return report, _jsonl(out / "curated.jsonl"), _jsonl(out / "rejected.jsonl")


def _stages(report: dict) -> dict[str, tuple[int, int, dict]]:
    return {s["stage"]: (s["in"], s["out"], s["reasons"]) for s in report["stages"]}


# ------------------------------------------------------------------ OpenR1: every filter, by hand


def _think(thinking: str, answer: str) -> str:
    return format_response(thinking, answer)


MATH500 = next(r for r in _jsonl(ROOT / "recipes/assets/data/benchmarks/math500.jsonl")
               if r["unique_id"] == "test/algebra/722.json")  # "Compute $99^2+99+1$ in your head." = 9901
P1 = _think("Add the tens and the ones: 12 + 30 = 42.", "The sum is $\\boxed{42}$.")
LONG = _think("\n".join(f"Step {i}: {i} times 8 is {i * 8}, which is {'below' if i < 7 else 'at or above'} 56."
                        for i in range(1, 41)), "So $7 \\times 8 = \\boxed{56}$.")
OPENR1 = [
    {"uuid": "p1", "problem": "What is 12 + 30?", "answer": "42",
     "generations": [P1, _think("Twelve and thirty make forty-one.", "The sum is $\\boxed{41}$."), P1],
     "correctness_math_verify": [True, False, True]},  # correct, wrong, an exact duplicate of the first
    {"uuid": "p2", "problem": "Compute 7 times 8.", "answer": "56",
     "generations": [_think("Seven eights are fifty-six.", "$\\boxed{56}$"), LONG],
     "correctness_math_verify": [True, True]},  # correct, too long for the student
    {"uuid": "p3", "problem": "What is 100 - 1?", "answer": "99",
     "generations": [_think("One less than a hundred is ninety-nine.", "\\boxed{99}"),
                     _think("Subtracting 1 from 100 leaves 99 on the number line.", "\\boxed{99}"),
                     _think("Count down: 100, then 99.", "\\boxed{99}")],
     "correctness_math_verify": [True, True, True]},  # three correct: one over select.max_per_problem=2
    {"uuid": "p4", "problem": MATH500["problem"], "answer": MATH500["answer"],
     "generations": [_think("99^2 + 99 + 1 = 9801 + 100 = 9901.", f"\\boxed{{{MATH500['answer']}}}")],
     "correctness_math_verify": [True]},  # a MATH-500 problem: contaminated
]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from tests.families.build import build_family

    return build_family("qwen3", tmp_path_factory.mktemp("student") / "qwen3")


def _tokens(student: Path, problem: str, response: str) -> int:
    from recipes.tokenizer import load

    ids, _ = load(student).tokenize_conversation([{"role": "user", "content": problem},
                                                  {"role": "assistant", "content": response}], enable_thinking=True)
    return len(ids)


@pytest.mark.slow
def test_openr1_traces_go_through_every_stage_counted_by_hand(tmp_path, student):
    data = _write(tmp_path / "openr1.jsonl", OPENR1)
    counts = {f"{row['uuid']}#{k}": _tokens(student, row["problem"], gen)
              for row in OPENR1 for k, gen in enumerate(row["generations"])}
    max_tokens = max(n for rid, n in counts.items() if rid != "p2#1")  # every trace fits but the long one
    assert counts["p2#1"] > max_tokens
    # the embedded students' byte-level tokenizer counts more: with it, no trace would fit
    assert min(_tokens(None, row["problem"], gen) for row in OPENR1 for gen in row["generations"]) > max_tokens

    report, corpus, rejected = _curate(tmp_path, data, f"filters.student_tokenizer={student}",
                                       f"filters.max_tokens={max_tokens}", "generation.teacher_name=DeepSeek-R1")
    assert _stages(report) == {
        "read": (9, 9, {}), "parse": (9, 9, {}), "truncation": (9, 9, {}), "format": (9, 9, {}),
        "correctness": (9, 8, {"wrong_answer": 1}), "length": (8, 7, {"too_long": 1}),
        "repetition": (7, 7, {}), "language": (7, 7, {}), "dedup_exact": (7, 6, {"exact_duplicate": 1}),
        "dedup_fuzzy": (6, 6, {}), "decontam": (6, 5, {"contaminated": 1}),
        "select": (5, 4, {"over_max_per_problem": 1}), "write": (4, 4, {})}
    read = report["stages"][0]
    assert read["dataset"] == str(data) and read["schema"] == ["openr1"] and read["rows"] == read["problems"] == 4
    assert report["thinking"] == {"read": {"think": 9, "no_think": 0}, "corpus": {"think": 4, "no_think": 0}}
    assert {r["id"]: r["reason"] for r in rejected} == {
        "p1#1": "wrong_answer", "p2#1": "too_long", "p1#2": "exact_duplicate", "p4#0": "contaminated",
        "p3#2": "over_max_per_problem"}
    assert report["decontamination"]["examples"][0]["source"] == f"math500:{MATH500['unique_id']}"

    # the corpus: shortest first in the student's tokens, each count the student's tokenizer's
    assert [r["id"] for r in corpus] == sorted(["p1#0", "p2#0", "p3#0", "p3#1"], key=lambda i: (counts[i], i))
    assert all(r["n_tokens"] == counts[r["id"]] for r in corpus)
    first = next(r for r in corpus if r["id"] == "p1#0")
    assert first["messages"] == [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": P1}]
    assert (first["problem_id"], first["reference"], first["source"], first["teacher"], first["enable_thinking"]) == (
        "p1", "42", "openr1.jsonl", "DeepSeek-R1", True)
    assert first["extra"] == {"schema": "openr1", "original_id": "p1-g0", "where": f"{data}:row 1",
                              "generation": 0, "correct": True}
    # the same record schema as the generated path's
    assert set(first) == set(_generated_record(tmp_path))


def _generated_record(tmp_path: Path) -> dict:
    """A record of the generated path (GSM8K-style human solutions), its stages called in order without Ray."""
    from nemo_curator.tasks import EmptyTask

    from curator_pipelines.pipeline import build_pipeline, resolve_paths
    from curator_pipelines.write import CORPUS_JSONL

    problems = _write(tmp_path / "problems.jsonl", [{"id": "g1", "problem": "What is 2 + 2?", "answer": "4",
                                                     "solution": "2 + 2 = 4\n#### 4"}])
    cfg = resolve_paths(load_config(CurateConfig, None, [
        f"input.path={problems}", "input.solution_field=solution", "generation.source=solution",
        "decontam.enabled=false", f"output_dir={tmp_path / 'generated'}", "output.parquet=false",
        "output.histograms=false"]), ROOT)
    task = EmptyTask()
    for stage in build_pipeline(cfg, show_progress=False).stages:
        task = stage.process(task)
    return _jsonl(tmp_path / "generated" / CORPUS_JSONL)[0]


# ------------------------------------------------------------------ Nemotron: the think / no-think split

NEMOTRON = [
    {"input": [{"role": "user", "content": question}], "output": output, "reasoning": mode, "category": category,
     "license": "cc-by-4.0", "generator": "DeepSeek-R1" if mode == "on" else "Llama-3.3-70B-Instruct",
     "system_prompt": f"detailed thinking {mode}", "used_in_training": "yes"}
    for question, output, mode, category in [
        ("Name a prime number larger than ten.", _think("11 has no divisors but 1 and itself.", "11 is prime."),
         "on", "chat"),
        ("Why is the sky blue?", _think("Rayleigh scattering favours short wavelengths.",
                                        "Air scatters blue light more than red."), "on", "science"),
        ("Write a haiku about rain.", "Soft rain on the roof\nthe garden drinks in silence\npuddles hold the sky",
         "off", "chat"),
        ("What is the capital of France?", "Paris.", "off", "chat"),
        ("Reverse the word stressed.", "desserts", "off", "chat"),
    ]]


@pytest.mark.slow
def test_nemotron_reasoning_on_and_off_rows_are_the_think_and_no_think_split(tmp_path):
    data = _write(tmp_path / "nemotron.jsonl", NEMOTRON)
    report, corpus, rejected = _curate(tmp_path, data, "filters.unverified=keep")
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["thinking"] == {"read": {"think": 2, "no_think": 3}, "corpus": {"think": 2, "no_think": 3}}
    assert (stages["read"]["think"], stages["read"]["no_think"], stages["read"]["schema"]) == (2, 3, ["nemotron"])
    # no references: every record passes correctness as "unverified", counted
    assert stages["correctness"]["out"] == 5 and stages["correctness"]["kept_flagged"] == {"unverified": 5}
    assert rejected == [] and len(corpus) == 5
    off = {r["messages"][0]["content"]: r for r in corpus if not r["enable_thinking"]}
    assert off["What is the capital of France?"]["messages"][1]["content"] == format_response(None, "Paris.")
    assert off["What is the capital of France?"]["teacher"] == "Llama-3.3-70B-Instruct"
    assert off["What is the capital of France?"]["difficulty"] == "unverified"
    assert {r["extra"]["category"] for r in corpus} == {"chat", "science"}
    assert "| correctness | 5 | 5 | 0 | unverified (kept): 5 |" in (tmp_path / "out/report.md").read_text()


# ------------------------------------------------------------------ errors before any Ray work


def test_a_dataset_of_no_schema_fails_before_ray_with_the_schemas_error(tmp_path, monkeypatch):
    from curator_pipelines import pipeline
    from curator_pipelines.read import BadRecordError

    def no_ray(*_):
        raise AssertionError("Ray started")

    monkeypatch.setattr(pipeline, "ray_session", no_ray)
    data = _write(tmp_path / "odd.jsonl", [{"question_text": "1+1", "model_output": "2"}])
    cfg = load_config(CurateConfig, ROOT / CONFIG, [f"input.path={data}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(BadRecordError) as err:
        pipeline.run_curation(cfg, show_progress=False)
    message = str(err.value)
    assert f"{data}:row 1: columns [model_output, question_text] match no known schema" in message
    assert "openr1: problem, generations, correctness_math_verify" in message  # the schemas, with their columns
    assert "`fields` (our name: your column), keys: " in message  # and the keys `fields` maps onto


@pytest.mark.parametrize("overrides, key", [
    (["embedded_problems.enabled=true"], "embedded_problems.enabled"),
    (["input.on_bad_record=skip"], "input.on_bad_record=skip"),
    (["generation.source=endpoint"], "input.schema"),  # schema named, but problems read
])
def test_invalid_combinations_name_the_key_and_the_fix(overrides, key):
    from curator_pipelines.pipeline import resolve_paths

    cfg = load_config(CurateConfig, ROOT / CONFIG, ["input.schema=openr1", *overrides])
    with pytest.raises(ConfigError, match=key) as err:
        resolve_paths(cfg, ROOT)
    assert " set " in str(err.value)
