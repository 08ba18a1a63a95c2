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


def progress(disable: bool = False):
    """A rich Progress with a bar, counts, rate and ETA (use as a context manager)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=disable, transient=False,
    )
