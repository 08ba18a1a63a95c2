"""The generation interface every sampling stage uses: completions cut the same way for every backend, and a
prompt as text or as its token ids gives the same samples."""

from recipes import response_format as rf
from recipes import tokenizer
from recipes.generation import Completion, SamplingParams, make_backend
from recipes.generation.backend import to_completion

tok = tokenizer.load()  # the embedded students' byte-level tokenizer
EOS, END_OF_TEXT = tok.stop_ids[0], tok.hf.convert_tokens_to_ids("<|endoftext|>")


def test_completion_cuts_at_the_first_stop_token_and_keeps_it_out_of_the_text():
    a, b = tok.encode("12"), tok.encode("ab")
    stops = {EOS, END_OF_TEXT}
    c = to_completion(a + [END_OF_TEXT] + b + [EOS], stops, 100, tok.decode)
    assert c.token_ids == a + [END_OF_TEXT] and c.text == "12" and c.finish_reason == "stop"
    assert c.num_tokens == 3 and not c.truncated
    long = to_completion(a + b, stops, 3, tok.decode)
    assert long.token_ids == a + b[:1] and long.text == "12a" and long.truncated
    assert Completion([], "x", "stop", num_tokens=7).num_tokens == 7  # an endpoint's count
    # think tags stay in the text (rewards read them)
    from recipes.rl.rewards import RewardsConfig, Sample, format_reward

    text = rf.format_response("1+2;3", "\\boxed{3}")
    c = to_completion(tok.encode(text) + [EOS] + b, stops, 100, tok.decode)
    assert c.text == text and format_reward(Sample(c.text), RewardsConfig()) == 1.0


def test_text_and_token_id_prompts_give_the_same_samples(tiny_model):
    backend = make_backend("hf", tiny_model, batch_size=4)
    prompts = [tok.render([{"role": "user", "content": "12+7"}], add_generation_prompt=True),
               tok.render([{"role": "user", "content": "3*4"}], add_generation_prompt=True, enable_thinking=False)]
    for params in (SamplingParams(n=1, max_tokens=12), SamplingParams(n=3, temperature=0.9, max_tokens=12, seed=5)):
        as_text = backend.generate(prompts, params)
        as_ids = backend.generate([tok.encode(p) for p in prompts], params)
        assert as_text == as_ids and [len(group) for group in as_text] == [params.n] * 2
        for group in as_text:
            for c in group:
                assert c.text == tok.decode([t for t in c.token_ids if t != EOS])
                assert c.truncated == (EOS not in c.token_ids) and c.num_tokens <= 12
    sampled = backend.generate(prompts, SamplingParams(n=3, temperature=0.9, max_tokens=12, seed=6))
    assert sampled != as_text  # another seed, other samples
    backend.close()


def test_rollout_engine_settings_reach_vllm_arguments():
    """Every engine key of the rollout config changes what vLLM's LLM(...) receives (CPU and GPU rules)."""
    import pytest

    from recipes.generation.vllm_engine import llm_kwargs
    from recipes.rl.rollout import RolloutConfig, engine_options

    def kwargs(cpu, **cfg):
        opts = engine_options(RolloutConfig(**cfg), max_model_len=256, seed=3)
        del opts["in_process"], opts["cpu_threads"]  # VLLMEngine's own, not vLLM's
        return llm_kwargs("m", cpu=cpu, **opts)

    cpu, gpu = kwargs(True), kwargs(False)
    assert (cpu["dtype"], gpu["dtype"]) == ("float32", "bfloat16")  # dtype: auto
    assert cpu["kv_cache_memory_bytes"] == 256 * 2**20 and "gpu_memory_utilization" not in cpu
    # on GPU an explicit KV size would override gpu_memory_utilization, so only the latter goes
    assert gpu["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in gpu
    assert "tensor_parallel_size" not in gpu and "enable_sleep_mode" not in gpu
    assert cpu["load_format"] == "dummy" and cpu["max_model_len"] == 256 and cpu["seed"] == 3
    assert cpu["logprobs_mode"] == "processed_logprobs"  # the sampled distribution's log-probs (temperature applied)
    assert kwargs(True, dtype="bfloat16")["dtype"] == "bfloat16"
    assert kwargs(True, kv_cache_mb=64)["kv_cache_memory_bytes"] == 64 * 2**20
    assert kwargs(False, gpu_memory_utilization=0.3)["gpu_memory_utilization"] == 0.3
    assert kwargs(False, tensor_parallel_size=4)["tensor_parallel_size"] == 4
    assert kwargs(False, colocated_sleep=True)["enable_sleep_mode"] is True
    assert kwargs(True, enforce_eager=False)["enforce_eager"] is False
    with pytest.raises(ValueError, match="colocated_sleep=true needs a GPU"):
        kwargs(True, colocated_sleep=True)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kwargs(False, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="vLLM settings"):
        engine_options(RolloutConfig(backend="hf", colocated_sleep=True))
    assert engine_options(RolloutConfig(backend="hf", dtype="bfloat16"))["dtype"] == "bfloat16"
    assert RolloutConfig().sampling(4, seed=1).logprobs  # rollouts ask for the sampled tokens' log-probs


def test_completion_logprobs_are_cut_with_the_tokens():
    a = tok.encode("12")
    c = to_completion(a + [EOS] + [5, 6], {EOS}, 100, tok.decode, [-0.1, -0.2, -0.3, -0.4, -0.5])
    assert c.token_ids == a + [EOS] and c.logprobs == [-0.1, -0.2, -0.3]
    long = to_completion(a + [5, 6], {EOS}, 3, tok.decode, [-0.1, -0.2, -0.3, -0.4])
    assert long.logprobs == [-0.1, -0.2, -0.3] and to_completion(a, {EOS}, 3, tok.decode).logprobs is None
