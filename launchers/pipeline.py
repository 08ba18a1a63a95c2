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
    # [a, b, ...]: b - a, ... per level with the paired standard error, from the rows' per-sample files
    # (<benchmark>.jsonl beside each summary.json), and over `practised` levels together (what RL trained on)
    paired: list[str] = field(default_factory=list)
    practised: list[int] = field(default_factory=list)


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    run_dir: str = "runs/pipeline"
    executor: str = "local"
    executor_overrides: list[str] = field(default_factory=list)
    steps: list[StepConfig] = field(default_factory=list)
    summary: SummaryConfig | None = None
    # step name -> overrides appended to that step's own: the same pipeline at other budgets, e.g.
    # `nrr pipeline 'step_overrides={sft: [training.max_steps=20]}'`
    step_overrides: dict[str, list[str]] = field(default_factory=dict)


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
    unknown = sorted(set(cfg.step_overrides) - set(names))
    if unknown:
        raise ConfigError(f"pipeline: step_overrides names unknown steps {', '.join(unknown)}; steps: "
                          f"{', '.join(names)}")
    run_dir = run_path(profile, cfg.run_dir)
    dirs = {s.name: f"{run_dir}/{s.name}" for s in cfg.steps}
    tasks: dict[str, StageTask] = {}
    order: list[str] = []
    for i, step in enumerate(cfg.steps):
        where = f"steps[{i}] ({step.name})"
        spec = stage_spec(step.stage, step.launcher)
        upstream = list(step.after)
        step_overrides = list(step.overrides) + [str(o) for o in cfg.step_overrides.get(step.name, [])]
        texts = step_overrides + ([step.serve.command] if step.serve else [])
        for text in texts:
            upstream += sorted(references(text))
        for name in upstream:
            if name not in dirs:
                raise ConfigError(f"{where}: depends on unknown step '{name}'")
            if names.index(name) >= i:
                raise ConfigError(f"{where}: depends on '{name}', which must come earlier in 'steps'")
        overrides = [substitute(o, dirs, step.name, run_dir, where) for o in step_overrides]
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


def paired_gains(cfg: PipelineConfig, profile: Profile) -> list[dict]:
    """For summary.paired [a, b, ...]: each later row's gain over a (b - a, ...), overall, per level and over the
    practised levels, with paired standard errors; empty when not asked for or a row's per-sample file is missing."""
    import json
    from pathlib import Path

    from recipes.evaluation.metrics import paired_difference

    if cfg.summary is None or not cfg.summary.paired:
        return []
    if len(cfg.summary.paired) < 2:
        raise ConfigError(f"summary.paired: a baseline row and at least one other [a, b, ...], got {cfg.summary.paired}")
    files = {label: file for label, file, _ in summary_rows(cfg, profile)}
    parts = cfg.summary.key.split(".")
    if len(parts) < 3 or parts[0] != "benchmarks":
        raise ConfigError(f"summary.paired needs summary.key benchmarks.<name>.<metric>, got {cfg.summary.key}")
    records = {}
    for label in cfg.summary.paired:
        if label not in files:
            raise ConfigError(f"summary.paired: '{label}' is not a row of summary.rows ({', '.join(files)})")
        samples = Path(files[label]).parent / f"{parts[1]}.jsonl"
        if not samples.is_file():
            return []
        records[label] = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line]
    base, *others = cfg.summary.paired
    keep = {int(v) for v in cfg.summary.practised}
    gains = []
    for label in others:
        a, b = records[base], records[label]
        out = paired_difference(a, b)
        if keep:
            out["practised"] = paired_difference([r for r in a if r.get("level") in keep],
                                                 [r for r in b if r.get("level") in keep], group=None)["all"]
        out["a"], out["b"], out["practised_levels"] = base, label, sorted(keep)
        gains.append(out)
    return gains


def gain_cell(stats: dict | None) -> str:
    """'+6.8 ± 2.1' in percentage points; '*' when the gain is more than twice its standard error."""
    if not stats or not stats.get("problems"):
        return "-"
    beyond = abs(stats["diff"]) > 2 * stats["se"] and stats["diff"] != 0
    return f"{stats['diff'] * 100:+.1f} ± {stats['se'] * 100:.1f}{' *' if beyond else ''}"


RUN_INFO = "run_info.json"  # in run_dir: the commit, machine and each stage's time (`nrr pipeline` writes it)


def run_section(run_dir: str) -> list[str]:
    """Markdown lines naming what the numbers were measured on, and each stage's wall time."""
    import json
    from pathlib import Path

    from launchers.watch import clock
    from recipes.bench.machine import machine_line

    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return []
    info = json.loads(path.read_text(encoding="utf-8"))
    where = machine_line(info["machine"]) if info.get("machine") else "the cluster's nodes"
    lines = [f"Measured at commit `{info.get('commit', 'unknown')}` on {where}, started {info.get('started')}; "
             f"{clock(info.get('wall_s'))} in all.", "", "| stage | state | time |", "|---|---|---:|"]
    lines += [f"| {name} | {st.get('state')} | {clock(st.get('seconds'))} |"
              for name, st in info.get("stages", {}).items()]
    return lines + [""]


README_BEGIN, README_END = "<!-- nrr pipeline --readme: begin -->", "<!-- nrr pipeline --readme: end -->"


def splice_readme(readme: str, cfg: PipelineConfig, profile: Profile) -> None:
    """Replace what lies between README_BEGIN and README_END in `readme` with this run's `summary_markdown`
    (no file paths), so that the figures there are the run's own, never typed by hand."""
    from pathlib import Path

    text = Path(readme).read_text(encoding="utf-8")
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ConfigError(f"{readme}: needs one '{README_BEGIN}' line and, after it, one '{README_END}' line")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    block = "\n".join([README_BEGIN, *summary_markdown(cfg, profile, with_files=False), README_END])
    Path(readme).write_text(head + block + tail, encoding="utf-8")


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


def summary_markdown(cfg: PipelineConfig, profile: Profile, with_files: bool = True,
                     values: dict | None = None) -> list[str]:
    """What the run was measured on, its stage times, the summary table (a column per level when the evals
    report levels) and summary.paired's gains with their paired standard errors; from `values` (`summary_values`)
    when the caller has them already."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}" if v <= 1 else f"{v:g}"

    values = values or summary_values(cfg, profile)
    levels = {label: row["levels"] for label, row in values["rows"].items()}
    level_names = sorted({lvl for per in levels.values() for lvl in per}, key=lambda x: (len(x), x))
    lines = [*run_section(run_path(profile, cfg.run_dir)), f"`{cfg.summary.key}`, each row from its step's "
             f"summary.json.", "", "| model | all | " + "".join(f"L{lvl} | " for lvl in level_names)
             + ("from |" if with_files else ""), "|---|---:|" + "---:|" * len(level_names) + ("---|" if with_files else "")]
    for label, row in values["rows"].items():
        cells = "".join(f"{pct(levels[label].get(lvl))} | " for lvl in level_names)
        lines.append(f"| {label} | {pct(row['all'])} | {cells}" + (f"`{row['file']}` |" if with_files else ""))
    gains = list(values["gains"].values())
    for gain in gains:
        cells = "".join(f"{gain_cell(gain['by_level'].get(lvl))} | " for lvl in level_names)
        lines.append(f"| {gain['b']} − {gain['a']} (points) | {gain_cell(gain['all'])} | {cells}"
                     + (f"paired on the same {gain['all']['problems']} problems |" if with_files else ""))
    if gains:
        first = gains[0]
        lines += ["", f"{' / '.join(g['b'] for g in gains)} − {first['a']}: percentage points ± the paired standard "
                      f"error over the same {first['all']['problems']} problems; * marks a difference beyond two "
                      "standard errors."]
        if "practised" in first:
            levels_text = ", ".join(f"L{v}" for v in first["practised_levels"])
            lines += [f"On the levels RL practised ({levels_text}) together: "
                      + "; ".join(f"{g['b']} {gain_cell(g['practised'])}" if len(gains) > 1 else gain_cell(g["practised"])
                                  for g in gains) + "."]
    return [line.rstrip() for line in lines]


def write_pipeline_report(cfg: PipelineConfig, profile: Profile, path: str, values: dict | None = None) -> str:
    """The pipeline's report: `summary_markdown` and links to every step's own reports (and beside it, `summary_values`
    as JSON: report.md -> report.json; `values` when the caller has them). Returns the Markdown."""
    import json
    import os
    from pathlib import Path

    run_dir = run_path(profile, cfg.run_dir)
    values = values or summary_values(cfg, profile)  # once: the Markdown and report.json show the same numbers
    lines = [f"# {cfg.name}: {cfg.summary.title}", "", *summary_markdown(cfg, profile, values=values)]
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
    Path(path).with_suffix(".json").write_text(json.dumps(values, indent=1), encoding="utf-8")
    return text


def summary_values(cfg: PipelineConfig, profile: Profile) -> dict:
    """The report's numbers (`summary_markdown` prints them; `nrr regress` reads its goldens from report.json): each
    row's file, value overall and per level, and summary.paired's gains by row (`diff` and `se` overall, per level
    and over the practised levels)."""
    rows = {label: {"file": file, "all": value, "levels": level_values(file, cfg.summary.key)}
            for label, file, value in summary_rows(cfg, profile)}
    gains = {gain["b"]: gain for gain in paired_gains(cfg, profile)}
    return {"key": cfg.summary.key, "rows": rows, "gains": gains}
