"""Preemption and resume bookkeeping every training stage shares (SFT, KD, GRPO).

SIGTERM / SIGUSR1 stop the loop at the next step boundary (every rank after the same step), which is saved before
the process exits with REQUEUE_EXIT_CODE (75); rerunning the command resumes there. Each checkpoint step carries
the config's fingerprint, which a resume must match (checkpoint.allow_config_change overrides), and JSONL logs
lose the rows of the steps a resume runs again. Checkpoints hold every rank's RNG streams; each rank resumes its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

from recipes import fingerprint
from recipes.config import ConfigError

# The exit code of a run stopped by SIGTERM / SIGUSR1 once its checkpoint is saved: sysexits' EX_TEMPFAIL ("try
# again later"). The same command then resumes from that step. Slurm requeues the job (launchers/executors.py:
# --requeue for preemption, the sbatch script's `scontrol requeue` for a non-zero exit before the time limit).
REQUEUE_EXIT_CODE = 75
PREEMPTED = "preempted.json"  # in output_dir: the step saved on a signal (rank 0), read by `launch`
FINGERPRINT = "config_fingerprint.json"  # in each checkpoint step folder: the config that computed it

# What a resume may change: where the run writes and how it logs, validates and checkpoints; the parallel layout
# (checkpoints reshard); threads and the rollout engine's memory settings; and the run's length (the LR schedule
# is restored from the checkpoint, so a longer run continues it). Everything else changes the computation.
RESUMABLE_CHANGES = ("output_dir", "parallel", "checkpoint", "logging", "validation", "eval", "export_hf", "mode",
                     "rejection", "training.threads", "training.max_steps", "training.epochs", "grpo.steps",
                     "grpo.max_minutes", "rollout.kv_cache_mb", "rollout.gpu_memory_utilization",
                     "rollout.refit_bucket_mb", "rollout.cpu_threads", "rollout.colocated_sleep",
                     "rollout.enforce_eager", "rollout.tensor_parallel_size")


class Preempted(Exception):
    """Raised out of a training loop once the checkpoint of `step` is saved after SIGTERM / SIGUSR1."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving step {step}")
        self.step, self.signum = step, signum


class PreemptionFlag:
    """SIGTERM / SIGUSR1 only set a flag (the handler may run in the middle of a collective); `requested()` at a
    step boundary all-reduces it, so every TP/PP/DP rank stops after the same step even when only some of them
    got the signal. Use as a context manager: the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, signal.SIG_IGN)
        _start_checkpoint_helper()  # inherits the ignored signals
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        self.signum = signum

    def requested(self) -> int:
        """The signal some rank received (0: none); a collective over the whole world."""
        import torch

        from recipes.megatron import runtime

        flag = torch.tensor([self.signum], dtype=torch.int64, device=runtime.device())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum


def _start_checkpoint_helper() -> None:
    """megatron's checkpoint writer reports through a multiprocessing Manager it spawns at the first save. A
    scheduler signals every process of the job: spawned while SIGTERM / SIGUSR1 are ignored, it survives them
    and the save they ask for can still run."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    getter = getattr(filesystem_async, "_get_write_results_queue", None)
    if getter is not None:
        getter()


def preempted_exit(run_dir: Path, step: int, signum: int) -> Preempted:
    """Rank 0 records the preemption for the launcher (torchrun does not hand on the ranks' exit code)."""
    from recipes.megatron import runtime

    if runtime.rank() == 0:
        _atomic_write(run_dir / PREEMPTED, json.dumps({"step": step, "signal": signal.Signals(signum).name,
                                                       "exit_code": REQUEUE_EXIT_CODE}))
    runtime.print_rank0(f"[preempted] {signal.Signals(signum).name}: checkpoint of step {step} saved; exiting with "
                        f"{REQUEUE_EXIT_CODE} (rerun the command to resume)")
    return Preempted(step, signum)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSONL rows of steps 1..`step` (what the checkpoint of `step` holds): the steps after it run again
    and append their rows anew (a run from scratch, step 0, logs everything again: its step-0 rows too).
    Rewritten whole and swapped in, so a kill leaves the old file or the new one."""
    if not path.is_file():
        return
    def step_of(line: str) -> int:
        try:
            return int(json.loads(line).get("step", 0))
        except ValueError:  # a row cut short by a kill
            return -1

    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if 0 < step_of(line) <= step]
    if len(kept) != len(lines):
        _atomic_write(path, "".join(line + "\n" for line in kept))


def rng_states() -> dict:
    """Every rank's RNG streams for a checkpoint's `extra` (a collective: rank 0 writes `extra`). The streams differ
    between ranks (megatron's tensor-parallel stream is seeded per TP rank), so each rank resumes its own."""
    import torch

    from recipes.megatron import runtime

    mine = runtime.rng_state()
    states = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, mine)
    return {"rng": states[0], "rng_per_rank": states, "rng_layout": _layout()}


def restore_rng(extra: dict) -> None:
    """Each rank takes back the streams it saved. Under another layout rank i is not the rank i that saved them:
    every rank keeps the streams this layout seeded (checkpoints saved before per-rank streams give rank 0's)."""
    from recipes.megatron import runtime

    per_rank = extra.get("rng_per_rank")
    if per_rank is None:
        runtime.set_rng_state(extra["rng"])
    elif list(extra.get("rng_layout", [])) == _layout():
        runtime.set_rng_state(per_rank[runtime.rank()])
    else:
        runtime.print_rank0(f"[resume] RNG streams saved at (world, tp, pp) = {list(extra['rng_layout'])}, resumed "
                            f"at {_layout()}: each rank keeps the streams seeded for this layout")


def _layout() -> list[int]:
    import torch
    from megatron.core import parallel_state as ps

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return [world, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()]


def config_fingerprint(cfg) -> dict:
    """The config's values that change the computation, flattened to dotted keys (see RESUMABLE_CHANGES)."""
    values = fingerprint.flatten(dataclasses.asdict(cfg), skip=RESUMABLE_CHANGES)
    return {"sha256": fingerprint.digest(values), "config": values}


def save_training_checkpoint(cfg, ckpt_dir: Path, step: int, chunks, optimizer, scheduler, extra: dict,
                             tokenizer_dir) -> None:
    """A checkpoint (collective), then its config fingerprint beside it (rank 0)."""
    from recipes.megatron import checkpointing, runtime

    folder = checkpointing.save_checkpoint(ckpt_dir, step, chunks, optimizer, scheduler, extra=extra,
                                           keep_last=cfg.checkpoint.keep_last, tokenizer_dir=tokenizer_dir)
    if runtime.rank() == 0:
        _atomic_write(folder / FINGERPRINT, json.dumps({"step": step, **config_fingerprint(cfg)}, indent=1))


def check_fingerprint(cfg, ckpt_dir: Path, step: int) -> None:
    """Resuming under a config that computes differently is an error naming each changed key (old -> new), unless
    checkpoint.allow_config_change=true. A step saved without a fingerprint (older runs) is not checked."""
    from recipes.megatron import checkpointing, runtime

    path = checkpointing.step_dir(ckpt_dir, step) / FINGERPRINT
    if not path.is_file():
        runtime.print_rank0(f"[resume] {path} is missing: the config is not compared with the checkpoint's")
        return
    saved, now = json.loads(path.read_text())["config"], config_fingerprint(cfg)["config"]
    # a key the saving version did not have yet (a newer config section) counts as unchanged at its default
    defaults = config_fingerprint(type(cfg)())["config"]
    now = {k: v for k, v in now.items() if k in saved or v != defaults.get(k, fingerprint.UNSET)}
    changed = fingerprint.changes(saved, now)
    if not changed:
        return
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(f"{path}: step {step} was trained under another config: " + "; ".join(changed)
                          + ". Resume with the checkpoint's values, or set checkpoint.allow_config_change=true to "
                          "continue under the new ones (or checkpoint.resume=false / a new output_dir)")
    runtime.print_rank0(f"[resume] checkpoint.allow_config_change: continuing step {step} under changed config: "
                        + "; ".join(changed))
