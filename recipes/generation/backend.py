"""The generation interface: sampling parameters, a completion, the backend protocol and its factory.

A completion's text is always the tokenizer's decoding of its token ids without the stop token, whatever
the backend, so rewards, rejection sampling and evaluation read the same text for the same tokens. With
`SamplingParams(logprobs=True)` a backend that knows them (vLLM) also returns each sampled token's log-prob
under the distribution it sampled from (`Completion.logprobs`, aligned with `token_ids`); GRPO compares them
with the trainer's (train/inference mismatch) and may reweight by them (truncated importance sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol, Union

Prompt = Union[str, list[int]]  # rendered text, or its token ids


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    logprobs: bool = False  # also return the sampled tokens' log-probs (where the backend has them)


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # response tokens, the stop token included when the model stopped by itself
    text: str  # the response without its stop token (think tags and other special tokens kept)
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_tokens)
    num_tokens: int | None = None  # set where token ids are unknown (an endpoint); else len(token_ids)
    logprobs: list[float] | None = None  # per token of token_ids, when requested and known

    def __post_init__(self):
        if self.num_tokens is None:
            self.num_tokens = len(self.token_ids)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def to_completion(ids: list[int], stop_ids: set[int], max_tokens: int, decode,
                  logprobs: list[float] | None = None) -> Completion:
    """Cut a generated sequence at its first stop token (kept in `token_ids`, not in `text`), or at max_tokens;
    `logprobs` (one per id) are cut alike."""
    stop = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    end = stop + 1 if stop is not None else max_tokens
    lps = None if logprobs is None else list(logprobs[:end])
    if stop is not None:
        return Completion(ids[:end], decode(ids[:stop]), "stop", logprobs=lps)
    return Completion(ids[:end], decode(ids[:end]), "length", logprobs=lps)


def stop_ids(model_dir, hf_tokenizer) -> set[int]:
    """The ids that end a response (`ChatTokenizer.stop_ids`: generation_config.json's eos ids and the eos)."""
    from recipes.tokenizer import ChatTokenizer

    return set(ChatTokenizer(hf_tokenizer, model_dir).stop_ids)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]: ...

    def count_tokens(self, text: str) -> int | None: ...  # None: no tokenizer (an endpoint without one)

    def close(self) -> None: ...


class RefitBackend(GenerationBackend, Protocol):
    """A backend whose weights a trainer replaces in memory (`hf`, `vllm`; vLLM also takes them bucket by bucket,
    `load_buckets`, which `recipes.rl.refit` prefers where a backend has it)."""

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> None: ...  # HF-named tensors

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]: ...


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def resolve_dtype(dtype: str) -> str:
    return ("float32" if on_cpu() else "bfloat16") if dtype == "auto" else dtype
