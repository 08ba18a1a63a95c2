"""What each `nrr` stage needs from a launcher: its process launcher and default config.

A stage's command is always `nrr <stage> --config X key=value ...`. Megatron stages run under
torchrun (one process per GPU, rendezvous across nodes); Curator builds its own Ray cluster (a
local one on a single node, a KubeRay/Slurm Ray cluster on a cluster); the rest are one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from recipes.config import ConfigError

LauncherKind = Literal["torchrun", "ray", "python"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    launcher: LauncherKind
    default_config: str | None
    output_key: str | None = None  # the config key that names the stage's output folder


STAGE_SPECS: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("curate", "ray", "nemo_configs/curate/embedded.yaml", "output.dir"),
        StageSpec("sft", "torchrun", "nemo_configs/sft/tiny_cpu.yaml", "run_dir"),
        StageSpec("kd", "torchrun", "nemo_configs/kd/tiny_cpu.yaml", "run_dir"),
        StageSpec("grpo", "torchrun", "nemo_configs/grpo/tiny_cpu.yaml", "run_dir"),
        StageSpec("eval", "python", "nemo_configs/eval/embedded.yaml", "output_dir"),
        StageSpec("convert", "python", None),
        StageSpec("task", "python", None),
    ]
}


def stage_spec(name: str, launcher: str | None = None) -> StageSpec:
    """The spec of stage `name`; `launcher` (torchrun/ray/python) replaces its default."""
    if name not in STAGE_SPECS:
        raise ConfigError(f"unknown stage '{name}'; launchable stages: {', '.join(STAGE_SPECS)}")
    spec = STAGE_SPECS[name]
    if launcher is None:
        return spec
    if launcher not in ("torchrun", "ray", "python"):
        raise ConfigError(f"launcher must be torchrun, ray or python, got {launcher!r}")
    return StageSpec(spec.name, launcher, spec.default_config, spec.output_key)  # type: ignore[arg-type]


def stage_args(stage: str, config: str | None, overrides: list[str]) -> list[str]:
    """Arguments after `nrr`: the stage, its config file and its overrides."""
    args = [stage]
    overrides = list(overrides)
    # A stage with subcommands (`eval run`, `convert to-hf`) takes its subcommand before --config.
    if overrides and not overrides[0].startswith("-") and "=" not in overrides[0]:
        args.append(overrides.pop(0))
    if config:
        args += ["--config", config]
    return args + overrides
