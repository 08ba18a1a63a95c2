"""Seeded sampling with vLLM on any batch size: one place for the two rules every caller must follow.

1. vLLM seeds a request's j-th sample with `seed + j`. Requests sharing one seed would share their
   noise streams, so every prompt gets its own seed, derived from the prompt itself (the same problem
   gets the same samples whatever batch it lands in; a resumed run replays them).
2. A prefill split across scheduler steps makes vLLM rewind the request's generator, which CPU
   generators cannot do ("CPU Generator does not use offset"). `generate` sends the requests in calls
   whose prefills all fit one scheduler step (`prefill_chunks`).
"""

from __future__ import annotations

import zlib


def prompt_seed(seed: int | None, prompt: str | list[int], n: int) -> int | None:
    """A per-prompt seed block [s, s + n) that depends on the run seed and the prompt only (None: unseeded)."""
    if seed is None:
        return None
    data = prompt.encode() if isinstance(prompt, str) else b",".join(str(t).encode() for t in prompt)
    return (seed * 1_000_003 + zlib.crc32(data) * max(n, 1)) % (2**62)


def prefill_chunks(llm, prompt_lengths: list[int], n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of requests whose n-fold prefills fit one scheduler step together."""
    sched = llm.llm_engine.vllm_config.scheduler_config
    ranges, lo, tokens = [], 0, 0
    for i, length in enumerate(prompt_lengths):
        if i > lo and (tokens + length * n > sched.max_num_batched_tokens or (i - lo + 1) * n > sched.max_num_seqs):
            ranges.append((lo, i))
            lo, tokens = i, 0
        tokens += length * n
    ranges.append((lo, len(prompt_lengths)))
    return ranges


def generate(llm, requests: list, params: list, prompt_lengths: list[int], n: int) -> list:
    """`llm.generate(requests, params)` (one SamplingParams per request), in calls sized by `prefill_chunks`."""
    outputs = []
    for lo, hi in prefill_chunks(llm, prompt_lengths, n):
        outputs += llm.generate(requests[lo:hi], params[lo:hi], use_tqdm=False)
    return outputs
