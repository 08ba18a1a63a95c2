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

The optimizer state reshards too: megatron's regular optimizer and its DistributedOptimizer (saved in the
'fully_reshardable' model-space format, `DISTRIBUTED_OPTIMIZER_METADATA`) write Adam's moments per model parameter
under the same keys, so a checkpoint saved with the distributed optimizer at any TP/PP/DP loads into any layout
with or without it. The reverse (a checkpoint saved without it, resumed with it) is refused with a ValueError.
"""

from __future__ import annotations

import contextlib
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


# How the distributed optimizer writes its state. 'fully_reshardable' stores it in model space: one exp_avg /
# exp_avg_sq / fp32 main-param tensor per model parameter, sharded across TP/PP exactly like the parameter, so any
# TP/PP/DP layout loads it, with or without the distributed optimizer (tensor keys `optimizer.state.<name>.<param
# key>`, the same as megatron's regular optimizer). The alternatives in megatron-core 0.16.1 do not reshard that
# far: 'dp_reshardable' stores the flat bucket layout of one TP/PP layout (reshards across DP only), and
# 'fully_sharded_model_space' writes flattened ShardedTensors, which 0.16.1's dist_checkpointing rejects.
# mem_efficient: at save the DP shards are gathered over gloo into DP rank 0's CPU memory, instead of being
# all-gathered into every DP rank's device memory (the full unsharded state on each GPU, which the distributed
# optimizer exists to avoid); loading reads the whole tensors and keeps this rank's slice either way.
DISTRIBUTED_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                                  "distrib_optim_fully_reshardable_mem_efficient": True}


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(optimizer))


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict:
    models = providers.unwrap(model_chunks)
    sd = {}
    if len(models) == 1:
        sd["model"] = models[0].sharded_state_dict()
    else:
        for i, m in enumerate(models):
            sd[f"model{i}"] = m.sharded_state_dict()
    if optimizer is not None:
        if is_loading:
            for inner in _inner_optimizers(optimizer):
                # the distributed optimizer describes its state from torch Adam's per-parameter `step`, which a
                # fresh optimizer does not have yet: megatron's own placeholder state (a zero-gradient step; the
                # load then overwrites the weights, moments and step)
                if _is_distributed(inner) and len(inner.optimizer.state) == 0:
                    inner._init_optimizer_states_with_dummy_values()
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=dict(DISTRIBUTED_OPTIMIZER_METADATA))
    return sd


# The fp32 main weights are the one optimizer tensor the two formats name differently.
_MAIN_PARAM = {True: "optimizer.state.param.", False: "optimizer.state.fp32_param."}


def _match_saved_main_params(optimizer_sd: dict, optimizer, saved_keys) -> None:
    """Point the requested fp32 main-weight tensors at the name the saving optimizer used (the other format's)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    want, other = _MAIN_PARAM[_is_distributed(optimizer)], _MAIN_PARAM[not _is_distributed(optimizer)]
    if any(k.startswith(want) for k in saved_keys) or not any(k.startswith(other) for k in saved_keys):
        return
    for sh in nested_values(optimizer_sd):
        if getattr(sh, "key", "").startswith(want):
            sh.key = other + sh.key[len(want):]


@contextlib.contextmanager
def _adam_step_kept(optimizer):
    """Around a distributed optimizer's load_state_dict with torch's own Adam (no Apex/Transformer Engine, i.e. on
    CPU), where megatron-core 0.16.1 restores Adam's per-parameter `step` from the param groups as ONE tensor
    shared by every parameter (torch's Adam then adds 1 to it once per parameter per step, so the bias correction
    goes wrong from the first step after resume), then copies every per-parameter state entry from the
    checkpoint's tensors, which never include `step` (a KeyError). Each copy here leaves `step` aside and gives
    the parameter its own copy of it back."""
    patched = []
    for inner in _inner_optimizers(optimizer):
        if not _is_distributed(inner) or inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue
        copy_states = inner._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, inner=inner, copy_states=copy_states):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                copy_states(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.clone()

        inner._set_main_param_and_optimizer_states = keep_step
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states


def _group_id(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def _to_regular_format(loaded: dict, optimizer) -> dict:
    """A distributed optimizer's checkpoint, loaded into a regular optimizer, in the regular optimizer's format.

    The tensors are already where the regular optimizer asked for them (same keys in model space); what differs
    is the non-tensor part that dist_checkpointing restores from the checkpoint as saved: the distributed
    optimizer keeps its param groups (hyperparameters, the shared Adam `step`) under "optimizer" and adds
    "param_state*" entries, the regular one keeps torch's {"state", "param_groups"} with a shared "common_step"."""
    from megatron.core.optimizer.optimizer import FP32Optimizer

    inner = _inner_optimizers(optimizer)[0]
    if isinstance(inner, FP32Optimizer):  # torch's state dict at the top level, the saved groups beside it
        saved_groups = loaded.pop("optimizer")["param_groups"]
        torch_sd = loaded
    else:  # mixed precision: torch's state dict under "optimizer", merged with the saved groups
        torch_sd = loaded["optimizer"]
        saved_groups = torch_sd["param_groups"]
    for key in ("param_state", "param_state_sharding_type"):
        loaded.pop(key, None)
    by_id = {_group_id(g): g for g in saved_groups}
    groups = []
    for current, loaded_group in zip(inner.optimizer.param_groups, torch_sd["param_groups"]):
        saved = by_id[_group_id(current)]
        groups.append({**{k: v for k, v in saved.items() if k != "step"}, "params": loaded_group["params"]})
    torch_sd["param_groups"] = groups
    torch_sd["state"]["common_step"] = torch.tensor(float(saved_groups[0]["step"]), dtype=torch.float32)
    return loaded


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
    saved_keys = list(dist_checkpointing.load_tensors_metadata(str(d))) if optimizer is not None else []
    if optimizer is not None and not any(k.startswith("optimizer.") for k in saved_keys):
        raise KeyError(f"{d}: checkpoint has no optimizer state (a model-only checkpoint, e.g. from `nrr convert`); "
                       "load it with optimizer=None to initialise the weights")
    saved_distributed = any(k.startswith(_MAIN_PARAM[True]) for k in saved_keys)
    if optimizer is not None and _is_distributed(optimizer) and not saved_distributed:
        raise ValueError(f"{d}: saved without the distributed optimizer, which cannot be resumed with "
                         "parallel.distributed_optimizer=true; resume it with the setting it was saved with")
    sd = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    if optimizer is not None:
        _match_saved_main_params(sd["optimizer"], optimizer, saved_keys)
    loaded = dist_checkpointing.load(sd, str(d))
    models = providers.unwrap(model_chunks)
    for i, m in enumerate(models):
        m.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=True)
    if optimizer is not None:
        opt_sd = loaded["optimizer"]
        if saved_distributed and not _is_distributed(optimizer):
            opt_sd = _to_regular_format(opt_sd, optimizer)
        with _adam_step_kept(optimizer):
            optimizer.load_state_dict(opt_sd)
    state = torch.load(d / TRAINER_STATE, map_location="cpu", weights_only=False)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state.get("extra", {})
