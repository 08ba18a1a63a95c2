"""Training checkpoints with megatron-core `dist_checkpointing` (resharding across TP/PP layouts).

Offers:
- `save_checkpoint(ckpt_dir, step, model_chunks, optimizer=None, scheduler=None, extra=None, keep_last=None)`
- `load_checkpoint(ckpt_dir, model_chunks, optimizer=None, scheduler=None, step=None) -> (step, extra) | None`
- `latest_step(ckpt_dir) -> int | None`, `step_dir(ckpt_dir, step)`, `read_hf_config(ckpt_dir)`.
- `verify_step(ckpt_dir, step) -> [problem, ...]`, `CorruptCheckpointError`; `replace_dir(tmp, final)`,
  `recover_dir(final)`, `fsync_tree(root)`: the atomic-folder helpers, shared with the HF export.

Layout of `ckpt_dir`:
    hf_config.json            the model's HF config: a checkpoint is self-describing
    tokenizer/                the model's HF tokenizer files (the embedded students' unless another is given)
    iter_0000010/             one dist_checkpointing checkpoint: model (+ optimizer) shards, common.pt,
                              trainer_state.pt (step, scheduler state, `extra`) written by rank 0, and
                              manifest.json: size and sha256 of every other file in the folder
    latest                    text file with the newest complete step

Saving: a step is written into `iter_XXXXXXX.tmp`; once every rank has finished, the files are hashed (split
across ranks) and fsynced, rank 0 writes manifest.json and fsyncs the folder, then renames it to `iter_XXXXXXX`
and fsyncs `ckpt_dir`; only then is `latest` replaced (write + fsync + os.replace + fsync of the folder). A process
killed mid-save leaves at most a `.tmp` folder, which resume ignores and the next save removes. Re-saving a step
that exists swaps the new folder with the old one in one rename (Linux renameat2 RENAME_EXCHANGE) and deletes the
old one afterwards; where the filesystem lacks the swap, the old folder is first renamed to `iter_XXXXXXX.old`,
which loaders and the next save take as the step when a crash left no `iter_XXXXXXX`. `keep_last=K` deletes all
but the newest K steps.

Loading checks the step against its manifest (every file present, same size, same sha256). Without `step=`, a
step that fails the check (or has no manifest: an unfinished or pre-manifest save) is skipped with a
RuntimeWarning naming the file and the expected vs found size or checksum, and the newest earlier step that passes
is loaded; when none passes, a CorruptCheckpointError lists every step and why. An explicit `step=` that fails
raises CorruptCheckpointError. trainer_state.pt is read with `torch.load(weights_only=True)`: numpy arrays in
`extra` (numpy's RNG state) are stored as tensors and given back as arrays.

Any TP/PP layout can load any other's checkpoint (megatron's sharded keys are global). `extra` is taken from rank 0
(data position, every rank's RNG streams gathered there: `recipes.resume.rng_states`, ...) and may hold tensors, numpy arrays, numbers, strings, None and
dicts/lists/tuples of them (what `torch.load(weights_only=True)` reads back); anything else fails at save.

The optimizer state reshards too: megatron's regular optimizer and its DistributedOptimizer (saved in the
'fully_reshardable' model-space format, `DISTRIBUTED_OPTIMIZER_METADATA`) write Adam's moments per model parameter
under the same keys, so a checkpoint saved with the distributed optimizer at any TP/PP/DP loads into any layout
with or without it. The reverse (a checkpoint saved without it, resumed with it) is refused with a ValueError.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from recipes.megatron import providers
from recipes.megatron.runtime import barrier

_ITER = re.compile(r"^iter_(\d{7,})(\.old)?$")
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter.json"  # a LoRA step's adapter config, base identity and base weights' sha256
_NUMPY = "__numpy_array__"  # tags a numpy array stored as a tensor in trainer_state.pt


class CorruptCheckpointError(ValueError):
    """A step folder that does not match its manifest (a file missing, truncated or changed), or has none."""


def step_dir(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"iter_{int(step):07d}"


def _step_path(ckpt_dir, step: int) -> Path:
    """Where step `step` lives: its folder, or the `.old` copy a crash in the middle of a re-save left behind."""
    final = step_dir(ckpt_dir, step)
    old = final.with_name(final.name + ".old")
    return old if not final.is_dir() and old.is_dir() else final


def latest_step(ckpt_dir) -> int | None:
    """The step the `latest` marker names, or None when the folder holds no checkpoint. When that step's folder is
    gone, the newest saved step before it (with a warning). Cheap: checksums are checked by `load_checkpoint`."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected a step number, found {text!r}")
    step = int(text)
    if _step_path(ckpt_dir, step).is_dir():
        return step
    earlier = [s for s in saved_steps(ckpt_dir) if s < step]
    if not earlier:
        raise FileNotFoundError(f"{marker} names step {step} but {step_dir(ckpt_dir, step)} is missing, "
                                "and no earlier step is saved")
    _warn(f"{marker} names step {step} but {step_dir(ckpt_dir, step)} is missing; using step {earlier[-1]}")
    return earlier[-1]


def saved_steps(ckpt_dir) -> list[int]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted({int(m.group(1)) for p in d.iterdir() if p.is_dir() and (m := _ITER.match(p.name))})


def read_hf_config(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / "hf_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint folder (no hf_config.json)")
    return providers.load_hf_config(path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _warn(message: str) -> None:
    if _rank() == 0:  # one warning per run, not one per rank
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------ durable, atomic folders


def fsync_dir(path) -> None:
    """Make a folder's entries (files created or renamed in it) durable: a rename is not, until its folder is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file under `root`, then every folder, deepest first (a file's name lives in its folder)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the C library,
    kernel or filesystem lacks it, so the caller can fall back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_dir(tmp, final) -> None:
    """Publish the complete folder `tmp` as `final` without ever deleting `final` first: one rename when `final`
    is new, an atomic swap when it exists (the old copy is deleted afterwards). Without the swap, `final` is
    renamed to `final.old` first; `recover_dir` puts it back if a crash comes before the second rename."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    if _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp)  # now the previous version
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old)


def recover_dir(final) -> None:
    """Clean up after a crash while writing `final`: drop an unpublished `final.tmp`, and put back `final.old`
    when a crash between replace_dir's two renames left no `final` (else it is a leftover: drop it)."""
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
            fsync_dir(final.parent)


# ------------------------------------------------------------------------------ manifests (checksums)


def _share(obj):
    """Rank 0's `obj` on every rank (itself in a single process)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's `obj`, in rank order (a collective)."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _my_share(names: list[str]) -> list[str]:
    """This rank's part of a list every rank holds: hashing a checkpoint is split across ranks."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return names[_rank()::world]


def _digest(path: Path, fsync: bool = False) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
        if fsync:  # while the file is open anyway: its bytes on disk before the step is published
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(d: Path, step: int) -> None:
    """Collective: hash (and fsync) every file of the written step `d`, split across ranks; rank 0 writes
    manifest.json and fsyncs the folder tree. Call after every rank has finished writing into `d`."""
    names = _share(_files(d) if _rank() == 0 else None)
    digests = {}
    for part in _gather({n: _digest(d / n, fsync=True) for n in _my_share(names)}):
        digests.update(part)
    if _rank() == 0:
        manifest = {"step": int(step), "algorithm": "sha256", "files": {n: digests[n] for n in names}}
        with open(d / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_tree(d)


def _check_file(d: Path, name: str, want: dict) -> str | None:
    path = d / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"{path}: {size} bytes, expected {want['size']} (truncated or overwritten)"
    got = _digest(path)["sha256"]
    if got != want["sha256"]:
        return f"{path}: sha256 {got}, expected {want['sha256']}"
    return None


def _read_manifest(d: Path, step: int) -> tuple[dict | None, str | None]:
    path = d / MANIFEST
    if not path.is_file():
        return None, f"{path}: missing (the save did not finish, or predates checksums)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return None, f"{path}: unreadable ({err})"
    if manifest.get("step") != step:
        return None, f"{path}: describes step {manifest.get('step')}, expected {step}"
    return files, None


def verify_step(ckpt_dir, step: int) -> list[str]:
    """What is wrong with saved step `step` (empty: every file matches its manifest). Collective: each rank
    checks its share of the files and every rank gets the same answer."""
    d = _step_path(ckpt_dir, step)
    if not d.is_dir():
        return [f"{d}: missing"]
    files, problem = _read_manifest(d, int(step))
    mine = [problem] if problem and _rank() == 0 else []
    if files is not None:
        mine += [p for n in _my_share(sorted(files)) if (p := _check_file(d, n, files[n]))]
    return sorted(p for part in _gather(mine) for p in part)


def _usable_step(ckpt_dir) -> int | None:
    """The newest step up to `latest` that passes `verify_step`, warning about each newer one that does not."""
    latest = latest_step(ckpt_dir)
    if latest is None:
        return None
    bad = []
    for step in reversed([s for s in saved_steps(ckpt_dir) if s <= latest]):
        problems = verify_step(ckpt_dir, step)
        if not problems:
            if bad:
                _warn(f"{ckpt_dir}: falling back to step {step}, the newest complete one: " + "; ".join(bad))
            return step
        bad.append(f"step {step} is corrupt: " + "; ".join(problems))
    raise CorruptCheckpointError(f"{ckpt_dir}: no usable checkpoint step: " + "; ".join(bad))


# ------------------------------------------------------------------------------ trainer_state.pt


def _tensors_only(obj):
    """`obj` in types torch.load(weights_only=True) reads: numpy arrays become tagged tensors, numpy scalars
    Python numbers (numpy's RNG state is a tuple holding an array)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return {_NUMPY: torch.from_numpy(obj.copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _tensors_only(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_tensors_only(v) for v in obj)
    return obj


def _numpy_back(obj):
    if isinstance(obj, dict):
        if set(obj) == {_NUMPY}:
            return obj[_NUMPY].numpy()
        return {k: _numpy_back(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_numpy_back(v) for v in obj)
    return obj


def _write_trainer_state(path: Path, state: dict) -> None:
    """Save `state`, refusing (at save, not at resume) anything `torch.load(weights_only=True)` would reject."""
    buf = io.BytesIO()
    try:
        torch.save(_tensors_only(state), buf)
        torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle's message, or the line of torch's that names the offending type
        why = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), str(err))
        raise TypeError(f"{path}: the trainer state (scheduler state, `extra`) holds a type that "
                        f"torch.load(weights_only=True) cannot read back; keep to tensors, numpy arrays, numbers, "
                        f"strings and containers of them: {why}") from None
    path.write_bytes(buf.getvalue())


def _read_trainer_state(path: Path) -> dict:
    return _numpy_back(torch.load(path, map_location="cpu", weights_only=True))


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


def _model_state(model) -> dict:
    """The model's sharded state; only its LoRA adapters when it trains them on a frozen base, which is not saved
    (it comes from its own checkpoint, identified in the step's adapter.json)."""
    sd = model.sharded_state_dict()
    if getattr(model, "adapters_only_checkpoint", False):
        sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    return sd


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict:
    models = providers.unwrap(model_chunks)
    sd = {}
    if len(models) == 1:
        sd["model"] = _model_state(models[0])
    else:
        for i, m in enumerate(models):
            sd[f"model{i}"] = _model_state(m)
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
    recover_dir(tok)
    if tokenizer_dir is not None or not tok.is_dir():
        tmp = tok.with_name(tok.name + ".tmp")  # copied whole, then swapped in: never a half-copied tokenizer
        tokenizer.load(tokenizer_dir).save(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, tok)


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
        for name in sorted({p.name.rsplit(".", 1)[0] for p in root.glob("iter_*.*")}):  # left by a killed save
            recover_dir(root / name)
        tmp.mkdir()
        if hf is not None:
            write_self_description(root, hf, tokenizer_dir)
    barrier()
    sd = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    dist_checkpointing.save(sd, str(tmp))
    if _rank() == 0:
        state = {"step": int(step), "extra": extra or {},
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
        _write_trainer_state(tmp / TRAINER_STATE, state)
        adapter = getattr(providers.unwrap(model_chunks)[0], "adapter_description", None)
        if adapter is not None:
            _atomic_write(tmp / ADAPTER_FILE, json.dumps(adapter, indent=2))
    barrier()
    _write_manifest(tmp, step)
    if _rank() == 0:
        _publish(tmp, final)
        _atomic_write(root / LATEST, f"{int(step)}\n")
        if keep_last:
            for old in saved_steps(root)[:-keep_last]:
                if old != step:
                    shutil.rmtree(_step_path(root, old), ignore_errors=True)
    barrier()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """The step becomes visible (a seam of its own: the tests kill a save right before it)."""
    replace_dir(tmp, final)


def check_adapter_checkpoint(step_folder: Path, description: dict) -> None:
    """An adapter checkpoint step loads only onto the base and adapter shape it was trained with."""
    path = Path(step_folder) / ADAPTER_FILE
    if not path.is_file():
        raise ValueError(f"{step_folder}: not a LoRA adapter checkpoint (no {ADAPTER_FILE}); a full checkpoint "
                         "is a base model: give it as model.init_checkpoint")
    saved = json.loads(path.read_text())
    if saved["base_sha256"] != description["base_sha256"]:
        raise ValueError(f"{path}: the adapters were trained on another base model (weights sha256 "
                         f"{saved['base_sha256'][:16]}..., base {saved['base']}) than the one loaded "
                         f"({description['base_sha256'][:16]}..., base {description['base']}): load them onto "
                         "the base they were trained on")
    for key in ("r", "target_modules"):
        if saved["lora"][key] != description["lora"][key]:
            raise ValueError(f"{path}: saved with peft.lora.{key}={saved['lora'][key]!r}, this model has "
                             f"{description['lora'][key]!r}")


def load_checkpoint(ckpt_dir, model_chunks: list, optimizer=None, scheduler=None, step: int | None = None):
    """Load `step` (default: latest) into the given chunks/optimizer/scheduler, whatever layout saved it.

    Every file is first checked against the step's manifest. Without `step`, a corrupt or incomplete latest step
    falls back to the newest earlier one that is complete (a RuntimeWarning says which file was wrong and how);
    CorruptCheckpointError when none is, or when an explicit `step` is corrupt.

    Returns (step, extra), or None when `ckpt_dir` holds no checkpoint yet (fresh start)."""
    from megatron.core import dist_checkpointing

    if step is None:
        step = _usable_step(ckpt_dir)  # verified
        if step is None:
            return None
        d = _step_path(ckpt_dir, step)
    else:
        d = _step_path(ckpt_dir, step)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such checkpoint step (saved: {saved_steps(ckpt_dir)})")
        problems = verify_step(ckpt_dir, step)
        if problems:
            raise CorruptCheckpointError(f"{d}: step {step} is corrupt: " + "; ".join(problems))
    saved_keys = list(dist_checkpointing.load_tensors_metadata(str(d))) if optimizer is not None else []
    if optimizer is not None and not any(k.startswith("optimizer.") for k in saved_keys):
        raise KeyError(f"{d}: checkpoint has no optimizer state (a model-only checkpoint, e.g. from `nrr convert`); "
                       "load it with optimizer=None to initialise the weights")
    saved_distributed = any(k.startswith(_MAIN_PARAM[True]) for k in saved_keys)
    if optimizer is not None and _is_distributed(optimizer) and not saved_distributed:
        raise ValueError(f"{d}: saved without the distributed optimizer, which cannot be resumed with "
                         "parallel.distributed_optimizer=true; resume it with the setting it was saved with")
    models = providers.unwrap(model_chunks)
    adapter = getattr(models[0], "adapter_description", None)
    if adapter is not None:
        check_adapter_checkpoint(d, adapter)
    sd = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    if optimizer is not None:
        _match_saved_main_params(sd["optimizer"], optimizer, saved_keys)
    loaded = dist_checkpointing.load(sd, str(d))
    for i, m in enumerate(models):
        # adapters only: the frozen base was loaded from its own checkpoint before
        m.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"],
                          strict=not getattr(m, "adapters_only_checkpoint", False))
    if optimizer is not None:
        opt_sd = loaded["optimizer"]
        if saved_distributed and not _is_distributed(optimizer):
            opt_sd = _to_regular_format(opt_sd, optimizer)
        with _adam_step_kept(optimizer):
            optimizer.load_state_dict(opt_sd)
    state = _read_trainer_state(d / TRAINER_STATE)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state.get("extra", {})
