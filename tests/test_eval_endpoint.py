"""Evaluation through the endpoint backend against the embedded teacher's real HTTP server (/v1/completions): the
key variable, a refused key, and the failure budget with its counts by error class."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.config import ConfigError
from recipes.evaluation import run_eval
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig
from recipes.evaluation.runner import GenerationBudgetError
from recipes.generation.openai_endpoint import EndpointAuthError
from recipes.teacher.server import FaultConfig, TeacherServer, TeacherServerConfig, fault_counts
from recipes.tokenizer import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out: Path, base_url: str, **generation) -> EvalConfig:
    gen = GenerationConfig(backend="openai", base_url=base_url, tokenizer=str(EMBEDDED_MODEL), max_tokens=128,
                           max_concurrency=4, request_timeout=10.0, **generation)
    return EvalConfig(model="nrr-embedded-teacher", output_dir=str(out), report=False, progress=False,
                      benchmarks=[BenchmarkConfig(name="embedded", levels=[1], n_per_level=8)], generation=gen)


def test_a_key_variable_that_is_not_set_is_an_error_naming_it_and_null_means_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("NRR_TEST_EVAL_KEY", raising=False)
    log = tmp_path / "log.jsonl"
    with TeacherServer(TeacherServerConfig(log_path=str(log))) as server:
        with pytest.raises(ConfigError, match="generation.api_key_env names the env var 'NRR_TEST_EVAL_KEY', "
                                              "which is not set.*api_key_env=null"):
            run_eval(_cfg(tmp_path / "missing", server.base_url, api_key_env="NRR_TEST_EVAL_KEY"))
        assert not (tmp_path / "missing" / "summary.json").exists()  # refused before anything ran
        summary = run_eval(_cfg(tmp_path / "local", server.base_url, api_key_env=None))
        _samples_are_reused_only_under_the_settings_that_made_them(
            _cfg(tmp_path / "local", server.base_url, api_key_env=None), log)  # the same server: no second start
    bench = summary["benchmarks"]["embedded"]
    assert summary["status"] == "ok" and bench["problems"] == 8 and bench["pass@1"] > 0.5
    assert "generation_failures" not in bench
    # the command line: the same error, exit code 2 (a config error)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NRR_TEST_EVAL_KEY", None)
    r = subprocess.run([sys.executable, "-m", "recipes.cli", "eval", "run", "--config", "nemo_configs/eval/endpoint.yaml",
                        "generation.api_key_env=NRR_TEST_EVAL_KEY", f"output_dir={tmp_path / 'cli'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'NRR_TEST_EVAL_KEY', which is not set" in r.stderr, r.stderr[-2000:]


def _samples_are_reused_only_under_the_settings_that_made_them(cfg: EvalConfig, log: Path) -> None:
    """A rerun reuses <benchmark>.jsonl; under another sampling setting or prompt it is a ConfigError naming each
    key (old -> new); generation.allow_config_change=true sets the samples aside and asks again. `cfg` has run once
    against the server writing `log`."""
    import dataclasses

    from recipes.evaluation.config import PromptConfig

    out = Path(cfg.output_dir)
    before = asked = len(log.read_text().splitlines())
    first = json.loads((out / "summary.json").read_text())["benchmarks"]["embedded"]
    assert run_eval(cfg)["benchmarks"]["embedded"] == first  # unchanged: every sample reused
    assert len(log.read_text().splitlines()) == asked
    hotter = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, temperature=0.5),
                                 prompt=PromptConfig(user="Q: {problem}"))
    with pytest.raises(ConfigError) as err:
        run_eval(hotter)
    assert "generation.temperature: 0.0 -> 0.5" in str(err.value)
    assert "prompt.user: " in str(err.value) and "-> 'Q: {problem}'" in str(err.value)
    assert "generation.allow_config_change=true" in str(err.value) and len(log.read_text().splitlines()) == asked
    run_eval(dataclasses.replace(hotter, generation=dataclasses.replace(hotter.generation, allow_config_change=True)))
    asked = len(log.read_text().splitlines())
    assert asked == 2 * before  # every problem asked again
    [aside] = out.glob("embedded.jsonl.stale-*")  # the earlier samples, kept
    ids = [json.loads(line)["id"] for line in aside.read_text().splitlines()]
    assert len(ids) == first["problems"] and ids == \
        [json.loads(line)["id"] for line in (out / "embedded.jsonl").read_text().splitlines()]
    run_eval(hotter)
    assert len(log.read_text().splitlines()) == asked


def test_a_refused_key_stops_the_run_naming_endpoint_and_variable_never_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("NRR_TEST_EVAL_KEY", "sk-eval-wrong-5d1e")
    monkeypatch.setenv("NRR_TEST_EVAL_SERVER_KEY", "sk-eval-right-88c2")
    log = tmp_path / "log.jsonl"
    with TeacherServer(TeacherServerConfig(auth_key_env="NRR_TEST_EVAL_SERVER_KEY", log_path=str(log))) as server:
        with pytest.raises(EndpointAuthError) as err:
            run_eval(_cfg(tmp_path / "out", server.base_url, api_key_env="NRR_TEST_EVAL_KEY"))
    message = str(err.value)
    assert f"the endpoint {server.base_url} refused the request with HTTP 401" in message
    assert "$NRR_TEST_EVAL_KEY" in message and "sk-eval" not in message
    assert 1 <= fault_counts(log)["401"] <= 4  # the requests in flight (max_concurrency), not all 8
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert "sk-eval" not in f.read_text(errors="replace")


def test_failures_above_the_budget_fail_with_counts_by_class_below_it_are_reported(tmp_path):
    """Every request answered with cut-off JSON: each problem fails as malformed_json after its retries (3
    attempts each). Above the 10 % budget the run fails (summary.json says why); with a budget of 1 it completes
    and summary.json counts them."""
    for budget, run in ((0.1, "above"), (1.0, "below")):
        log = tmp_path / f"{run}.jsonl"
        faults = FaultConfig(rate_malformed_json=1.0)
        with TeacherServer(TeacherServerConfig(faults=faults, log_path=str(log))) as server:
            cfg = _cfg(tmp_path / run, server.base_url, api_key_env=None, max_failed_fraction=budget)
            if run == "above":
                with pytest.raises(GenerationBudgetError,
                                   match=r"no completion for 8 of 8 problems \(100.0% > generation.max_failed_"
                                         r"fraction 10.0%\): malformed_json: 8"):
                    run_eval(cfg)
                summary = json.loads((tmp_path / run / "summary.json").read_text())
                assert summary["status"] == "failed" and "malformed_json: 8" in summary["error"]
            else:
                summary = run_eval(cfg)
                assert summary["status"] == "ok"
        failures = summary["benchmarks"]["embedded"]["generation_failures"]
        assert failures["by_class"] == {"malformed_json": 8} and failures["failed"] == 8
        assert fault_counts(log)["malformed_json"] == 8 * 3  # retried: 2 retries after the first attempt
        assert (tmp_path / run / "embedded.jsonl").read_text() == ""  # nothing written: the next run asks again
