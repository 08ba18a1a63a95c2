"""Training checkpoints with megatron-core `dist_checkpointing` (resharding across TP/PP layouts).

Offers:
- `save_checkpoint(ckpt_dir, step, model_chunks, optimizer=None, scheduler=None, extra=None, keep_last=None)`
- `load_checkpoint(ckpt_dir, model_chunks, optimizer=None, scheduler=None, step=None) -> (step, extra) | None`
- `latest_step(ckpt_dir) -> int | None`, `step_dir(ckpt_dir, step)`, `read_hf_config(ckpt_dir)`.

Layout of `ckpt_dir`:
    hf_config.json            the model's HF config: a checkpoint is self-describing
    tokenizer/                the model's HF tokenizer files (the embedded students' unless another is given)
    iter_0000010/             one dist_checkpointing checkpoint: model (+ optimizer) shards, common.pt,
                              trainer_state.pt (step, scheduler state, `extra`) written by rank 0
    latest                    text file with the newest complete step

A step is saved into `iter_XXXXXXX.tmp`, renamed to `iter_XXXXXXX` once every rank has finished writing, and
only then is `latest` replaced (write + fsync + os.replace). A process killed mid-save leaves at most a `.tmp`
folder that resume ignores and the next save removes. `keep_last=K` deletes all but the newest K steps.

Any TP/PP layout can load any other's checkpoint (megatron's sharded keys are global). `extra` must be picklable
and is taken from rank 0 (data position, RNG states of rank 0, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from recipes.megatron import providers
from recipes.megatron.runtime import barrier

_ITER = re.compile(r"^iter_(\d{7,})$")
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"


def step_dir(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"iter_{int(step):07d}"


def latest_step(ckpt_dir) -> int | None:
    """The newest complete step (from the `latest` marker), or None when the folder holds no checkpoint."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected a step number, found {text!r}")
    step = int(text)
    if not step_dir(ckpt_dir, step).is_dir():
        raise FileNotFoundError(f"{marker} names step {step} but {step_dir(ckpt_dir, step)} is missing")
    return step


def saved_steps(ckpt_dir) -> list[int]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def read_hf_config(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / "hf_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint folder (no hf_config.json)")
    return providers.load_hf_config(path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict:
    models = providers.unwrap(model_chunks)
    sd = {}
    if len(models) == 1:
        sd["model"] = models[0].sharded_state_dict()
    else:
        for i, m in enumerate(models):
            sd[f"model{i}"] = m.sharded_state_dict()
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading)
    return sd


def write_self_description(ckpt_dir, hf_config: dict, tokenizer_dir=None) -> None:
    """hf_config.json + tokenizer/ (the model's tokenizer files, copied unchanged) in the checkpoint root (rank 0);
    tokenizer_dir None: the embedded students' tokenizer, unless the checkpoint already has one."""
    from recipes import tokenizer

    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "hf_config.json", json.dumps(hf_config, indent=2))
    tok = root / "tokenizer"
    if tokenizer_dir is not None or not tok.is_dir():
        tokenizer.load(tokenizer_dir).save(tok)


def save_checkpoint(ckpt_dir, step: int, model_chunks: list, optimizer=None, scheduler=None, extra: dict | None = None,
                    keep_last: int | None = None, hf_config: dict | None = None, tokenizer_dir=None) -> Path:
    """Save `step` (collective over all ranks). Returns the step folder. See the module doc for the layout."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    hf = hf_config or getattr(providers.unwrap(model_chunks)[0], "hf_config", None)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        if hf is not None:
            write_self_description(root, hf, tokenizer_dir)
    barrier()
    sd = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    dist_checkpointing.save(sd, str(tmp))
    if _rank() == 0:
        state = {"step": int(step), "extra": extra or {},
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
        torch.save(state, tmp / TRAINER_STATE)
    barrier()
    if _rank() == 0:
        if final.exists():  # re-saving a step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(root / LATEST, f"{int(step)}\n")
        if keep_last:
            for old in saved_steps(root)[:-keep_last]:
                if old != step:
                    shutil.rmtree(step_dir(root, old), ignore_errors=True)
    barrier()
    return final


def load_checkpoint(ckpt_dir, model_chunks: list, optimizer=None, scheduler=None, step: int | None = None):
    """Load `step` (default: latest) into the given chunks/optimizer/scheduler, whatever layout saved it.

    Returns (step, extra), or None when `ckpt_dir` holds no checkpoint yet (fresh start)."""
    from megatron.core import dist_checkpointing

    if step is None:
        step = latest_step(ckpt_dir)
        if step is None:
            return None
    d = step_dir(ckpt_dir, step)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint step (saved: {saved_steps(ckpt_dir)})")
    if optimizer is not None and not any(k.startswith("optimizer.")
                                         for k in dist_checkpointing.load_tensors_metadata(str(d))):
        raise KeyError(f"{d}: checkpoint has no optimizer state (a model-only checkpoint, e.g. from `nrr convert`); "
                       "load it with optimizer=None to initialise the weights")
    sd = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sd, str(d))
    models = providers.unwrap(model_chunks)
    for i, m in enumerate(models):
        m.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    state = torch.load(d / TRAINER_STATE, map_location="cpu", weights_only=False)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state.get("extra", {})
