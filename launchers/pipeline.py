"""The pipeline config: stages in order, each stage's outputs wired to the next one's inputs.

    name: embedded
    run_dir: runs/embedded            # every step writes under <run_dir>/<step name>
    executor: local
    steps:
      - name: sft
        stage: sft
        config: nemo_configs/sft/tiny_cpu.yaml
        overrides: ["data.path=${curate.dir}/corpus.jsonl", "output_dir=${dir}"]

In `overrides` (and `serve.command`): `${dir}` is the step's own output dir, `${run_dir}` the
pipeline's, `${<step>.dir}` another step's (which also makes this step depend on it), and
`${endpoint}` the URL of the server the step starts (`serve`). `after` adds explicit dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from launchers.executors import StageTask
from launchers.profiles import Profile, code_path, run_path
from launchers.stages import stage_args, stage_spec
from recipes.config import ConfigError, required

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(\.dir)?\}")


@dataclass
class ServeConfig:
    """A server started next to the stage (e.g. vLLM's OpenAI endpoint for a teacher)."""

    command: str = required()  # `{port}` is replaced by `port`
    port: int = 8000
    ready_path: str = "/health"


@dataclass
class StepConfig:
    name: str = required()
    stage: str = required()
    config: str | None = None  # the stage's YAML (repository-relative); None: the stage default
    overrides: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    launcher: str | None = None  # torchrun | ray | python; None: the stage's own
    serve: ServeConfig | None = None
    env: dict[str, str] = field(default_factory=dict)  # this step's variables, over the executor profile's


@dataclass
class SummaryConfig:
    """The closing table: one row per label, a number read from a JSON file each step wrote."""

    title: str = "held-out accuracy"
    rows: dict[str, str] = field(default_factory=dict)  # label -> JSON file (templates allowed)
    key: str = "accuracy"  # dotted key inside each JSON file
    report: str | None = None  # a Markdown report: the table by level, and each step's own reports


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    run_dir: str = "runs/pipeline"
    executor: str = "local"
    executor_overrides: list[str] = field(default_factory=list)
    steps: list[StepConfig] = field(default_factory=list)
    summary: SummaryConfig | None = None


def substitute(text: str, dirs: dict[str, str], own: str | None, run_dir: str, where: str) -> str:
    def repl(m: re.Match) -> str:
        name, dot_dir = m.group(1), m.group(2)
        if name == "endpoint" and not dot_dir:
            return m.group(0)  # filled in by launchers.entry once the server answers
        if name == "run_dir" and not dot_dir:
            return run_dir
        if name == "dir" and not dot_dir:
            if own is None:
                raise ConfigError(f"{where}: '${{dir}}' has no meaning here; use '${{<step>.dir}}'")
            return dirs[own]
        if dot_dir and name in dirs:
            return dirs[name]
        raise ConfigError(f"{where}: unknown reference '{m.group(0)}'; steps: {', '.join(dirs)}")

    return _REF.sub(repl, text)


def references(text: str) -> set[str]:
    return {m.group(1) for m in _REF.finditer(text) if m.group(2)}


def plan(cfg: PipelineConfig, profile: Profile, only: list[str] | None = None) -> list[StageTask]:
    """Steps -> StageTasks with resolved paths and dependencies, in a valid order."""
    if not cfg.steps:
        raise ConfigError("pipeline: 'steps' is empty")
    names = [s.name for s in cfg.steps]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"pipeline: step names must be unique, repeated: {', '.join(sorted(duplicates))}")
    run_dir = run_path(profile, cfg.run_dir)
    dirs = {s.name: f"{run_dir}/{s.name}" for s in cfg.steps}
    tasks: dict[str, StageTask] = {}
    order: list[str] = []
    for i, step in enumerate(cfg.steps):
        where = f"steps[{i}] ({step.name})"
        spec = stage_spec(step.stage, step.launcher)
        upstream = list(step.after)
        texts = list(step.overrides) + ([step.serve.command] if step.serve else [])
        for text in texts:
            upstream += sorted(references(text))
        for name in upstream:
            if name not in dirs:
                raise ConfigError(f"{where}: depends on unknown step '{name}'")
            if names.index(name) >= i:
                raise ConfigError(f"{where}: depends on '{name}', which must come earlier in 'steps'")
        overrides = [substitute(o, dirs, step.name, run_dir, where) for o in step.overrides]
        config = step.config or spec.default_config
        tasks[step.name] = StageTask(
            name=step.name,
            spec=spec,
            nrr_args=stage_args(step.stage, code_path(profile, config) if config else None, overrides),
            stage_dir=dirs[step.name],
            requires=[dirs[n] for n in dict.fromkeys(upstream)],
            serve_cmd=substitute(step.serve.command, dirs, step.name, run_dir, where) if step.serve else None,
            serve_port=step.serve.port if step.serve else 8000,
            serve_ready_path=step.serve.ready_path if step.serve else "/health",
            env={k: str(v) for k, v in step.env.items()},
        )
        order.append(step.name)
    if only:
        unknown = [n for n in only if n not in tasks]
        if unknown:
            raise ConfigError(f"--only: unknown steps {', '.join(unknown)}; steps: {', '.join(order)}")
        keep = set(only)
        # Upstream outputs of a partial run come from an earlier run: their markers must exist.
        return [tasks[n] for n in order if n in keep]
    return [tasks[n] for n in order]


def summary_rows(cfg: PipelineConfig, profile: Profile) -> list[tuple[str, str, float | None]]:
    """(label, file, value) for the summary table; value None when the file or key is missing."""
    import json
    from pathlib import Path

    if cfg.summary is None:
        return []
    run_dir = run_path(profile, cfg.run_dir)
    dirs = {s.name: f"{run_dir}/{s.name}" for s in cfg.steps}
    rows = []
    for label, template in cfg.summary.rows.items():
        path = substitute(template, dirs, None, run_dir, f"summary.rows.{label}")
        value = None
        if Path(path).exists():
            node = json.loads(Path(path).read_text(encoding="utf-8"))
            for part in cfg.summary.key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            value = float(node) if isinstance(node, (int, float)) else None
        rows.append((label, path, value))
    return rows


# What a step leaves for people to look at, linked from the pipeline's report when present.
_STEP_REPORTS = ("report.md", "report.html", "report/reward_curve.png", "length_hist.png", "pass_rate_hist.png")


def level_values(path: str, key: str) -> dict[str, float]:
    """Per-level values next to the summary key (`<parent>.by_level.<level>.<leaf>`), if the file has them."""
    import json
    from pathlib import Path

    if not Path(path).exists():
        return {}
    *parents, leaf = key.split(".")
    node = json.loads(Path(path).read_text(encoding="utf-8"))
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    by_level = node.get("by_level") if isinstance(node, dict) else None
    if not isinstance(by_level, dict):
        return {}
    return {lvl: float(v[leaf]) for lvl, v in by_level.items() if isinstance(v, dict) and isinstance(v.get(leaf), (int, float))}


def write_pipeline_report(cfg: PipelineConfig, profile: Profile, path: str) -> str:
    """The pipeline's report: the summary table (with a column per level when the evals report levels) and
    links to every step's own reports. Returns the Markdown it wrote."""
    import os
    from pathlib import Path

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}" if v <= 1 else f"{v:g}"

    run_dir = run_path(profile, cfg.run_dir)
    rows = summary_rows(cfg, profile)
    levels = {label: level_values(file, cfg.summary.key) for label, file, _ in rows}
    level_names = sorted({lvl for per in levels.values() for lvl in per}, key=lambda x: (len(x), x))
    lines = [f"# {cfg.name}: {cfg.summary.title}", "", f"`{cfg.summary.key}` from each row's file.", "",
             "| model | all | " + "".join(f"L{lvl} | " for lvl in level_names) + "from |",
             "|---|---:|" + "---:|" * len(level_names) + "---|"]
    for label, file, value in rows:
        cells = "".join(f"{pct(levels[label].get(lvl))} | " for lvl in level_names)
        lines.append(f"| {label} | {pct(value)} | {cells}`{file}` |")
    lines += ["", "## Step reports", ""]
    for step in cfg.steps:
        found = [Path(run_dir) / step.name / name for name in _STEP_REPORTS]
        found = [os.path.relpath(f, Path(path).parent) for f in found if f.exists()]
        if found:  # pictures inline: a curve is read faster than a table
            links = ", ".join(f"![{f}]({f})" if f.endswith(".png") else f"[{f}]({f})" for f in found)
            lines.append(f"- **{step.name}** ({step.stage}): {links}")
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return text
