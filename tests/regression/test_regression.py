"""Golden-metric comparison: tolerances, directions, and `nrr regress` on recorded runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launchers.regression import GOLDENS, Check, compare, load_goldens, observed_value
from recipes.cli import main


def test_tolerances_and_directions():
    assert compare(Check(metric="loss", golden=2.0, rtol=0.05), 2.09) == (True, "ok")
    assert compare(Check(metric="loss", golden=2.0, rtol=0.05), 2.11)[0] is False
    assert compare(Check(metric="loss", golden=2.0, rtol=0.05), 1.89)[0] is False  # both ways
    # atol wins when larger than rtol * golden
    assert compare(Check(metric="acc", golden=0.5, rtol=0.01, atol=0.02), 0.519)[0] is True
    # higher is better: only a drop beyond tolerance fails
    up = Check(metric="tok/s", golden=1000.0, rtol=0.1, direction="higher")
    assert compare(up, 5000.0) == (True, "improved by +4000")
    assert compare(up, 901.0)[0] is True and compare(up, 899.0)[0] is False
    down = Check(metric="loss", golden=1.0, atol=0.01, direction="lower")
    assert compare(down, 0.5)[0] is True and compare(down, 1.02)[0] is False
    assert compare(up, None) == (False, "not logged")
    assert compare(Check(metric="m"), 3.0) == (False, "no golden recorded (observed 3)")


def test_observed_value_at_step_and_last():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "acc": 0.1}, {"step": 3, "loss": 2.0}]
    assert observed_value(rows, "loss", 2) == 2.5
    assert observed_value(rows, "loss", None) == 2.0
    assert observed_value(rows, "acc", None) == 0.1
    assert observed_value(rows, "loss", 7) is None and observed_value(rows, "nope", None) is None


def test_repository_goldens_load():
    goldens = load_goldens(GOLDENS)
    ci = [name for name, cfg in goldens.configs.items() if cfg.ci]
    assert "tiny_cpu_sft" in ci and all(goldens.configs[n].checks for n in goldens.configs)
    assert goldens.configs["tiny_cpu_sft"].config == "nemo_configs/sft/tiny_cpu.yaml"
    root = GOLDENS.parents[2]
    missing = [c.config for c in goldens.configs.values() if not (root / c.config).is_file()]
    assert not missing, f"goldens name configs that do not exist: {missing}"


@pytest.fixture()
def suite(tmp_path):
    goldens = {"configs": {"tiny": {"stage": "sft", "ci": True, "checks": [
        {"metric": "loss", "step": 2, "golden": 2.5, "rtol": 0.01},
        {"metric": "tokens_per_s_per_gpu", "golden": 900.0, "rtol": 0.2, "direction": "higher"},
        {"metric": "accuracy", "golden": None, "atol": 0.02, "direction": "higher"}]}}}
    path = tmp_path / "goldens.yaml"
    path.write_text(yaml.safe_dump(goldens))
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    return path, run


def write_metrics(run: Path, loss_at_2: float) -> None:
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": loss_at_2, "tokens_per_s_per_gpu": 1000.0,
                                        "accuracy": 0.42}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_regress_cli_fails_when_numbers_move(suite, capsys):
    goldens, run = suite
    write_metrics(run, 2.51)
    args = ["regress", "--goldens", str(goldens), "--runs", str(run.parent), "--compare-only"]
    assert main(args) == 1  # accuracy has no golden yet
    table = (run.parent / "regression.md").read_text()
    assert "| tiny | loss | 2 | 2.5 | 2.51 | PASS |" in table
    assert "| tiny | accuracy | last | — | 0.42 | FAIL: no golden recorded (observed 0.42) |" in table
    assert main(args + ["--record"]) == 1
    assert main(args) == 0  # recorded: now everything passes
    assert yaml.safe_load(goldens.read_text())["configs"]["tiny"]["checks"][2]["golden"] == 0.42
    write_metrics(run, 2.6)  # a change that moves the loss
    assert main(args) == 1
    assert "| tiny | loss | 2 | 2.5 | 2.6 | FAIL: off by +0.1 (tolerance 0.025, both) |" in (
        run.parent / "regression.md").read_text()
    capsys.readouterr()


@pytest.mark.slow
def test_ci_goldens_hold_for_the_tiny_configs(tmp_path, capsys):
    """Runs every `ci: true` config through NeMo-Run locally and compares against the recorded goldens."""
    assert main(["regress", "--runs", str(tmp_path)]) == 0, (tmp_path / "regression.md").read_text()
    assert "FAIL" not in (tmp_path / "regression.md").read_text()
    capsys.readouterr()
