"""The seeding and chunking rules of recipes.generation.vllm_batching, against hand-worked cases."""

from types import SimpleNamespace

from recipes.generation.vllm_batching import prefill_chunks, prompt_seed


def _llm(max_tokens: int, max_seqs: int):
    sched = SimpleNamespace(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs)
    return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(scheduler_config=sched)))


def test_prefill_chunks_respect_token_and_sequence_budgets():
    # n=4: request prefills 40, 40, 40, 80, 20 tokens; budget 100 tokens -> [0,2) 80, [2,3) 40+80>100 ...
    assert prefill_chunks(_llm(100, 256), [10, 10, 10, 20, 5], 4) == [(0, 2), (2, 3), (3, 5)]
    # the sequence cap: 3 requests x n=4 = 12 > 8 sequences
    assert prefill_chunks(_llm(10_000, 8), [1, 1, 1, 1, 1], 4) == [(0, 2), (2, 4), (4, 5)]
    # a request bigger than the budget still goes alone (vLLM splits it; nothing else is in its step)
    assert prefill_chunks(_llm(100, 256), [10, 200, 10], 1) == [(0, 1), (1, 2), (2, 3)]
    assert prefill_chunks(_llm(100, 256), [], 8) == [(0, 0)]


def test_prompt_seeds_are_per_prompt_and_reproducible():
    a, b = prompt_seed(7, "1+2", 8), prompt_seed(7, "3*4", 8)
    assert a == prompt_seed(7, "1+2", 8) and a != b
    assert prompt_seed(8, "1+2", 8) != a  # another run seed, another stream
    assert prompt_seed(7, [1, 2, 3], 8) == prompt_seed(7, [1, 2, 3], 8) != prompt_seed(7, [1, 2, 4], 8)
    assert prompt_seed(None, "1+2", 8) is None
    # blocks [s, s+n) of different prompts do not overlap for this pair
    assert abs(a - b) >= 8
