"""Text generation behind one interface, for every stage that samples from a model.

GRPO's rollouts, rejection sampling, GRPO's held-out check and evaluation all call

    backend.generate(prompts, SamplingParams(n, temperature, top_p, max_tokens, seed)) -> [[Completion] * n]

with prompts as token ids or rendered text (the chat template already applied). Backends
(`make_backend`): `hf` (transformers), `vllm` (an engine in this process,
weights replaced in memory: rollouts), `vllm-worker` (an engine in a worker process: evaluation) and
`openai` (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

from pathlib import Path

from recipes.generation.backend import Completion, GenerationBackend, RefitBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "RefitBackend", "SamplingParams", "make_backend"]


def make_backend(name: str, model_dir: str | Path, **options) -> GenerationBackend:
    """`hf`, `vllm` (in this process), `vllm-worker` (in a worker process) or `openai`; `options` go to its class."""
    if name == "hf":
        from recipes.generation.hf import HFBackend

        return HFBackend(model_dir, **options)
    if name == "vllm":
        from recipes.generation.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **options)
    if name == "vllm-worker":
        from recipes.generation.vllm_worker import VLLMWorkerBackend

        return VLLMWorkerBackend(model_dir, **options)
    if name == "openai":
        from recipes.generation.openai_endpoint import OpenAIBackend

        return OpenAIBackend(model=str(model_dir), **options)
    raise ValueError(f"unknown generation backend {name!r} (hf, vllm, vllm-worker, openai)")
