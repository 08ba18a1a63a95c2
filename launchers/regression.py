"""Regression suite: golden metrics per named config, with tolerances, and the comparison.

`tests/regression/goldens.yaml` names configs (a stage, its YAML, overrides) and their checks: a
metric at a fixed step (or the last value), the golden value, a relative and/or absolute tolerance
and a direction (`both`: any drift fails; `higher`/`lower`: only a move the wrong way fails, for
throughput and accuracy). Each config's run writes `metrics.jsonl` (recipes.metrics) in its output
dir; `evaluate` turns those rows into a pass/fail table. A config with `stage: pipeline` runs a whole
pipeline YAML (its run_dir is the config's output dir), and its checks read a JSON file there
(`file: report.json`, the pipeline's summary) at a dotted `metric` path such as `rows.GRPO.levels.4`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recipes.config import load_config, required

GOLDENS = Path(__file__).resolve().parents[1] / "tests" / "regression" / "goldens.yaml"


@dataclass
class Check:
    metric: str = required()
    golden: float | None = None  # None: not recorded yet (the check reports the value to record)
    step: int | None = None  # None: the last logged value
    rtol: float = 0.0
    atol: float = 0.0
    direction: Literal["both", "higher", "lower"] = "both"
    file: str | None = None  # a JSON file in the run's output dir, `metric` a dotted path into it; None: metrics.jsonl


@dataclass
class RegressionConfig:
    stage: str = required()  # a stage of `nrr`, or "pipeline": `config` is a pipeline YAML run as a whole
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    ci: bool = False  # cheap enough (tiny, CPU) to run in CI
    checks: list[Check] = field(default_factory=list)


@dataclass
class Goldens:
    configs: dict[str, RegressionConfig] = field(default_factory=dict)


def load_goldens(path: str | Path = GOLDENS, overrides: list[str] | None = None) -> Goldens:
    goldens = load_config(Goldens, path, overrides)
    # dict values are left as mappings by the config loader: build each section with its file context
    goldens.configs = {name: load_config(RegressionConfig, None, _flatten(entry)) if isinstance(entry, dict)
                       else entry for name, entry in goldens.configs.items()}
    return goldens


def _flatten(entry: dict) -> list[str]:
    import json

    return [f"{key}={json.dumps(value)}" for key, value in entry.items()]


def observed_value(rows: list[dict], metric: str, step: int | None) -> float | None:
    """The metric at `step` (or its last logged value); None if it was never logged there."""
    values = [(row.get("step"), row[metric]) for row in rows if isinstance(row.get(metric), (int, float))]
    if not values:
        return None
    if step is None:
        return float(values[-1][1])
    at = [v for s, v in values if s == step]
    return float(at[-1]) if at else None


@dataclass
class Outcome:
    config: str
    metric: str
    step: int | None
    golden: float | None
    observed: float | None
    passed: bool
    reason: str


def compare(check: Check, observed: float | None) -> tuple[bool, str]:
    if observed is None or (isinstance(observed, float) and math.isnan(observed)):
        return False, "not logged"
    if check.golden is None:
        return False, f"no golden recorded (observed {observed:.6g})"
    tol = max(check.atol, check.rtol * abs(check.golden))
    delta = observed - check.golden
    if check.direction == "higher" and delta >= -tol:
        return True, "ok" if delta <= tol else f"improved by {delta:+.4g}"
    if check.direction == "lower" and delta <= tol:
        return True, "ok" if delta >= -tol else f"improved by {delta:+.4g}"
    if check.direction == "both" and abs(delta) <= tol:
        return True, "ok"
    return False, f"off by {delta:+.4g} (tolerance {tol:.4g}, {check.direction})"


def json_value(path: str | Path, dotted: str) -> float | None:
    """The number at the `dotted` keys in the JSON file at `path`; None if absent."""
    import json

    path = Path(path)
    if not path.is_file():
        return None
    node = json.loads(path.read_text(encoding="utf-8"))
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def evaluate(name: str, cfg: RegressionConfig, rows: list[dict], run_dir: str | Path | None = None) -> list[Outcome]:
    """Each check against `rows` (the run's metrics.jsonl), or for a check with `file`, that file in `run_dir`."""
    outcomes = []
    for check in cfg.checks:
        if check.file:
            value = json_value(Path(run_dir) / check.file, check.metric) if run_dir is not None else None
        else:
            value = observed_value(rows, check.metric, check.step)
        passed, reason = compare(check, value)
        outcomes.append(Outcome(name, check.metric, check.step, check.golden, value, passed, reason))
    return outcomes


def table_markdown(outcomes: list[Outcome]) -> str:
    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.6g}"

    lines = ["| config | metric | step | golden | observed | result |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        step = "last" if o.step is None else str(o.step)
        result = "PASS" if o.passed else f"FAIL: {o.reason}"
        lines.append(f"| {o.config} | {o.metric} | {step} | {fmt(o.golden)} | {fmt(o.observed)} | {result} |")
    return "\n".join(lines) + "\n"


def record(path: str | Path, outcomes: list[Outcome]) -> int:
    """Fill goldens that are still null with the observed values; return how many were written."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    written = 0
    for o in outcomes:
        if o.golden is not None or o.observed is None:
            continue
        for check in data["configs"][o.config]["checks"]:
            if check["metric"] == o.metric and check.get("step") == o.step and check.get("golden") is None:
                check["golden"] = round(o.observed, 6)
                written += 1
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return written
