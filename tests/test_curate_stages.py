"""The curation stages one by one, called directly (no Ray): reading, generation, filters, dedup,
decontamination, selection, writing. The whole pipeline on Ray is in test_curate_pipeline.py."""

import dataclasses
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from nemo_curator.tasks import DocumentBatch, EmptyTask

from curator_pipelines.config import (
    DecontamConfig, DedupConfig, FilterConfig, TeacherRequestConfig, InputConfig, SelectConfig,
)
from curator_pipelines.decontam import build_index
from curator_pipelines.dedup import exact_duplicates, fuzzy_duplicates
from curator_pipelines.filters import JUDGES, FilterStage, ngram_repetition, parse_response
from curator_pipelines.generate import GenerateStage, GenerationError, load_results, response_text, solution_response
from curator_pipelines.read import BadRecordError, ReadProblemsStage, read_problems
from curator_pipelines.select import select, think_off_positions
from curator_pipelines.write import corpus_record, write_outputs
from recipes import task
from recipes.config import load_config
from recipes.teacher.server import FaultConfig, TeacherServer, TeacherServerConfig, fault_counts
from recipes.teacher.traces import DefectRates, TraceConfig

TEACHER_YAML = Path(__file__).resolve().parents[1] / "nemo_configs/teacher/embedded.yaml"
CLEAN_TEACHER = TeacherServerConfig(traces=TraceConfig(self_check_rate=0.0, defects=DefectRates()))


def _write_problems(path: Path, problems) -> Path:
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    return path


# ------------------------------------------------------------------ reading


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "bad_json": (b'{"id": "b", "problem": "2+2", "answer": "4"}\n{"id": "c", "problem": \n', 2, "invalid JSON"),
        "missing_field": (b'{"id": "b", "problem": "2+2"}\n', 1, "missing field 'answer'"),
        "not_utf8": (b'{"id": "b", "problem": "2+2\xff\xfe", "answer": "4"}\n', 1, "not UTF-8"),
    }
    out = {}
    for name, (extra, extra_line, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        good = json.dumps({"id": f"{name}-a", "problem": "1+1", "answer": "2"})
        path.write_bytes(good.encode() + b"\n" + extra)
        out[name] = (path, f"{path}:{extra_line + 1}: {message}")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    out["empty"] = (empty, f"{empty}: empty file")
    return out


def _dup_ids(tmp_path: Path) -> Path:
    path = tmp_path / "bad_json.jsonl"
    path.write_text('{"id": "b", "problem": "1+1", "answer": "2"}\n{"id": "b", "problem": "1+2", "answer": "3"}\n')
    return path


def test_malformed_input_errors_name_file_and_line(tmp_path):
    for name, (path, expected) in _bad_inputs(tmp_path).items():
        with pytest.raises(BadRecordError) as err:
            read_problems(InputConfig(path=str(path)))
        assert str(err.value).startswith(expected), (name, str(err.value))


def test_skip_quarantines_bad_records_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, (path, _) in _bad_inputs(tmp_path).items():
        path.rename(folder / path.name)
    quarantine = tmp_path / "quarantine.jsonl"
    stage = ReadProblemsStage(InputConfig(path=str(folder), on_bad_record="skip"), str(quarantine))
    batch = stage.process(EmptyTask())
    df = batch.to_pandas()
    # every good record survives: the first line of each damaged file, and "b" where it is valid
    assert sorted(df["problem_id"]) == ["b", "bad_json-a", "missing_field-a", "not_utf8-a"]
    assert batch._metadata["nrr_stage_log"][0]["reasons"] == {"quarantined": 4}
    with pytest.raises(BadRecordError, match=r"bad_json.jsonl:2: duplicate id 'b' \(first at"):
        read_problems(InputConfig(path=str(_dup_ids(tmp_path))))
    bad = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert sorted((Path(b["file"]).name, b["line"]) for b in bad) == [
        ("bad_json.jsonl", 3), ("empty.jsonl", 0), ("missing_field.jsonl", 2), ("not_utf8.jsonl", 2)]
    assert all(b["error"] for b in bad)


def test_read_parquet_and_datasets_folder_with_field_mapping(tmp_path):
    import datasets

    rows = [{"uid": f"q{i}", "question": f"{i}+1", "solution": f"... #### {i + 1}", "level": i} for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "p.parquet", tmp_path / "ds"):
        cfg = InputConfig(path=str(path), id_field="uid", problem_field="question", answer_field="solution",
                          answer_regex=r"####\s*(\S+)", extra_fields=["level"])
        df, n_bad = read_problems(cfg)
        assert n_bad == 0
        assert list(df["problem_id"]) == ["q0", "q1", "q2"] and list(df["reference"]) == ["1", "2", "3"]
        assert json.loads(df["extra"][2]) == {"level": 2}


# ------------------------------------------------------------------ generation


def _problems_frame(problems) -> pd.DataFrame:
    return pd.DataFrame([{"problem_id": p.id, "problem": p.question, "reference": p.answer, "solution": None,
                          "source": "t", "extra": "{}"} for p in problems])


def _generate(cfg: TeacherRequestConfig, problems, results: Path) -> pd.DataFrame:
    stage = GenerateStage(cfg, str(results), show_progress=False)
    return stage.process(DocumentBatch(dataset_name="t", data=_problems_frame(problems))).to_pandas()


def test_faults_429_500_and_hangs_still_yield_every_record(tmp_path):
    problems = task.train_problems([1, 2], 40, seed=3)
    faults = FaultConfig(rate_429=0.15, rate_500=0.15, rate_hang=0.05, hang_s=3.0, seed=1)
    with TeacherServer(TeacherServerConfig(faults=faults, log_path=str(tmp_path / "log.jsonl"))) as server:
        cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=2, concurrency=16, timeout_s=0.5,
                               max_retries=8, backoff_s=0.01, backoff_max_s=0.05)
        df = _generate(cfg, problems, tmp_path / "gen.jsonl")
    assert len(df) == 160 and df["kept"].all() and df["response"].notna().all()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    faults_seen = {e["fault"] for e in log if "fault" in e}
    assert faults_seen == {"429", "500", "hang"}
    assert (df["gen_attempts"] > 1).sum() > 20  # the faults really were retried


def test_retries_running_out_give_explicit_failure_records(tmp_path):
    problems = task.train_problems([1], 5, seed=3)
    with TeacherServer(TeacherServerConfig(faults=FaultConfig(rate_500=1.0))) as server:
        cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=2, max_retries=2, backoff_s=0.01,
                                   max_failed_fraction=1.0)
        df = _generate(cfg, problems, tmp_path / "gen.jsonl")
    assert len(df) == 10 and not df["kept"].any()
    assert set(df["drop_reason"]) == {"generation_failed"} and set(df["gen_error_class"]) == {"http_500"}
    assert all(e.startswith("HTTP 500") and "after 3 attempts" in e for e in df["gen_error"])
    # failures are asked again on the next run, and then succeed
    with TeacherServer(CLEAN_TEACHER) as server:
        df = _generate(TeacherRequestConfig(base_url=server.base_url, n_samples=2), problems, tmp_path / "gen.jsonl")
    assert df["kept"].all()


def test_failure_budget_fails_above_it_with_counts_by_class_and_reports_below_it(tmp_path):
    """No retries, half the requests answered 500: above a 10 % budget the stage fails naming the counts (also in
    report.json / report.md); with a 90 % budget the same failures are reported and the run goes on."""
    problems = task.train_problems([1, 2], 10, seed=6)  # 20 problems x 2 samples = 40 requests
    for budget, run in ((0.1, "above"), (0.9, "below")):
        out = tmp_path / run
        out.mkdir()
        faults = FaultConfig(rate_500=0.5, seed=2)
        with TeacherServer(TeacherServerConfig(faults=faults, log_path=str(out / "log.jsonl"))) as server:
            cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=2, max_retries=0,
                                       max_failed_fraction=budget)
            if run == "above":
                with pytest.raises(GenerationError) as err:
                    _generate(cfg, problems, out / "gen.jsonl")
            else:
                df = _generate(cfg, problems, out / "gen.jsonl")
        n_500 = fault_counts(out / "log.jsonl")["500"]
        assert 4 < n_500 < 36  # above 10 %, below 90 %: the test exercises both sides
        if run == "above":
            assert f"generation failed for {n_500} of 40 requests" in str(err.value)
            assert f"http_500: {n_500}" in str(err.value) and "max_failed_fraction" in str(err.value)
            report = json.loads((out / "report.json").read_text())
            assert report["status"] == "failed" and report["generation_failures"]["by_class"] == {"http_500": n_500}
            assert f"| http_500 | {n_500} |" in (out / "report.md").read_text()
        else:
            assert len(df) == 40 and int((~df["kept"]).sum()) == n_500
            assert df.loc[~df["kept"], "gen_error_class"].tolist() == ["http_500"] * n_500
            assert df.loc[df["kept"], "response"].notna().all()


def test_malformed_json_is_its_own_error_class_retried_and_every_request_accounted_for(tmp_path):
    problems = task.train_problems([1, 2], 10, seed=7)
    log = tmp_path / "log.jsonl"
    faults = FaultConfig(rate_malformed_json=0.3, seed=3)
    with TeacherServer(TeacherServerConfig(faults=faults, log_path=str(log))) as server:
        cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=2, max_retries=0, max_failed_fraction=1.0)
        df = _generate(cfg, problems, tmp_path / "once.jsonl")
        n_bad = fault_counts(log)["malformed_json"]
        assert n_bad > 0 and len(df) == 40
        assert df.loc[~df["kept"], "gen_error_class"].tolist() == ["malformed_json"] * n_bad
        assert df.loc[~df["kept"], "gen_error"].str.startswith("malformed JSON").all()
        # retried like a 5xx: with retries every request ends with a completion
        cfg = dataclasses.replace(cfg, max_retries=8, backoff_s=0.01, backoff_max_s=0.05)
        df = _generate(cfg, problems, tmp_path / "retried.jsonl")
    assert len(df) == 40 and df["kept"].all() and (df["gen_attempts"] > 1).any()


def test_resume_asks_only_for_missing_pairs_and_survives_a_torn_line(tmp_path):
    problems = task.train_problems([1, 2], 10, seed=4)
    results = tmp_path / "gen.jsonl"
    log = tmp_path / "log.jsonl"
    with TeacherServer(TeacherServerConfig(log_path=str(log))) as server:
        cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=2)
        first = _generate(cfg, problems[:12], results)
        with open(results, "a") as f:
            f.write('{"problem_id": "torn')  # a writer killed mid-line
        second = _generate(cfg, problems, results)
    asked = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(asked) == 40  # 24 first, then only the 16 missing
    assert len(load_results(results)) == 40
    pd.testing.assert_frame_equal(second.iloc[:24].reset_index(drop=True), first.reset_index(drop=True))


def test_api_key_comes_from_the_named_env_var_and_is_never_written(tmp_path, monkeypatch):
    problems = task.train_problems([1], 3, seed=5)
    with TeacherServer(CLEAN_TEACHER) as server:
        cfg = TeacherRequestConfig(base_url=server.base_url, api_key_env="NRR_TEST_TEACHER_KEY", n_samples=1)
        with pytest.raises(GenerationError, match="NRR_TEST_TEACHER_KEY"):
            _generate(cfg, problems, tmp_path / "gen.jsonl")
        monkeypatch.setenv("NRR_TEST_TEACHER_KEY", "sk-secret-value-123")
        df = _generate(cfg, problems, tmp_path / "gen.jsonl")
    assert df["kept"].all()
    for f in tmp_path.iterdir():
        assert "sk-secret-value-123" not in f.read_text()


def test_reasoning_fields_are_put_back_into_the_think_format():
    think = "<think>\n2+3;5\n</think>\n\n\\boxed{5}"
    answer = "\\boxed{5}"
    # vLLM's parsers keep the newlines around the tags; the DeepSeek API sends the parts bare
    assert response_text({"content": "\n\n" + answer, "reasoning_content": "\n2+3;5\n"}) == (think, "reasoning_content")
    assert response_text({"content": answer, "reasoning": "2+3;5", "reasoning_content": None}) == (think, "reasoning")
    assert response_text({"content": answer, "reasoning_content": "", "reasoning": "2+3;5"}) == (think, "reasoning")
    assert response_text({"content": think}) == (think, None)
    # a think block already in content is kept as it is
    assert response_text({"content": think, "reasoning_content": "2+3;5"}) == (think, None)
    # cut at max_tokens inside the thinking: no answer (None from vLLM, "" from DeepSeek), an open block
    assert response_text({"content": None, "reasoning": "\n2+3;"}) == ("<think>\n2+3;", "reasoning")
    assert response_text({"content": "", "reasoning_content": "2+3;"}) == ("<think>\n2+3;", "reasoning_content")
    assert response_text({"content": None}) == ("", None)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_endpoints_yield_the_inline_responses(field, tmp_path):
    problems = task.train_problems([1, 2, 3], 8, seed=7)
    clean = TeacherServerConfig(traces=TraceConfig(self_check_rate=0.5, spell_out_rate=0.5, defects=DefectRates()))
    # the defect teacher's responses are also cut short at arbitrary places (finish_reason "length")
    teachers = {"clean": (clean, 512), "defects": (load_config(TeacherServerConfig, TEACHER_YAML), 48)}
    for kind, (teacher, max_tokens) in teachers.items():
        frames = {}
        for name in (None, field):
            with TeacherServer(dataclasses.replace(teacher, reasoning_field=name)) as server:
                cfg = TeacherRequestConfig(base_url=server.base_url, n_samples=3, max_tokens=max_tokens)
                frames[name] = _generate(cfg, problems, tmp_path / f"{kind}-{name}.jsonl")
        inline, split = frames[None], frames[field]
        assert len(split) == 72 and split["kept"].all()
        assert inline["reasoning_field"].isna().all()
        pd.testing.assert_series_equal(split["teacher_label"], inline["teacher_label"])
        if kind == "clean":
            assert list(split["response"]) == list(inline["response"])  # byte for byte
            assert (split["reasoning_field"] == field).all()
            verdicts = [JUDGES["format"](_rec(p, r, ref), FilterConfig())
                        for p, r, ref in zip(split["problem"], split["response"], split["reference"])]
            assert verdicts == [(True, 1.0, "")] * 72
            assert split["response"].nunique() > 24  # several distinct traces per problem, not one answer
            assert load_results(tmp_path / f"clean-{field}.jsonl")[(problems[0].id, 0)]["reasoning_field"] == field
            assert corpus_record(split.iloc[0].to_dict(), [])["reasoning_field"] == field
            assert "reasoning_field" not in corpus_record(inline.iloc[0].to_dict(), [])
        else:
            # every finished response is the same, defects included; only a cut right at a think tag
            # reads differently (as from any reasoning parser), and the truncation filter drops it anyway
            stop = split["finish_reason"] == "stop"
            assert list(split["response"][stop]) == list(inline["response"][stop])
            differ = split["response"] != inline["response"]
            assert (split["finish_reason"][differ] == "length").all() and stop.sum() > 40


def test_gsm8k_solutions_become_think_responses():
    text = solution_response("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72.\n#### 72", "72")
    assert text == "<think>\nNatalia sold 48/2 = 24 clips in May.\nSo 48+24 = 72.\n</think>\n\n\\boxed{72}"


# ------------------------------------------------------------------ filters


def _rec(problem: str, response: str, reference: str, finish_reason: str = "stop") -> dict:
    return {"problem": problem, "response": response, "reference": reference, "finish_reason": finish_reason,
            **parse_response(response)}


@pytest.mark.parametrize(("name", "response", "finish", "reason"), [
    ("truncation", "", "stop", "empty"),
    ("truncation", "<think>\n7*5", "length", "truncated"),
    ("format", "<think>\n7\n\n\\boxed{7}", "stop", "unclosed_think"),
    ("format", "<think>\n7\n</think>\n\nseven", "stop", "no_answer"),
    ("format", "<think>\n7\n</think><think>7</think>\n\n\\boxed{7}", "stop", "multiple_think_blocks"),
    ("format", "\\boxed{7}", "stop", "no_think_block"),
    ("correctness", "<think>\n8\n</think>\n\n\\boxed{8}", "stop", "wrong_answer"),
    ("length", "<think>\n" + "7;" * 300 + "\n</think>\n\n\\boxed{7}", "stop", "too_long"),
    ("repetition", "<think>\n" + "wait, let me verify: 3+4;" * 5 + "7\n</think>\n\n\\boxed{7}", "stop", "looping"),
    ("language", "<think>\n让我们计算 7\n</think>\n\n\\boxed{7}", "stop", "language_mixing"),
])
def test_each_filter_rejects_its_defect_and_passes_a_clean_trace(name, response, finish, reason):
    cfg = FilterConfig(max_tokens=256)
    ok, _, why = JUDGES[name](_rec("3+4", response, "7", finish), cfg)
    assert (ok, why) == (False, reason)
    clean = "<think>\n7;wait, let me verify: 3+4=7\n</think>\n\n\\boxed{7}"
    assert JUDGES[name](_rec("3+4", clean, "7"), cfg) == (True, JUDGES[name](_rec("3+4", clean, "7"), cfg)[1], "")


def test_language_filter_allows_greek_math_and_the_length_filter_counts_template_tokens():
    cfg = FilterConfig()
    ok, ratio, _ = JUDGES["language"](_rec("area", "<think>\nA = πr^2, so α = 2\n</think>\n\n\\boxed{4π}", "4\\pi"), cfg)
    assert ok and ratio == 0.0
    rec = _rec("3+4", "<think>\n7\n</think>\n\n\\boxed{7}", "7")
    # by hand, the embedded students' byte-level tokenizer: <|im_start|> "user\n3+4" <|im_end|> "\n" <|im_start|>
    # "assistant\n" = 1+8+1+1+1+10, then <think> "\n7\n" </think> "\n\n\\boxed{7}" <|im_end|> "\n" = 1+3+1+11+1+1
    assert JUDGES["length"](rec, cfg)[1] == 22 + 18


def test_repetition_measure_by_hand():
    assert ngram_repetition("abcabcabc", 3) == (3, 1.0)
    assert ngram_repetition("abcdefgh", 3) == (1, 0.0)


def test_filter_stage_marks_instead_of_deleting():
    recs = [_rec("3+4", "<think>\n7\n</think>\n\n\\boxed{7}", "7"), _rec("3+4", "<think>\n8\n</think>\n\n\\boxed{8}", "7")]
    df = pd.DataFrame([{**r, "kept": True, "dropped_by": None, "drop_reason": None} for r in recs])
    out = FilterStage("correctness", FilterConfig()).process(DocumentBatch(dataset_name="t", data=df))
    got = out.to_pandas()
    assert list(got["kept"]) == [True, False] and got["drop_reason"][1] == "wrong_answer"
    assert out._metadata["nrr_stage_log"] == [
        {"stage": "correctness", "in": 2, "out": 1, "removed": 1, "reasons": {"wrong_answer": 1},
         "seconds": out._metadata["nrr_stage_log"][0]["seconds"]}]


# ------------------------------------------------------------------ dedup, decontamination


def test_exact_and_fuzzy_dedup_by_hand():
    base = "<think>\n7*5-2;35-2;33\n</think>\n\n\\boxed{33}"
    docs = [
        (0, "(3+4)*5-2", base),
        (1, "(3+4)*5-2", base.replace("\n\n", "\n \n")),  # whitespace only: the normalised hash matches
        (2, "(3+4)*5-2", base.replace(";", "; ") + "."),  # spacing and a period: a near duplicate
        (3, "(3+4)*5-2", "<think>\n7*5-2;35-2;33;wait, let me verify: (3+4)*5-2=33\n</think>\n\n\\boxed{33}"),
        (4, "(3+5)*5-7", "<think>\n8*5-7;40-7;33\n</think>\n\n\\boxed{33}"),  # another problem
    ]
    exact = exact_duplicates(docs)
    assert [exact[i][0] for i in range(5)] == [True, False, True, True, True]
    kept = [d for d in docs if exact[d[0]][0]]
    fuzzy = fuzzy_duplicates(kept, DedupConfig(shingle_chars=3, threshold=0.8))
    assert {i: v[0] for i, v in fuzzy.items()} == {0: True, 2: False, 3: True, 4: True}
    assert fuzzy[2][2] == "near_duplicate" and fuzzy[2][1] >= 0.8


def test_decontamination_finds_benchmarks_and_the_heldout_split(data_root):
    index = build_index(DecontamConfig(heldout_per_level=100))
    math500 = json.loads((data_root / "benchmarks/math500.jsonl").read_text().splitlines()[7])
    ref, how = index.match("Please solve: " + math500["problem"] + " Show your work.")
    assert ref.startswith("math500:") and "gram" in how
    gsm = json.loads((data_root / "benchmarks/gsm8k.jsonl").read_text().splitlines()[0])
    assert index.match(gsm["question"])[0] == "gsm8k:1"
    held = task.heldout_problems([3], 5)[4]
    assert index.match(held.question) == (f"embedded-heldout:{held.id}", "heldout_expression")
    assert all(index.match(p.question) is None for p in task.train_problems([1, 2, 3], 100))
    assert index.match("What is 2+2?") is None


# ------------------------------------------------------------------ selection and writing


def _selectable() -> pd.DataFrame:
    rows = []
    for pid, samples in {"p1": ["7", "7;check", "7"], "p2": ["9", "x"], "p3": ["1"]}.items():
        for s, think in enumerate(samples):
            ok = think != "x"
            response = f"<think>\n{think}\n</think>\n\n\\boxed{{{'1' if ok else '0'}}}"
            rows.append({"problem_id": pid, "record_id": f"{pid}#{s}", "sample_index": s, "problem": pid,
                         "reference": "1", "response": response, **parse_response(response),
                         "kept": ok, "dropped_by": None if ok else "correctness",
                         "drop_reason": None if ok else "wrong_answer",
                         "f_correctness_pass": ok, "f_length_score": float(len(response)), "extra": "{}"})
    return pd.DataFrame(rows)


def test_select_caps_prefers_distinct_and_orders_by_length():
    df, stats = select(_selectable(), SelectConfig(max_per_problem=2, hard_pass_rate=0.6))
    chosen = df[df["kept"]].sort_values("order")
    assert list(chosen["record_id"]) == ["p1#0", "p2#0", "p3#0", "p1#1"]  # shortest first (ties: by id); p1#2 repeats p1#0
    assert df.set_index("record_id").loc["p1#2", "drop_reason"] == "over_max_per_problem"
    assert dict(zip(df["problem_id"], df["difficulty"])) == {"p1": "easy", "p2": "hard", "p3": "easy"}
    assert stats["difficulty"] == {"easy": 2, "hard": 1}


def test_think_off_interleave_and_written_records(tmp_path):
    assert think_off_positions(10, 0.3) == {3, 6, 9}
    df, _ = select(_selectable(), SelectConfig(max_per_problem=2, think_off_ratio=0.5))
    info = write_outputs(df, tmp_path)
    assert info["corpus"] == 4 and info["rejected"] == 2
    corpus = [json.loads(line) for line in (tmp_path / "curated.jsonl").read_text().splitlines()]
    assert [r["enable_thinking"] for r in corpus] == [True, False, True, False]
    off = [r for r in corpus if not r["enable_thinking"]][0]
    assert off["messages"][1]["content"] == "<think>\n\n</think>\n\n\\boxed{1}"
    assert corpus[0]["messages"][0] == {"role": "user", "content": corpus[0]["problem_id"]}
    assert corpus[0]["filters"]["correctness"] == {"pass": True, "score": None, "reason": ""}
    table = pd.read_parquet(tmp_path / "curated.parquet")
    assert list(table["id"]) == [r["id"] for r in corpus]
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejected} == {"wrong_answer", "over_max_per_problem"}


def test_nrr_curate_names_file_and_line_of_a_bad_record(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n{"id": "b", "problem": "2+2"}\n')
    r = subprocess.run([sys.executable, "-m", "recipes.cli", "curate", "--config", "nemo_configs/curate/gsm8k_sft.yaml",
                        f"input.path={bad}", "input.dataset=null", "input.id_field=id", "input.problem_field=problem",
                        "input.answer_field=answer", "input.answer_regex=null", "input.solution_field=null",
                        f"output_dir={tmp_path / 'out'}"],
                       cwd=root, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 1
    assert f"{bad}:2: missing field 'answer'" in r.stderr


@pytest.mark.slow  # a whole `nrr curate` (Ray, the teacher process): ~45-80 s on 2 shared cores
def test_nrr_curate_stops_at_the_first_401_naming_endpoint_and_key_variable_never_the_key(tmp_path):
    """A teacher that refuses the client's key: `nrr curate` exits 1 after at most `concurrency` requests (those
    in flight), naming the endpoint and the variable; the report counts the 401s and the requests never sent; no
    key appears in the output or in any file of the run."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    client_key, server_key = "sk-client-wrong-7f3a9c", "sk-server-right-21be04"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "NRR_TEST_CLIENT_KEY": client_key, "NRR_TEST_SERVER_KEY": server_key}
    r = subprocess.run([sys.executable, "-m", "recipes.cli", "curate", "--no-progress", f"output_dir={out}",
                        f"input.path={out}/problems.jsonl", "embedded_problems.n_per_level=10",  # 30 x 2 requests
                        "generation.concurrency=4", "generation.api_key_env=NRR_TEST_CLIENT_KEY",
                        "generation.teacher_overrides=[auth_key_env=NRR_TEST_SERVER_KEY]"],
                       cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "refused the request with HTTP 401" in r.stderr and "$NRR_TEST_CLIENT_KEY" in r.stderr
    assert "the endpoint http://127.0.0.1:" in r.stderr
    n_401 = fault_counts(out / "teacher_log.jsonl")["401"]
    assert 1 <= n_401 <= 4  # the first refusal stops every request not yet sent
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["generation_failures"]["by_class"] == {"http_401": n_401, "not_asked": 60 - n_401}
    for text in [r.stdout, r.stderr] + [f.read_bytes().decode(errors="replace") for f in out.rglob("*") if f.is_file()]:
        assert client_key not in text and server_key not in text


def test_generations_are_reused_only_under_the_settings_that_made_them(tmp_path):
    """A rerun reuses generations.jsonl; under another sampling setting, prompt or input file it is a ConfigError
    naming each key (old -> new); generation.allow_config_change=true sets them aside and asks again."""
    from curator_pipelines.config import CurateConfig
    from curator_pipelines.pipeline import RESULTS_FILE, check_generations, resolve_paths
    from recipes.config import ConfigError

    problems = task.train_problems([1], 4, seed=6)
    src = _write_problems(tmp_path / "problems.jsonl", problems)
    out, log = tmp_path / "out", tmp_path / "log.jsonl"

    def asked() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    with TeacherServer(TeacherServerConfig(log_path=str(log))) as server:
        def rerun(*overrides: str) -> pd.DataFrame:  # what `nrr curate` does before Ray, then the stage
            cfg = resolve_paths(load_config(CurateConfig, None, [
                f"output_dir={out}", f"input.path={src}", f"generation.base_url={server.base_url}",
                "generation.n_samples=1", *overrides]))
            check_generations(cfg)
            return _generate(cfg.generation, problems, out / RESULTS_FILE)

        first = rerun()
        assert asked() == 4
        pd.testing.assert_frame_equal(rerun(), first)  # unchanged: every generation reused
        assert asked() == 4
        with pytest.raises(ConfigError) as err:
            rerun("generation.temperature=0.9", "generation.prompt_template='Solve: {problem}'")
        assert "generation.temperature: 0.7 -> 0.9" in str(err.value)
        assert "generation.prompt_template: '{problem}' -> 'Solve: {problem}'" in str(err.value)
        assert "generation.allow_config_change=true" in str(err.value) and asked() == 4
        assert rerun("generation.n_samples=2", "generation.concurrency=2")["kept"].all()  # more samples: reused
        assert asked() == 8

        rerun("generation.temperature=0.9", "generation.allow_config_change=true")
        assert asked() == 12  # asked again, the earlier generations kept aside
        [aside] = out.glob(f"{RESULTS_FILE}.stale-*")
        assert len(aside.read_text().splitlines()) == 8 and len((out / RESULTS_FILE).read_text().splitlines()) == 4
        rerun("generation.temperature=0.9")
        assert asked() == 12

        _write_problems(src, task.train_problems([1], 4, seed=7))  # other problems under the same path
        with pytest.raises(ConfigError, match=r"input\.path: 'sha256:[0-9a-f]+' -> 'sha256:"):
            rerun("generation.temperature=0.9")

    # the embedded teacher (a new port each run) counts by the settings its responses depend on: a slowed-down or
    # faulty rerun (latency_s, faults) reuses, another trace seed does not
    from curator_pipelines.pipeline import generation_fingerprint
    from recipes.fingerprint import changes

    def embedded(*teacher_overrides: str) -> dict:
        return generation_fingerprint(resolve_paths(load_config(CurateConfig, None, [
            f"input.path={src}", "generation.embedded_teacher=true",
            f"generation.teacher_overrides=[{','.join(teacher_overrides)}]"])))

    assert changes(embedded(), embedded("latency_s=0.01", "faults.rate_500=0.5", "log_path=/tmp/x")) == []
    assert changes(embedded(), embedded("traces.seed=3")) == ["teacher.traces.seed: 0 -> 3"]
