"""What each `nrr` stage needs from a launcher: its process launcher, default config and output key, read from the
one stage table (`recipes.stages`).

A stage's command is always `nrr <stage> --config X key=value ...`. Megatron stages run under
torchrun (one process per GPU, rendezvous across nodes); Curator builds its own Ray cluster (a
local one on a single node, a KubeRay/Slurm Ray cluster on a cluster); the rest are one process.
"""

from __future__ import annotations

import dataclasses

from recipes.config import ConfigError
from recipes.stages import STAGES, Stage

LAUNCHABLE = {name: stage for name, stage in STAGES.items() if stage.launcher}


def stage_spec(name: str, launcher: str | None = None) -> Stage:
    """Stage `name` of the stage table (`recipes.stages`); `launcher` (torchrun/ray/python) replaces its default."""
    if name not in LAUNCHABLE:
        raise ConfigError(f"unknown stage '{name}'; launchable stages: {', '.join(LAUNCHABLE)}")
    spec = LAUNCHABLE[name]
    if launcher is None:
        return spec
    if launcher not in ("torchrun", "ray", "python"):
        raise ConfigError(f"launcher must be torchrun, ray or python, got {launcher!r}")
    return dataclasses.replace(spec, launcher=launcher)


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
