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
