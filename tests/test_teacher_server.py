"""The embedded teacher: R1-style traces, labelled defects, the OpenAI-compatible API, faults."""

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from recipes import grader, task
from recipes.response_format import format_response, split_response
from recipes.config import ConfigError, load_config
from recipes.teacher.server import FaultConfig, TeacherServerConfig, TeacherServer, assistant_message
from recipes.teacher.traces import RESPONSE_DEFECTS, DefectRates, TraceConfig, make_trace, parse_expression

ROOT = Path(__file__).resolve().parents[1]
TEACHER_YAML = ROOT / "nemo_configs/teacher/embedded.yaml"


def _cfg() -> TeacherServerConfig:
    return load_config(TeacherServerConfig, TEACHER_YAML)


def test_parse_expression_from_a_user_message():
    assert parse_expression("(3+4)*5-2") == "(3+4)*5-2"
    assert parse_expression("Compute (3 + 4) * 5 - 2. Put the answer in \\boxed{}.") == "(3+4)*5-2"
    assert parse_expression("What is the capital of France?") is None


@pytest.mark.parametrize("spell_out", [True, False])
def test_clean_traces_are_canonical_compact_and_correct(spell_out):
    cfg = _cfg()
    assert cfg.traces.spell_out_rate == 1.0  # the embedded default: every clean trace writes hard operations out
    cfg.traces.spell_out_rate = 1.0 if spell_out else 0.0
    think_chars = cot_chars = 0
    problems = task.train_problems([1, 2, 3], 300, seed=5)
    for p in problems:
        for s in range(2):
            t = make_trace(p.question, s, cfg.traces)
            if t.defect != "none":
                continue
            thinking, answer_part, closed = split_response(t.text)
            assert closed and t.finish_reason == "stop"
            cot = task.cot_text(p, spell_out=spell_out)
            assert thinking.startswith(cot)  # the canonical reduction, maybe a self-check after
            assert grader.grade(grader.extract_answer(answer_part), p.answer)
            think_chars += len(thinking)
            cot_chars += len(cot)
    assert think_chars / cot_chars <= 1.5


def test_defects_are_deterministic_labelled_and_look_like_their_label():
    cfg = _cfg()
    labels = collections.Counter()
    for p in task.train_problems([1, 2, 3], 300, seed=6):
        for s in range(3):
            t = make_trace(p.question, s, cfg.traces, max_tokens=512)
            assert t == make_trace(p.question, s, cfg.traces, max_tokens=512)  # same request, same answer
            labels[t.defect] += 1
            thinking, answer_part, closed = split_response(t.text)
            if t.defect == "wrong_answer":
                assert closed and not grader.grade(grader.extract_answer(answer_part), p.answer)
            elif t.defect == "unclosed_think":
                assert not closed and "\\boxed" in t.text
            elif t.defect == "truncated":
                assert t.finish_reason == "length"
            elif t.defect == "language_mix":
                assert any(ord(ch) > 0x3FF for ch in t.text)
            elif t.defect == "exact_duplicate" and t.injected:
                assert t.text == make_trace(p.question, s - 1, cfg.traces).text
            elif t.defect == "near_duplicate":
                prev = make_trace(p.question, s - 1, cfg.traces).text
                assert t.text != prev and t.text.replace(" ", "").rstrip(".") == prev.replace(" ", "")
    for d in RESPONSE_DEFECTS:
        assert labels[d] > 0, d
    # a compact teacher often repeats itself: later samples equal to an earlier one are real duplicates
    assert labels["none"] + labels["exact_duplicate"] > 0.7 * sum(labels.values())
    assert labels["none"] > 0.3 * sum(labels.values())


def test_heldout_problems_are_labelled_contaminated():
    cfg = _cfg()
    held = task.heldout_problems([2], 5)
    assert all(make_trace(p.question, 0, cfg.traces).defect == "contaminated" for p in held)


def test_long_responses_are_cut_at_max_tokens():
    cfg = TraceConfig(defects=DefectRates())
    t = make_trace("(3+4)*5-2", 0, cfg, max_tokens=5)
    assert t.finish_reason == "length" and t.defect == "truncated"


def test_spell_out_rate_mixes_two_trace_styles():
    expr = "83-47+5"  # a two-digit subtrahend: the written-out style differs from the plain one
    plain = TraceConfig(self_check_rate=0.0, defects=DefectRates())
    spelled = TraceConfig(self_check_rate=0.0, spell_out_rate=1.0, defects=DefectRates())
    assert make_trace(expr, 0, plain).text == format_response("36+5;41", "\\boxed{41}")
    assert make_trace(expr, 0, spelled).text == format_response("83-40-7+5;43-7+5;36+5;41", "\\boxed{41}")
    half = TraceConfig(self_check_rate=0.0, spell_out_rate=0.5, defects=DefectRates())
    styles = [";43-7+5;" in make_trace(expr, seed, half).text for seed in range(400)]
    assert 0.4 < sum(styles) / len(styles) < 0.6  # drawn per request, deterministic for a seed
    assert styles == [";43-7+5;" in make_trace(expr, seed, half).text for seed in range(400)]


def test_http_api_with_the_openai_client(tmp_path):
    from openai import OpenAI

    cfg = _cfg()
    cfg.log_path = str(tmp_path / "teacher.jsonl")
    with TeacherServer(cfg) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [cfg.model]
        resp = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": "2+3*4"}],
                                              seed=0, max_tokens=256)
        assert "\\boxed{14}" in resp.choices[0].message.content
        raw = httpx.post(server.base_url + "/chat/completions",
                         json={"messages": [{"role": "user", "content": "2+3*4"}], "seed": 0, "n": 3}).json()
        assert len(raw["choices"]) == 3 and all("nrr_defect" in c for c in raw["choices"])
        assert raw["choices"][0]["message"]["content"] == resp.choices[0].message.content
        assert httpx.post(server.base_url + "/chat/completions", content=b"[1]").status_code == 400
        assert httpx.get(server.base_url + "/nothing").status_code == 404
    log = [json.loads(line) for line in Path(cfg.log_path).read_text().splitlines()]
    assert len(log) == 4 and all(e["defect"] for e in log)  # one line per returned choice


def test_assistant_message_moves_the_thinking_to_the_named_field():
    closed = format_response("2+3;5", "\\boxed{5}")
    assert assistant_message(closed, None) == {"role": "assistant", "content": closed}
    assert assistant_message(closed, "reasoning") == {"role": "assistant", "content": "\\boxed{5}", "reasoning": "2+3;5"}
    # an unclosed (or cut) think block is all reasoning and no answer, as a reasoning parser returns it
    assert assistant_message("<think>\n2+3;5\n\n\\boxed{5}", "reasoning_content") == {
        "role": "assistant", "content": None, "reasoning_content": "2+3;5\n\n\\boxed{5}"}
    assert assistant_message("<think>\n2+3;", "reasoning") == {"role": "assistant", "content": None, "reasoning": "2+3;"}
    refusal = "I can only solve arithmetic expressions with +, - and *."
    assert assistant_message(refusal, "reasoning") == {"role": "assistant", "content": refusal}


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_field_answers_like_a_reasoning_endpoint(field, tmp_path):
    from openai import OpenAI

    cfg = _cfg()
    cfg.traces.self_check_rate = 0.0
    cfg.traces.defects = DefectRates()
    body = {"messages": [{"role": "user", "content": "83-47+5"}], "seed": 0, "n": 2}
    replies, logs = {}, {}
    for name in (None, field):
        run = dataclasses.replace(cfg, reasoning_field=name, log_path=str(tmp_path / f"{name}.jsonl"))
        with TeacherServer(run) as server:
            replies[name] = httpx.post(server.base_url + "/chat/completions", json=body).json()
            if name:  # the OpenAI client hands the extra field through
                msg = OpenAI(base_url=server.base_url, api_key="unused").chat.completions.create(
                    model=cfg.model, messages=body["messages"], seed=0).choices[0].message
                assert msg.content == "\\boxed{41}" and getattr(msg, field) == "83-40-7+5;43-7+5;36+5;41"
        logs[name] = [{k: v for k, v in json.loads(line).items() if k != "time"}
                      for line in Path(run.log_path).read_text().splitlines()]
    inline, split = (replies[None]["choices"], replies[field]["choices"])
    assert [c["message"] for c in inline] == [{"role": "assistant", "content": format_response(
        "83-40-7+5;43-7+5;36+5;41", "\\boxed{41}")}] * 2
    assert [c["message"] for c in split] == [
        {"role": "assistant", "content": "\\boxed{41}", field: "83-40-7+5;43-7+5;36+5;41"}] * 2
    # the side channel and the log are the same whatever the message shape
    assert [c["nrr_defect"] for c in split] == [c["nrr_defect"] for c in inline] == ["none", "exact_duplicate"]
    assert logs[field][:2] == logs[None] and len(logs[None]) == 2  # (then the OpenAI client's request)
    assert load_config(TeacherServerConfig, TEACHER_YAML, [f"reasoning_field={field}"]).reasoning_field == field
    with pytest.raises(ConfigError, match="reasoning_field"):
        load_config(TeacherServerConfig, TEACHER_YAML, ["reasoning_field=thoughts"])


def test_injected_faults():
    cfg = TeacherServerConfig(faults=FaultConfig(rate_429=1.0, retry_after_s=2))
    with TeacherServer(cfg) as server:
        r = httpx.post(server.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "1+1"}]})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
    cfg = TeacherServerConfig(faults=FaultConfig(rate_500=1.0))
    with TeacherServer(cfg) as server:
        r = httpx.post(server.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "1+1"}]})
        assert r.status_code == 500
    cfg = TeacherServerConfig(faults=FaultConfig(rate_hang=1.0, hang_s=5))
    with TeacherServer(cfg) as server, pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/chat/completions", json={"messages": [{"role": "user", "content": "1+1"}]},
                   timeout=0.3)


def test_nrr_teacher_serve_cli():
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "teacher", "serve", "--config", str(TEACHER_YAML),
                             "port=0", "reasoning_field=reasoning"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, proc.stderr.read()
        url = line.strip().rsplit(" ", 1)[-1]
        assert httpx.get(url + "/models").json()["data"][0]["id"] == "nrr-embedded-teacher"
        msg = httpx.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": "2+3*4"}],
                                                          "seed": 0}).json()["choices"][0]["message"]
        assert msg["content"] == "\\boxed{14}" and msg["reasoning"].endswith(";14")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "responses by label" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
