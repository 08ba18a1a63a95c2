"""Rollouts: the rollout config and the engine GRPO and rejection sampling sample from.

The engine is a generation backend (`recipes.generation`) whose weights the trainer replaces in memory:
`vllm` (an engine in this process) or `hf` (transformers, where vLLM is not available). It starts with
placeholder weights; refit before generating.

Offers `RolloutConfig` (sampling, engine and refit settings), `engine_options(cfg, ...)` (the engine's keyword
arguments those settings give; `recipes.generation.vllm_engine.llm_kwargs` turns them into vLLM's) and
`start_engine`. With `colocated_sleep` the trainer calls `backend.sleep()` once the rollouts are done; the next
refit or generation wakes the engine.
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
    dtype: str = "auto"  # the engine's weights and activations: auto = bfloat16 on GPU, float32 on CPU
    kv_cache_mb: int = 256  # CPU: vLLM reserves this much for the KV cache (on GPU gpu_memory_utilization rules)
    gpu_memory_utilization: float = 0.5  # GPU: the share vLLM may fill (weights + KV cache); the trainer shares it
    tensor_parallel_size: int = 1  # GPUs one engine spans (vLLM's own tensor parallelism, not the trainer's)
    # GPU: vLLM sleep mode; the engine sleeps (level 1) while the trainer trains and wakes for refit and generation
    colocated_sleep: bool = False
    refit_bucket_mb: int = 512  # a refit hands the engine at most this much at a time (plus one layer's tensors)
    # skip torch.compile: on 2 CPU cores compiling the tiny model takes ~27 s and cuts a 16 x 8 rollout from 1.5 to
    # 1.1 s, so it pays after ~60 steps (the demo's 160-step run compiles; tests' few-step runs do not)
    enforce_eager: bool = True
    # torch threads while the in-process engine decodes on CPU (training keeps its own); 0 keeps the trainer's
    cpu_threads: int = 0

    def sampling(self, n: int, seed: int, max_tokens: int | None = None,
                 temperature: float | None = None) -> SamplingParams:
        """Rollout sampling; with the sampled tokens' log-probs (GRPO's mismatch check and TIS read them)."""
        return SamplingParams(n=n, temperature=self.temperature if temperature is None else temperature,
                              top_p=self.top_p, max_tokens=max_tokens or self.max_tokens, seed=seed, logprobs=True)


def engine_options(cfg: RolloutConfig, max_model_len: int = 512, seed: int = 0, in_process: bool = True) -> dict:
    """The keyword arguments `start_engine` gives the backend (`VLLMEngine` for vllm, `HFBackend` for hf)."""
    if cfg.backend == "vllm":
        return dict(dtype=cfg.dtype, max_model_len=max_model_len, seed=seed, enforce_eager=cfg.enforce_eager,
                    kv_cache_mb=cfg.kv_cache_mb, gpu_memory_utilization=cfg.gpu_memory_utilization,
                    tensor_parallel_size=cfg.tensor_parallel_size, sleep_mode=cfg.colocated_sleep,
                    load_weights=False, in_process=in_process, cpu_threads=cfg.cpu_threads)
    if cfg.backend == "hf":
        if cfg.colocated_sleep or cfg.tensor_parallel_size != 1:
            raise ValueError("rollout.colocated_sleep and rollout.tensor_parallel_size are vLLM settings; "
                             "rollout.backend=hf supports neither (set them to false / 1)")
        return dict(dtype=cfg.dtype, load_weights=False)
    raise ValueError(f"rollout.backend must be 'vllm' or 'hf', got {cfg.backend!r}")


def start_engine(cfg: RolloutConfig, hf_dir: str | Path, max_model_len: int = 512, seed: int = 0,
                 in_process: bool = True) -> RefitBackend:
    """An engine with the architecture and tokenizer of `hf_dir` and placeholder weights."""
    return make_backend(cfg.backend, hf_dir, **engine_options(cfg, max_model_len, seed, in_process))
