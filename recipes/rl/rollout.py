"""Rollouts: the rollout config and the engine GRPO and rejection sampling sample from.

The engine is a generation backend (`recipes.generation`) whose weights the trainer replaces in memory:
`vllm` (an engine in this process) or `hf` (transformers, where vLLM is not available). It starts with
placeholder weights; refit before generating.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from recipes.generation import RefitBackend, SamplingParams, make_backend


@dataclasses.dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128  # response budget (the overlong penalty and Dr.GRPO use the same number)
    kv_cache_mb: int = 256  # vLLM on CPU reserves this much for the KV cache
    enforce_eager: bool = True  # skip torch.compile: a minutes-long run does not earn back the compile time
    # torch threads while the in-process engine decodes on CPU (training keeps its own); 0 keeps the trainer's
    cpu_threads: int = 0

    def sampling(self, n: int, seed: int, max_tokens: int | None = None,
                 temperature: float | None = None) -> SamplingParams:
        return SamplingParams(n=n, temperature=self.temperature if temperature is None else temperature,
                              top_p=self.top_p, max_tokens=max_tokens or self.max_tokens, seed=seed)


def start_engine(cfg: RolloutConfig, hf_dir: str | Path, max_model_len: int = 512, seed: int = 0,
                 in_process: bool = True) -> RefitBackend:
    """An engine with the architecture and tokenizer of `hf_dir` and placeholder weights."""
    if cfg.backend == "vllm":
        return make_backend("vllm", hf_dir, dtype="float32", max_model_len=max_model_len, seed=seed,
                            enforce_eager=cfg.enforce_eager, kv_cache_mb=cfg.kv_cache_mb, load_weights=False,
                            in_process=in_process, cpu_threads=cfg.cpu_threads)
    if cfg.backend == "hf":
        return make_backend("hf", hf_dir, dtype="float32", load_weights=False)
    raise ValueError(f"rollout.backend must be 'vllm' or 'hf', got {cfg.backend!r}")
