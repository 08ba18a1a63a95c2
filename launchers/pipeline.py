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


@dataclass
class SummaryConfig:
    """The closing table: one row per label, a number read from a JSON file each step wrote."""

    title: str = "held-out accuracy"
    rows: dict[str, str] = field(default_factory=dict)  # label -> JSON file (templates allowed)
    key: str = "accuracy"  # dotted key inside each JSON file
    report: str | None = None  # where the full report is (printed as a pointer)


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    run_dir: str = "runs/pipeline"
    executor: str = "local"
    executor_overrides: list[str] = field(default_factory=list)
    steps: list[StepConfig] = field(default_factory=list)
    summary: SummaryConfig | None = None


def _substitute(text: str, dirs: dict[str, str], own: str | None, run_dir: str, where: str) -> str:
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
        overrides = [_substitute(o, dirs, step.name, run_dir, where) for o in step.overrides]
        config = step.config or spec.default_config
        tasks[step.name] = StageTask(
            name=step.name,
            spec=spec,
            nrr_args=stage_args(step.stage, code_path(profile, config) if config else None, overrides),
            stage_dir=dirs[step.name],
            requires=[dirs[n] for n in dict.fromkeys(upstream)],
            serve_cmd=_substitute(step.serve.command, dirs, step.name, run_dir, where) if step.serve else None,
            serve_port=step.serve.port if step.serve else 8000,
            serve_ready_path=step.serve.ready_path if step.serve else "/health",
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
        path = _substitute(template, dirs, None, run_dir, f"summary.rows.{label}")
        value = None
        if Path(path).exists():
            node = json.loads(Path(path).read_text(encoding="utf-8"))
            for part in cfg.summary.key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            value = float(node) if isinstance(node, (int, float)) else None
        rows.append((label, path, value))
    return rows
