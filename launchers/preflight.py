"""What a launch checks before anything is written or submitted (dry run or not).

A mistake found here costs seconds; the same mistake found by the job costs a queue wait and a node allocation.
For every stage of the launch:
- its arguments go through the stage's own argument parser (`nrr eval` without `run`, a misspelt flag);
- a config-driven stage loads its YAML plus overrides with the typed loader and runs the stage's own check, exactly
  as the job will (an unknown key names the key and the file and line, or the override);
- a training stage's layout must be what the executor profile starts: `parallel.nodes` = the profile's nodes and
  tp*pp*cp*dp = nodes x processes per node, and it must split the model (attention and KV heads by TP, layers by
  PP), read from the model's HF config.json without building anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable

from launchers.executors import StageTask
from launchers.profiles import K8sProfile, Profile, SlurmProfile, nproc_per_node, num_nodes, repo_file
from recipes.config import ConfigError, load_config, read_yaml, resolve_path
from recipes.stages import STAGES

# Stage -> (its typed config class, its check function), as the stage's own `cli` loads and checks it. Stages
# missing here (convert, task) take plain arguments: their parser is the whole check.
TYPED_STAGES: dict[str, tuple[str, str | None]] = {
    "sft": ("recipes.trainer:SFTConfig", "recipes.trainer:check_config"),
    "kd": ("recipes.kd:KDConfig", "recipes.kd:check_kd_config"),
    "grpo": ("recipes.grpo:GRPOConfig", "recipes.grpo:check_config"),
    "distill": ("recipes.grpo:GRPOConfig", "recipes.distill_cli:check_config"),
    "curate": ("curator_pipelines.config:CurateConfig", "curator_pipelines.pipeline:check_input"),
    "eval": ("recipes.evaluation.config:EvalConfig", None),  # `eval run` only; grade/compare take plain arguments
}


@dataclasses.dataclass
class Checked:
    """One stage after its checks: the typed config its job will load (None for a plain-argument stage)."""

    task: StageTask
    config: Any | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # what could not be checked here, and why


def _attr(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class _Parser(argparse.ArgumentParser):
    """The stage's own parser, raising instead of exiting (subparsers inherit the class)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None):
        raise ConfigError(f"{self.prog}: {(message or '').strip() or 'asked for help, not a run'}")


def parse_stage_args(nrr_args: list[str]) -> argparse.Namespace:
    """`nrr <stage> ...` parsed as `recipes.cli` parses it for the job."""
    stage = STAGES[nrr_args[0]]
    parser = _Parser(prog=f"nrr {stage.name}", description=stage.help)
    importlib.import_module(stage.module).add_arguments(parser)
    return parser.parse_args(nrr_args[1:])


def _where(task: StageTask) -> str:
    return f"stage '{task.name}'" + (f" ({task.origin})" if task.origin else "")


def check_tasks(tasks: list[StageTask], profile: Profile) -> dict[str, Checked]:
    """Every task checked; one ConfigError listing every problem found (nothing has been written yet)."""
    checked, errors = {}, []
    for task in tasks:
        try:
            checked[task.name] = check_task(task, profile)
        except ConfigError as err:
            errors.append(f"{_where(task)}: {err}")
    if errors:
        raise ConfigError("the launch was not submitted:\n  " + "\n  ".join(errors))
    return checked


def check_task(task: StageTask, profile: Profile) -> Checked:
    args = parse_stage_args(task.nrr_args)
    stage = task.spec.name
    if stage not in TYPED_STAGES or (stage == "eval" and args.command != "run"):
        return Checked(task)
    cls_spec, check_spec = TYPED_STAGES[stage]
    overrides = list(args.overrides)
    if stage == "grpo" and overrides[:1] == ["rejection-sample"]:  # as recipes.grpo.cli reads it
        overrides = overrides[1:] + ["mode=rejection_sample"]
    config = repo_file(profile, args.config) if args.config else None
    try:
        cfg = load_config(_attr(cls_spec), config, overrides)
    except ConfigError as err:
        raise ConfigError(_blame_override(str(err), overrides)) from None
    out = Checked(task, cfg)
    if check_spec:
        run_check(_attr(check_spec), cfg, profile, out.notes)
    if hasattr(cfg, "parallel"):
        check_layout(cfg, task, profile, config, overrides)
        out.notes += check_model_shape(cfg, profile)
    return out


def _blame_override(message: str, overrides: list[str]) -> str:
    """The loader names an unknown section by the YAML file even when an override brought it in: name the override."""
    for text in overrides:
        parts = text.split("=", 1)[0].strip().lstrip("+").split(".")
        for n in range(1, len(parts) + 1):
            if f"unknown key '{'.'.join(parts[:n])}'" in message:
                return f"{message} [from override '{text}']"
    return message


def runs_on_gpus(profile: Profile) -> bool:
    return isinstance(profile, (SlurmProfile, K8sProfile)) and bool(profile.gpus_per_node)


def run_check(check: Callable, cfg: Any, profile: Profile, notes: list[str]) -> None:
    """The stage's check. Context parallelism needs Transformer Engine with CUDA, which the job's image has and
    the launching machine usually does not: for a GPU profile that one requirement is left to the job."""
    parallel = getattr(cfg, "parallel", None)
    if parallel is not None and parallel.cp > 1 and runs_on_gpus(profile):
        notes.append(f"parallel.cp={parallel.cp}: Transformer Engine is checked by the job, in its image")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(parallel, cp=1))
    check(cfg)


def _key_source(config: Path | None, overrides: list[str], key: str) -> str:
    """Where `key` got its value: the last override setting it, else its line in the YAML, else the default."""
    for text in reversed(overrides):
        if text.split("=", 1)[0].strip().lstrip("+") == key:
            return f"override '{text}'"
    if config is not None:
        _, where = read_yaml(config)
        if key in where:
            return where[key]
    return "default"


def _distributed(cfg: Any) -> bool:
    """Whether the job runs the layout's ranks (GRPO's rejection sampling runs in one process whatever it says)."""
    return getattr(cfg, "mode", "train") == "train"


def check_layout(cfg: Any, task: StageTask, profile: Profile, config: Path | None, overrides: list[str]) -> None:
    from recipes.trainer import world_size

    if not _distributed(cfg):
        return
    p = cfg.parallel
    src = lambda key: _key_source(config, overrides, key)  # noqa: E731
    layout = f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {world_size(cfg)}"
    keys = ", ".join(f"parallel.{k} at {src(f'parallel.{k}')}" for k in ("tp", "pp", "cp", "dp"))
    if task.spec.launcher != "torchrun":
        # the stage re-launches itself on the one node the executor gives it
        if p.nodes != 1:
            raise ConfigError(f"parallel.nodes={p.nodes} ({src('parallel.nodes')}) but the {task.spec.launcher} "
                              "launcher runs the stage on one node; launch it with torchrun or set parallel.nodes=1")
        return
    nodes, per_node = num_nodes(profile), nproc_per_node(profile)
    kind = profile.kind
    node_key = "executor.num_nodes" if isinstance(profile, K8sProfile) else "executor.nodes"
    if p.nodes != nodes:
        raise ConfigError(f"parallel.nodes={p.nodes} ({src('parallel.nodes')}) but the {kind} profile starts "
                          f"{nodes} node(s) ({node_key}); make them equal")
    if world_size(cfg) != nodes * per_node:
        raise ConfigError(f"the layout needs {layout} ranks ({keys}) but the {kind} profile starts {nodes} node(s) "
                          f"x {per_node} process(es) = {nodes * per_node} ({node_key}, executor.nproc_per_node / "
                          "executor.gpus_per_node); change the layout or the profile so they are equal")


def _json_line(path: Path, key: str) -> str:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if f'"{key}"' in line:
            return f"{path}:{i}"
    return str(path)


def model_configs(cfg: Any, profile: Profile) -> tuple[list[tuple[str, Path]], list[str]]:
    """(what, HF config.json) for the models a training config builds, and notes on what is not readable here."""
    from recipes.trainer import architecture

    found, notes = [], []
    model = cfg.model
    try:
        found.append(("model", repo_file(profile, str(architecture(model)))))
    except ConfigError:
        # an upstream stage writes init_checkpoint: the architecture is model.hf_config's until then
        if model.hf_config:
            notes.append(f"model.init_checkpoint {model.init_checkpoint} is not readable here; the model shape "
                         f"is checked with model.hf_config")
            found.append(("model", repo_file(profile, str(resolve_path(model.hf_config)))))
    teacher = getattr(cfg, "teacher", None)
    if teacher is not None and teacher.hf_config:
        found.append(("teacher", repo_file(profile, str(resolve_path(teacher.hf_config)))))
    return found, notes


def check_model_shape(cfg: Any, profile: Profile) -> list[str]:
    """Attention and KV heads divisible by TP, layers by PP, read from the HF config.json (nothing is built)."""
    p = cfg.parallel
    configs, notes = model_configs(cfg, profile)
    for what, path in configs:
        if not path.is_file():
            notes.append(f"{what}: {path} is not readable here; heads/layers against tp/pp not checked")
            continue
        hf = json.loads(path.read_text(encoding="utf-8"))
        heads = int(hf["num_attention_heads"])
        checks = [("num_attention_heads", heads, "parallel.tp", p.tp),
                  ("num_key_value_heads", int(hf.get("num_key_value_heads") or heads), "parallel.tp", p.tp),
                  ("num_hidden_layers", int(hf["num_hidden_layers"]), "parallel.pp", p.pp)]
        for key, value, knob, size in checks:
            if value % size:
                raise ConfigError(f"{knob}={size} does not divide the {what}'s {key}={value} "
                                  f"({_json_line(path, key)}); pick a {knob} that divides {value}")
    return notes


def plan_header(cfg: Any) -> list[str]:
    """The per-GPU memory plan of a training config (`recipes.planner.plan_table`), as lines; [] when the planner
    is not there or the config is not a training stage's."""
    if cfg is None or not hasattr(cfg, "parallel"):
        return []
    try:
        from recipes.planner import plan_table
    except ImportError:
        return []
    model = cfg.model
    if model.init_checkpoint and not resolve_path(model.init_checkpoint).exists() and model.hf_config:
        # written by an upstream stage: plan with the architecture it is made from
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, init_checkpoint=None))
    return ["per-GPU memory plan (recipes.planner):", *plan_table(cfg).splitlines()]
