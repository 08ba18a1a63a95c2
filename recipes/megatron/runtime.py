"""Process-level runtime for megatron-core: distributed init, model-parallel groups, seeding, CPU device layer.

Offers:
- `init_distributed(tp, pp, seed)`: torch.distributed (NCCL on GPU, gloo on CPU) from `torchrun` env vars, or a
  single process with world size 1 when they are absent; megatron `parallel_state` with TP x PP (the rest is DP);
  seeds (megatron's CUDA RNG tracker on GPU, a CPU-generator tracker on CPU).
- `destroy_distributed()`, `device()`, `is_cpu()`, `rank()`, `world_size()`, `print_rank0(...)`,
  `device_peak_tflops()` (the GPU's dense bf16 peak for MFU, None on CPU),
  `rng_state()` / `set_rng_state(state)` (all RNG streams of this rank, for checkpoints' `extra`).

On a machine without CUDA, `init_distributed` switches on a small device layer so that megatron-core's TP and PP
code (which allocates on `torch.cuda.current_device()`, calls `.cuda()`, `torch.cuda.synchronize()`, uses
`device="cuda"` literals in the pipeline schedules, pins memory, ...) runs unchanged on CPU: a
`TorchFunctionMode` maps every CUDA device argument to CPU, `.cuda()` and `.pin_memory()` return the tensor,
and the few `torch.cuda` functions megatron calls become CPU equivalents (activation recompute saves and restores
the CPU generator only). With CUDA present nothing is patched.
The layer adds no collectives: what megatron's DDP and DistributedOptimizer call (`reduce_scatter_tensor`,
`all_gather_into_tensor`, inside `_coalescing_manager`, sync and async) is native in torch 2.13's gloo backend, which
gives DP=2 with the distributed optimizer the DP=1 losses (tests/test_megatron_distopt.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import warnings
from datetime import timedelta

import torch
from torch.overrides import TorchFunctionMode


def quiet_cpu_warnings() -> None:
    """megatron-core announces its pure-PyTorch fallbacks (no Apex, no Transformer Engine) on every import: on CPU
    they are the expected path."""
    # megatron's DDP calls these collectives by their deprecated names (its concern, not the caller's)
    deprecated = r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*"
    for pattern in (r".*(Apex|Transformer Engine).*", r".*full scope is deprecated.*", r".*cuda_graph_scope.*",
                    deprecated):
        warnings.filterwarnings("ignore", message=pattern)


quiet_cpu_warnings()

_STATE = {"initialized": False, "owns_process_group": False, "cpu_layer": None}


# --------------------------------------------------------------------------------------------------------------
# CPU device layer
# --------------------------------------------------------------------------------------------------------------


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # a bare int device index means a CUDA device in torch
    return isinstance(dev, int) and not isinstance(dev, bool)


# the torch functions the mode changes even when they are called without keyword arguments
_PLACEMENT_FUNCS = frozenset((torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.is_pinned, torch.Tensor.type,
                              torch.Tensor.to))


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to CPU for every torch call made while the mode is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # this runs in Python on every torch op of the process (a training step makes thousands): the common case,
        # an op with no keyword arguments that places nothing, goes straight through
        if not kwargs and func not in _PLACEMENT_FUNCS:
            return func(*args)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers assert type names such as 'torch.cuda.FloatTensor'
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _engine_under_cpu_layer(run_backward):
    """torch's autograd engine entry, run with the mode on: `backward`/`grad` reach the engine through the mode's
    own handler, where the mode is off, yet the engine's Python callbacks need it (the backward of sequence
    parallelism's linear layers allocates its reduce-scatter buffer on the CUDA device)."""

    def run(*args, **kwargs):
        if any(isinstance(m, _CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack()):
            return run_backward(*args, **kwargs)
        with _CudaToCpuMode():
            return run_backward(*args, **kwargs)

    return run


class _CpuRNGStatesTracker:
    """Megatron's named RNG-state tracker (`get_cuda_rng_tracker()`), backed by the CPU generator.

    Same contract as `CudaRNGStatesTracker`: `add(name, seed)` registers a stream, `fork(name)` runs a block
    with that stream and restores the default one afterwards, `get_states/set_states` for checkpoints.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already registered")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already registered")
        self._is_initialized = True
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not registered")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _enable_cpu_layer() -> None:
    if _STATE["cpu_layer"] is not None:
        return
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process
    saved = {name: getattr(torch.cuda, name) for name in ("current_device", "synchronize", "manual_seed",
                                                           "manual_seed_all", "get_rng_state", "set_rng_state")}
    torch.cuda.current_device = lambda: 0  # the mode maps device index 0 to cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # activation recompute (megatron's CheckpointFunction) saves the CUDA generator next to the CPU one, which it
    # saves and restores itself; there is no CUDA generator here (and a CUDA state set before CUDA starts queues a
    # callback forever)
    from megatron.core.tensor_parallel import random as mp_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        saved[(mp_random, name)] = getattr(mp_random, name)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *a, **k: None
    saved[(torch.autograd, "_engine_run_backward")] = torch.autograd._engine_run_backward
    torch.autograd._engine_run_backward = _engine_under_cpu_layer(torch.autograd._engine_run_backward)
    _STATE["cpu_layer"] = (mode, saved)


def _disable_cpu_layer() -> None:
    if _STATE["cpu_layer"] is None:
        return
    mode, saved = _STATE["cpu_layer"]
    mode.__exit__(None, None, None)
    for key, fn in saved.items():
        owner, attr = key if isinstance(key, tuple) else (torch.cuda, key)
        setattr(owner, attr, fn)
    _STATE["cpu_layer"] = None


@contextlib.contextmanager
def cpu_layer_suspended():
    """A block run without the CPU device layer's torch-function mode, for code that never places anything on CUDA
    (vLLM's CPU engine): the mode is a Python call on every torch op, and decoding a small model is mostly ops."""
    state = _STATE["cpu_layer"]
    if state is None:
        yield
        return
    mode = state[0]
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def is_cpu() -> bool:
    """True when the run has no CUDA device (the CPU device layer is then used)."""
    return not torch.cuda.is_available()


def device() -> torch.device:
    if is_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def print_rank0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name substring, most specific first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.1))


def device_peak_tflops() -> float | None:
    """This GPU's dense bf16 peak, for model-FLOP utilisation; None on CPU or for a GPU not in the table."""
    if is_cpu():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed_all(seed: int) -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if is_cpu():
        from megatron.core import parallel_state as ps

        tracker = _CpuRNGStatesTracker()
        offset = seed + 2718  # same stream layout as model_parallel_cuda_manual_seed
        tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, offset + ps.get_tensor_model_parallel_rank())
        tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                    + ps.get_expert_tensor_parallel_rank())
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    """Every RNG stream of this rank (python, numpy, torch CPU/CUDA, megatron's tracker): save it in checkpoints'
    `extra` for bitwise resume of dropout/sampling, or around code that reseeds."""
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": None if is_cpu() else torch.cuda.get_rng_state(),
            "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}


def set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and not is_cpu():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 0, timeout_minutes: int = 30, cp: int = 1) -> None:
    """Initialise torch.distributed + megatron model-parallel groups (TP x PP, the rest DP) and seed everything.

    Works under `torchrun` (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK from the environment) and as a
    plain single process (world size 1, a free local port). Calling it again with the same layout re-seeds; with
    a different layout it rebuilds the model-parallel groups.
    """
    from megatron.core import parallel_state as ps

    cpu = is_cpu()
    if cpu:
        _enable_cpu_layer()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend="gloo" if cpu else "nccl",
            world_size=int(os.environ["WORLD_SIZE"]),
            rank=int(os.environ["RANK"]),
            timeout=timedelta(minutes=timeout_minutes),
        )
        _STATE["owns_process_group"] = True
    ws = torch.distributed.get_world_size()
    if ws % (tp * pp * cp) != 0:
        raise ValueError(f"world size {ws} is not divisible by tensor_parallel ({tp}) x pipeline_parallel ({pp}) x "
                         f"context_parallel ({cp})")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size()) != (tp, pp, cp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp, distributed_timeout_minutes=timeout_minutes)
    _seed_all(seed)
    _STATE["initialized"] = True


def destroy_distributed() -> None:
    """Tear down megatron's groups and the process group this module created (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _STATE["owns_process_group"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _STATE["owns_process_group"] = False
    _STATE["initialized"] = False


def torchrun_main(prog: str, help_text: str, add_arguments, cli) -> int:
    """`python -m recipes.<stage>`: the entry point torchrun starts on every rank of a Megatron stage.

    Parses the stage's arguments, runs it, turns a config error into exit code 2 and always tears
    down torch.distributed so a failed rank does not leave its peers waiting.
    """
    import argparse
    import sys

    from recipes.config import ConfigError

    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    add_arguments(parser)
    try:
        return cli(parser.parse_args())
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
