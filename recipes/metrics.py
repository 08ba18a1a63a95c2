"""Run logging: a JSONL metrics file per run, TensorBoard scalars, and rich progress bars."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def model_flops_per_token(hf: dict, seq_length: int) -> float:
    """Training FLOPs per token of a decoder (forward + backward = 3 forwards), counted as PaLM's appendix B counts
    model FLOPs (Chowdhery et al. 2022): 6 x the parameters that multiply activations (every layer's projections
    and the output layer; not the embedding lookup, norms or biases) + 12 x layers x heads x head_dim x sequence
    length for attention's scores and weighted sum (the causal mask's saving not subtracted, as there)."""
    h, f, layers = int(hf["hidden_size"]), int(hf["intermediate_size"]), int(hf["num_hidden_layers"])
    nh = int(hf["num_attention_heads"])
    nkv = int(hf.get("num_key_value_heads") or nh)
    hd = int(hf.get("head_dim") or h // nh)
    matmul_params = layers * (h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * f) + int(hf["vocab_size"]) * h
    return 6.0 * matmul_params + 12.0 * layers * nh * hd * seq_length


def throughput(tokens: float, seconds: float, gpus: int, flops_per_token: float,
               peak_tflops: float | None = None) -> dict:
    """Per-GPU throughput of a step: tokens/s, model TFLOP/s and, with the device's peak, the utilisation."""
    per_gpu = tokens / max(seconds, 1e-9) / gpus
    out = {"tokens_per_s_per_gpu": per_gpu, "model_tflops_per_gpu": per_gpu * flops_per_token / 1e12}
    if peak_tflops:
        out["mfu"] = out["model_tflops_per_gpu"] / peak_tflops
    return out


class MetricsLogger:
    """Append one JSON object per step to `metrics.jsonl` and mirror scalars to TensorBoard.

    The JSONL file is flushed on every write, so nothing logged is lost when a run is killed.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard missing: the JSONL file is still written
                self._tb = None

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


# A launcher watching a stage (`nrr pipeline`) sets this to a file the stage's progress bars keep current.
PROGRESS_FILE_ENV = "NRR_PROGRESS_FILE"


def progress(disable: bool = False):
    """A rich Progress with a bar, counts, rate and ETA (use as a context manager). Under a launcher that set
    $NRR_PROGRESS_FILE, rank 0 also keeps that file current (see `Heartbeat`), whether the bar is shown or not."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class ProgressWithHeartbeat(Progress):
        def update(self, task_id, **kwargs):
            super().update(task_id, **kwargs)
            heartbeat.write(self, task_id)

        def advance(self, task_id, advance: float = 1):
            super().advance(task_id, advance)
            heartbeat.write(self, task_id)

    heartbeat = Heartbeat.from_env()
    return ProgressWithHeartbeat(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=disable, transient=False,
    )


class Heartbeat:
    """The newest state of a stage's progress bar as one small JSON file (task, completed, total, info, elapsed,
    ETA, wall time), replaced atomically at most every `interval` seconds and on the last step, so that a process
    that cannot see the stage's terminal (the pipeline waiting on NeMo-Run jobs) can show it."""

    def __init__(self, path: str | None, interval: float = 1.0):
        import os

        rank0 = os.environ.get("RANK", "0") == "0"
        self.path = Path(path) if path and rank0 else None
        self.interval = interval
        self._last = 0.0

    @classmethod
    def from_env(cls) -> "Heartbeat":
        import os

        return cls(os.environ.get(PROGRESS_FILE_ENV))

    def write(self, bar, task_id) -> None:
        if self.path is None:
            return
        task = bar._tasks.get(task_id)
        now = time.time()
        if task is None or (now - self._last < self.interval and not task.finished):
            return
        self._last = now
        state = {"task": task.description, "completed": task.completed, "total": task.total,
                 "info": str(task.fields.get("info", "")), "elapsed_s": task.elapsed,
                 "eta_s": task.time_remaining, "time": now}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(state), encoding="utf-8")
            tmp.replace(self.path)
        except OSError:  # progress is for watching; it never stops the stage
            self.path = None


def read_heartbeat(path: str | Path) -> dict | None:
    """The stage's last heartbeat, or None when it has written none (or is writing it right now)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
