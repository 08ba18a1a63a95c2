"""The generation interface every sampling stage uses: completions cut the same way for every backend, and a
prompt as text or as its token ids gives the same samples."""

import subprocess
import sys
from pathlib import Path

import pytest

from recipes import chat_template as ct
from recipes import tokenizer as tok
from recipes.generation import Completion, SamplingParams, make_backend
from recipes.generation.backend import to_completion

ROOT = Path(__file__).resolve().parents[1]


def test_completion_cuts_at_the_first_stop_token_and_keeps_it_out_of_the_text():
    a, b = tok.encode("12"), tok.encode("ab")
    stops = {tok.eos_id(), tok.token_id(ct.EOS)}
    c = to_completion(a + [tok.token_id(ct.EOS)] + b + [tok.eos_id()], stops, 100, tok.decode)
    assert c.token_ids == a + [tok.token_id(ct.EOS)] and c.text == "12" and c.finish_reason == "stop"
    assert c.num_tokens == 3 and not c.truncated
    long = to_completion(a + b, stops, 3, tok.decode)
    assert long.token_ids == a + b[:1] and long.text == "12a" and long.truncated
    assert Completion([], "x", "stop", num_tokens=7).num_tokens == 7  # an endpoint's count


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    nrr = [sys.executable, "-m", "recipes.cli", "convert"]
    subprocess.run([*nrr, "init", "--config", str(ROOT / "recipes/assets/models/tiny-qwen2/config.json"),
                    "--out", str(out / "ckpt"), "--seed", "3"], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([*nrr, "to-hf", "--ckpt", str(out / "ckpt"), "--out", str(out / "hf")], check=True, cwd=ROOT,
                   capture_output=True)
    return out / "hf"


def test_text_and_token_id_prompts_give_the_same_samples(tiny_hf):
    backend = make_backend("hf", tiny_hf, batch_size=4)
    prompts = [ct.render_prompt("12+7"), ct.render_prompt("3*4", enable_thinking=False)]
    for params in (SamplingParams(n=1, max_tokens=12), SamplingParams(n=3, temperature=0.9, max_tokens=12, seed=5)):
        as_text = backend.generate(prompts, params)
        as_ids = backend.generate([tok.encode(p) for p in prompts], params)
        assert as_text == as_ids and [len(group) for group in as_text] == [params.n] * 2
        for group in as_text:
            for c in group:
                assert c.text == tok.decode([t for t in c.token_ids if t != tok.eos_id()])
                assert c.truncated == (tok.eos_id() not in c.token_ids) and c.num_tokens <= 12
    sampled = backend.generate(prompts, SamplingParams(n=3, temperature=0.9, max_tokens=12, seed=6))
    assert sampled != as_text  # another seed, other samples
    backend.close()
