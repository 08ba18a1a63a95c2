"""Public reasoning datasets -> trace records and prompt sets (recipes/data/schemas.py), on small files built here."""

from __future__ import annotations

import json

import pytest

from recipes.data.schemas import DatasetSource, detect_schema, open_rows, read_prompts, read_traces
from recipes.data.trace_record import DataError, make_record, write_records

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def traces(path, cache, **kw):
    return list(read_traces(DatasetSource(str(path), cache_dir=cache, **kw)))


def prompts(path, cache, **kw):
    return [p for _, p in read_prompts(DatasetSource(str(path), cache_dir=cache, **kw))]


# ------------------------------------------------------------------------------ traces, one schema at a time

OPENR1 = [
    {"problem": "What is 2+3?", "solution": "2+3=5", "answer": "5", "uuid": "u1",
     "generations": ["<think>\nadd them\n</think>\n\nThe sum is $\\boxed{5}$.",
                     "<think>\nguess\n</think>\n\n\\boxed{6}",
                     "<think>\n2 plus 3\n</think>\n\n**5**",
                     "<think>\nstill thinking and cut off"],
     "correctness_math_verify": [True, False, True, True],
     "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]},
    {"problem": "What is 7*6?", "solution": "42", "answer": "42", "uuid": "u2",
     "generations": ["<think>\nseven sixes\n</think>\n\n\\boxed{41}"], "correctness_math_verify": [False],
     "messages": [{"role": "user", "content": "What is 7*6?"}, {"role": "assistant", "content": "42"}]},
]


def test_openr1_keeps_verified_generations_only(tmp_path, cache):
    out = traces(write_jsonl(tmp_path / "openr1.jsonl", OPENR1), cache)
    assert [r["id"] for _, r in out] == ["u1-g0", "u1-g2"]
    first = out[0][1]
    assert first["messages"] == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nThe sum is $\\boxed{5}$."}]
    assert out[1][1]["messages"][1]["content"] == "<think>\n2 plus 3\n</think>\n\n**5**"
    assert (first["reference"], first["problem_id"], first["enable_thinking"]) == ("5", "u1", True)
    assert (first["schema"], first["source"], first["generation"], first["correct"]) == (
        "openr1", "openr1.jsonl", 0, True)
    assert out[0][0] == f"{tmp_path / 'openr1.jsonl'}:row 1"


def test_openr1_keep_incorrect_still_drops_unclosed(tmp_path, cache):
    out = traces(write_jsonl(tmp_path / "openr1.jsonl", OPENR1), cache, keep_incorrect=True)
    assert [(r["id"], r["correct"]) for _, r in out] == [("u1-g0", True), ("u1-g1", False), ("u1-g2", True),
                                                         ("u2-g0", False)]
    assert out[0][0].endswith(":row 1") and out[3][0].endswith(":row 2")


NEMOTRON = [
    {"input": [{"role": "user", "content": "Prove it."}], "output": "<think>\nstep one\nstep two\n</think>\n\nDone.",
     "reasoning": "on", "system_prompt": "detailed thinking on", "category": "math", "license": "cc-by-4.0",
     "generator": "DeepSeek-R1", "used_in_training": "yes", "version": "v1"},
    {"input": [{"role": "user", "content": "Say hi."}], "output": "Hi!", "reasoning": "off",
     "system_prompt": "detailed thinking off", "category": "chat", "license": "cc-by-4.0",
     "generator": "Llama-3.3-70B-Instruct", "used_in_training": "no", "version": "v1"},
]


def test_nemotron_reasoning_on_and_off(tmp_path, cache):
    out = [r for _, r in traces(write_parquet(tmp_path / "nemo.parquet", NEMOTRON), cache, source="nemotron")]
    on, off = out
    assert on["messages"][1]["content"] == "<think>\nstep one\nstep two\n</think>\n\nDone."
    assert off["messages"][1]["content"] == "<think>\n\n</think>\n\nHi!"
    assert (on["enable_thinking"], off["enable_thinking"]) == (True, False)
    assert (on["system"], off["system"]) == ("detailed thinking on", "detailed thinking off")
    assert (on["teacher"], on["category"], off["used_in_training"]) == ("DeepSeek-R1", "math", "no")
    assert on["reference"] is None and on["source"] == "nemotron" and on["schema"] == "nemotron"


def test_nemotron_reasoning_on_without_think_block_names_the_row(tmp_path, cache):
    rows = [NEMOTRON[0], {**NEMOTRON[0], "output": "No thinking here."}]
    path = write_parquet(tmp_path / "nemo_bad.parquet", rows)
    with pytest.raises(DataError, match=r"nemo_bad\.parquet:row 2: 'reasoning' is 'on' but the output has no"):
        traces(path, cache)


SYSTEM = "Your role as an assistant involves thoroughly exploring questions."
OPENTHOUGHTS = [
    {"system": SYSTEM, "conversations": [
        {"from": "user", "value": "Find x if 2x=4."},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nDivide by two.\n\nx is 2.\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\n$x = \\boxed{2}$\n\n<|end_of_solution|>"}]},
    {"system": SYSTEM, "conversations": [
        {"from": "user", "value": "Is 9 prime?"},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\n9 = 3*3\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\nNo.\n\n<|end_of_solution|>"}]},
]


def test_openthoughts_saved_dataset_dict_and_splits(tmp_path, cache):
    folder = tmp_path / "stratos"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(OPENTHOUGHTS),
                          "test": datasets.Dataset.from_list(OPENTHOUGHTS[1:])}).save_to_disk(str(folder))
    out = traces(folder, cache)
    assert [w for w, _ in out] == [f"{folder}[train]:row 1", f"{folder}[train]:row 2"]
    first = out[0][1]
    assert first["messages"] == [{"role": "user", "content": "Find x if 2x=4."},
                                 {"role": "assistant", "content": "<think>\nDivide by two.\n\nx is 2.\n</think>\n\n"
                                                                  "$x = \\boxed{2}$"}]
    assert (first["system"], first["enable_thinking"], first["schema"]) == (SYSTEM, True, "openthoughts")
    test = traces(folder, cache, split="test")
    assert [r["messages"][1]["content"] for _, r in test] == ["<think>\n9 = 3*3\n</think>\n\nNo."]
    with pytest.raises(DataError, match=r"no split 'valid' \(splits: train, test\)"):
        traces(folder, cache, split="valid")


def test_openthoughts_without_markers_is_an_error(tmp_path, cache):
    rows = [{"system": "", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}]
    with pytest.raises(DataError, match=r"plain\.jsonl:row 1: the assistant value lacks <\|begin_of_thought\|>"):
        traces(write_jsonl(tmp_path / "plain.jsonl", rows), cache)


def test_numina_no_think_and_boxed_reference(tmp_path, cache):
    rows = [{"source": "olympiads", "problem": "Compute 1/2+1/4.",
             "solution": "We get \\boxed{\\frac{1}{2}} first, then $\\frac12+\\frac14=\\boxed{\\frac{3}{4}}$.",
             "messages": [{"role": "user", "content": "Compute 1/2+1/4."}, {"role": "assistant", "content": "3/4"}]},
            {"source": "cn_k12", "problem": "Name a prime.", "solution": "Two is prime.",
             "messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "2"}]}]
    out = [r for _, r in traces(write_jsonl(tmp_path / "numina.jsonl", rows), cache)]
    assert out[0]["messages"][1]["content"] == ("<think>\n\n</think>\n\nWe get \\boxed{\\frac{1}{2}} first, then "
                                                "$\\frac12+\\frac14=\\boxed{\\frac{3}{4}}$.")
    assert [r["reference"] for r in out] == ["\\frac{3}{4}", None]
    assert [r["enable_thinking"] for r in out] == [False, False]
    assert [r["origin"] for r in out] == ["olympiads", "cn_k12"] and out[0]["schema"] == "numina"


def test_messages_reasoning_content_and_inline_think(tmp_path, cache):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2", "reasoning_content": "one and one"}], "answer": 2},
            {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "<think>\ntwo twos\n</think>\n\n4"}]},
            {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]}]
    out = [r for _, r in traces(write_jsonl(tmp_path / "chat.jsonl", rows), cache)]
    assert [r["messages"][1]["content"] for r in out] == ["<think>\none and one\n</think>\n\n2",
                                                          "<think>\ntwo twos\n</think>\n\n4",
                                                          "<think>\n\n</think>\n\nHi there"]
    assert [r["enable_thinking"] for r in out] == [True, True, False]
    assert [r["reference"] for r in out] == ["2", None, None]
    assert out[0]["system"] == "Be brief." and "system" not in out[1]
    assert out[0]["messages"][0] == {"role": "user", "content": "1+1?"}


def test_messages_multi_turn_is_an_error(tmp_path, cache):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    with pytest.raises(DataError, match=r"multi\.jsonl:row 1: 'messages' must be one user then one assistant"):
        traces(write_jsonl(tmp_path / "multi.jsonl", rows), cache)


def test_own_records_pass_through(tmp_path, cache):
    recs = [make_record("p1-rs0", "What is 3+4?", "<think>\n3+4=7\n</think>\n\n7", problem_id="p1", reference="7",
                        source="rejection-sampling", teacher="policy", level=2),
            make_record("p2", "What is 1+1?", "<think>\n\n</think>\n\n2", problem_id="p2", reference="2",
                        source="task-reference", teacher=None, enable_thinking=False, level=1)]
    out = [r for _, r in traces(write_records(recs, tmp_path / "corpus.jsonl"), cache)]
    assert out == recs


# ------------------------------------------------------------------------------ detection and field mapping


@pytest.mark.parametrize("rows, name", [(OPENR1, "openr1"), (NEMOTRON, "nemotron"), (OPENTHOUGHTS, "openthoughts"),
                                        ([{"source": "x", "problem": "p", "solution": "s", "messages": []}], "numina"),
                                        ([{"messages": []}], "messages"),
                                        ([make_record("a", "q", "r", problem_id="a", reference="1", source="s",
                                                      teacher=None)], "record")])
def test_detect_trace_schemas(rows, name):
    assert detect_schema(rows[0].keys()) == name


@pytest.mark.parametrize("columns, name", [(["question", "answer"], "gsm8k"),
                                           (["problem", "solution", "answer", "subject", "level"], "math"),
                                           (["problem", "solution", "level", "type"], "math"),
                                           (["problem_id", "question", "input_output", "solutions"], "code"),
                                           (["prompt", "tests"], "code"),
                                           (["id", "problem", "reference", "tests"], "code"),
                                           (["id", "problem", "reference"], "prompt")])
def test_detect_prompt_schemas(columns, name):
    assert detect_schema(columns, "prompt") == name


def test_fields_map_columns_onto_a_schema(tmp_path, cache):
    rows = [{"instruction": "Add 2 and 2.", "output": "<think>\n2+2\n</think>\n\n4", "gold": 4, "idx": 17},
            {"instruction": "Add 1 and 2.", "output": "3", "gold": 3, "idx": 18}]
    path = write_parquet(tmp_path / "custom.parquet", rows)
    out = [r for _, r in traces(path, cache, fields={"problem": "instruction", "response": "output",
                                                     "reference": "gold", "id": "idx"})]
    assert [(r["id"], r["schema"], r["reference"], r["enable_thinking"]) for r in out] == [
        ("17", "pair", "4", True), ("18", "pair", "3", False)]
    assert out[0]["messages"] == [{"role": "user", "content": "Add 2 and 2."},
                                  {"role": "assistant", "content": "<think>\n2+2\n</think>\n\n4"}]
    ps = prompts(path, cache, fields={"problem": "instruction", "reference": "gold"})
    assert [(p["problem"], p["reference"], p["tests"]) for p in ps] == [("Add 2 and 2.", "4", None),
                                                                      ("Add 1 and 2.", "3", None)]


def test_no_matching_schema_lists_columns_schemas_and_keys(tmp_path, cache):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"instruction": "x", "completion": "y"}])
    with pytest.raises(DataError) as err:
        traces(path, cache)
    msg = str(err.value)
    assert f"{path}:row 1: columns [completion, instruction] match no known schema" in msg
    assert "  openr1: problem, generations, correctness_math_verify\n" in msg
    assert "  nemotron: input, output, reasoning\n" in msg and "  pair: problem, response\n" in msg
    assert "`fields`" in msg and "keys: answer, conversations," in msg and "gsm8k" not in msg
    with pytest.raises(DataError, match=r"code: prompt\|question\|problem, tests\|input_output"):
        prompts(path, cache)


def test_named_schema_and_field_errors(tmp_path, cache):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "#### 1"}])
    assert [(p["problem"], p["reference"]) for p in prompts(path, cache, schema="gsm8k")] == [("q", "1")]
    with pytest.raises(DataError, match=r"columns \[answer, question\] lack the columns of schema 'math'"):
        prompts(path, cache, schema="math")
    with pytest.raises(DataError, match=r"unknown prompt schema 'nemotron'"):
        prompts(path, cache, schema="nemotron")
    with pytest.raises(DataError, match=r"`fields` keys \['questoin'\] name no field \(keys: answer,"):
        prompts(path, cache, fields={"questoin": "question"})
    with pytest.raises(DataError, match=r"q\.jsonl:row 1: `fields` names columns \['query'\] the dataset lacks"):
        prompts(path, cache, fields={"problem": "query"})


# ------------------------------------------------------------------------------ prompt sets


def test_gsm8k_references(tmp_path, cache):
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
            {"question": "A car costs $1,200 and a bike $34. Total?", "answer": "1200+34=1234\n#### 1,234"},
            {"question": "Temperature falls from 2 by 5?", "answer": "2-5=-3\n#### -3"}]
    out = prompts(write_jsonl(tmp_path / "gsm8k.jsonl", rows), cache)
    assert [p["reference"] for p in out] == ["7", "1234", "-3"]
    assert out[0]["problem"] == "Tom has 3 apples and buys 4. How many?" and out[0]["tests"] is None
    assert out[0]["source"] == "gsm8k.jsonl" and len({p["id"] for p in out}) == 3 and len(out[0]["id"]) == 16


def test_gsm8k_answer_without_marker_names_the_row(tmp_path, cache):
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "2"}]
    with pytest.raises(DataError, match=r"gsm\.jsonl:row 2: GSM8K 'answer' has no '#### <final answer>' line"):
        prompts(write_jsonl(tmp_path / "gsm.jsonl", rows), cache)


def test_math_prompts_answer_or_boxed(tmp_path, cache):
    math500 = [{"problem": "Find $x$.", "solution": "So \\boxed{3}.", "answer": "3", "subject": "Algebra",
                "level": 1, "unique_id": "test/algebra/1.json"}]
    hendrycks = [{"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1",
                  "type": "Algebra"}]
    a = prompts(write_parquet(tmp_path / "math500.parquet", math500), cache)
    b = prompts(write_jsonl(tmp_path / "hendrycks.jsonl", hendrycks), cache)
    assert a == [{"id": "test/algebra/1.json", "problem": "Find $x$.", "reference": "3", "tests": None,
                  "source": "math500.parquet"}]
    assert b[0]["reference"] == "\\frac{1}{2}"


def test_code_prompts_tests_in_the_reward_format(tmp_path, cache):
    rows = [{"prompt": "Echo the input.", "tests": [{"stdin": "5\n", "stdout": "5\n"}, {"input": "a", "output": "a"}]}]
    apps = [{"problem_id": 4, "question": "Sum two ints.", "solutions": "[]",
             "input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})},
            {"problem_id": 5, "question": "f(x)", "solutions": "[]",
             "input_output": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [2]})}]
    out = prompts(write_jsonl(tmp_path / "code.jsonl", rows), cache)
    assert out[0]["tests"] == [{"stdin": "5\n", "stdout": "5\n"}, {"stdin": "a", "stdout": "a"}]
    assert out[0]["problem"] == "Echo the input." and out[0]["reference"] is None
    it = read_prompts(DatasetSource(str(write_jsonl(tmp_path / "apps.jsonl", apps)), cache_dir=cache))
    where, first = next(it)
    assert first["id"] == "4" and first["tests"] == [{"stdin": "1 2\n", "stdout": "3\n"},
                                                     {"stdin": "3 4\n", "stdout": "7\n"}]
    with pytest.raises(DataError, match=r"apps\.jsonl:row 2: call-based tests \(fn_name 'f'\)"):
        next(it)


# ------------------------------------------------------------------------------ reading files


def test_open_rows_formats_folders_splits_and_streaming(tmp_path, cache):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"x": 1}, {"x": 2}])
    (folder / "b.json").write_text(json.dumps([{"x": 3}]), encoding="utf-8")
    write_parquet(folder / "c.parquet", [{"x": 4}])
    datasets.Dataset.from_list([{"x": 5}, {"x": 6}]).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    rows = list(open_rows(folder, cache_dir=cache))
    assert [(w, r["x"]) for w, r in rows] == [(f"{folder / 'a.jsonl'}:row 1", 1), (f"{folder / 'a.jsonl'}:row 2", 2),
                                              (f"{folder / 'b.json'}:row 1", 3), (f"{folder / 'c.parquet'}:row 1", 4)]
    assert [r for _, r in open_rows(folder, streaming=True)] == [r for _, r in rows]
    assert [(w, r["x"]) for w, r in open_rows(tmp_path / "saved", split="train")] == [
        (f"{tmp_path / 'saved'}:row 1", 5), (f"{tmp_path / 'saved'}:row 2", 6)]
    assert [r["x"] for _, r in open_rows(arrow, cache_dir=cache)] == [5, 6]


def test_folder_split_files(tmp_path, cache):
    folder = tmp_path / "gsm"
    (folder / "data").mkdir(parents=True)
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", [{"question": "q1", "answer": "#### 1"}])
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", [{"question": "q2", "answer": "#### 2"}])
    assert [p["reference"] for p in prompts(folder, cache)] == ["1"]
    assert [p["reference"] for p in prompts(folder, cache, split="test")] == ["2"]
    with pytest.raises(DataError, match=r"no files of split 'validation' \(files of splits: test, train\)"):
        prompts(folder, cache, split="validation")


def test_bad_jsonl_line_named(tmp_path, cache):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n', encoding="utf-8")
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
            prompts(path, cache, streaming=streaming)


def test_missing_value_and_missing_file(tmp_path, cache):
    rows = [{"problem": "p", "answer": "1"}, {"problem": None, "answer": "2"}]
    with pytest.raises(DataError, match=r"nulls\.jsonl:row 2: no value in column\(s\) problem that schema 'math'"):
        prompts(write_jsonl(tmp_path / "nulls.jsonl", rows), cache)
    with pytest.raises(DataError, match="dataset not found"):
        list(open_rows(tmp_path / "nope.jsonl"))
