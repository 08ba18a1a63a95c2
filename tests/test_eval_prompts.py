"""Evaluation prompts: a prompt config per benchmark, rendered by the model's own chat template.

Checked on the text the backend receives: the transformers backend's `generate` for four family-shaped models,
and once the prompts vLLM itself received in the evaluation's worker process. The embedded demo's and the math
benchmarks' default prompts render exactly as before the prompt config existed."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from recipes.cli import main as nrr
from recipes.config import ConfigError, load_config
from recipes.evaluation import prompts, run_eval, runner
from recipes.evaluation.benchmarks import load_benchmark
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig, PromptConfig
from recipes.tokenizer import load as load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT / "recipes/assets/data/benchmarks/math500.jsonl"
SYSTEM = "You are a careful mathematician."
NS_MATH = "Solve the following math problem. Make sure to put the answer (and only answer) inside \\boxed{}.\n\n"
STEP_BY_STEP = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def _math500(n: int = 3) -> list[str]:
    return [json.loads(line)["problem"] for line in MATH500.read_text().splitlines()[:n]]


# Each family's published template, written out by hand: system turn (None: the template's default), user turn.
def _qwen25(system, user):
    system = system or "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _qwen3(system, user):
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _llama31(system, user):
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system or ''}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _r1(system, user):
    return f"<｜begin▁of▁sentence｜>{system or ''}<｜User｜>{user}<｜Assistant｜><think>\n"


EXPECTED = {"qwen2.5": _qwen25, "qwen3": _qwen3, "llama3.1": _llama31, "r1-distill": _r1}


def _config(model, out, **gen) -> EvalConfig:
    """MATH-500[:3] twice: with the run's prompt (NeMo-Skills' generic math), and with a system turn of its own."""
    return EvalConfig(
        model=str(model), prompt=prompts.NEMO_SKILLS_GENERIC_MATH,
        benchmarks=[BenchmarkConfig(name="math500", limit=3),
                    BenchmarkConfig(name="math500", label="math500-system", limit=3,
                                    prompt=PromptConfig(system=SYSTEM))],
        generation=GenerationConfig(**{"backend": "hf", "k": 1, "temperature": 0.0, "max_tokens": 4, **gen}),
        output_dir=str(out), report=False, progress=False, nemo_skills_layout=True)


# ------------------------------------------------------------------------------ defaults, unchanged


def test_embedded_demo_prompt_renders_as_before():
    """nemo_configs/eval/embedded.yaml (the demo's evaluation) on the embedded students' template: the bare
    expression as the only turn, as every earlier run asked it."""
    cfg = load_config(EvalConfig, ROOT / "nemo_configs/eval/embedded.yaml")
    bench = cfg.benchmarks[0]
    first = load_benchmark(dataclasses.replace(bench, limit=1))[0]
    prompt = prompts.resolve(bench, cfg.prompt)
    assert prompt == PromptConfig(system=None, user="{problem}")
    text = runner._prompt(first, prompt, cfg.generation, load_tokenizer())
    assert text == "<|im_start|>user\n2+55<|im_end|>\n<|im_start|>assistant\n"


def test_math_default_prompt_renders_as_before():
    """nemo_configs/eval/math.yaml: the problem, then the step-by-step / boxed instruction, no system turn."""
    cfg = load_config(EvalConfig, ROOT / "nemo_configs/eval/math.yaml")
    bench = cfg.benchmarks[0]
    first = load_benchmark(dataclasses.replace(bench, limit=1))[0]
    text = runner._prompt(first, prompts.resolve(bench, cfg.prompt), cfg.generation, load_tokenizer())
    assert text == ("<|im_start|>user\nConvert the point $(0,3)$ in rectangular coordinates to polar coordinates.  "
                    "Enter your answer in the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$"
                    f"{STEP_BY_STEP}<|im_end|>\n<|im_start|>assistant\n")


def test_shipped_configs_load_and_the_nemo_skills_one_asks_its_generic_math_prompt():
    for path in sorted((ROOT / "nemo_configs/eval").glob("*.yaml")):
        prompts.check_prompts(load_config(EvalConfig, path))
    cfg = load_config(EvalConfig, ROOT / "nemo_configs/eval/math_nemo_skills.yaml")
    assert cfg.prompt == prompts.NEMO_SKILLS_GENERIC_MATH and cfg.nemo_skills_layout
    assert prompts.messages("P", cfg.prompt) == [{"role": "user", "content": NS_MATH + "P"}]


def test_prompt_fields_inherit_benchmark_then_run_then_default():
    run = PromptConfig(system="run system")
    assert prompts.resolve(BenchmarkConfig(name="gsm8k"), run) == PromptConfig("run system", prompts.MATH.user)
    own = BenchmarkConfig(name="embedded", prompt=PromptConfig(system="", user="Q: {problem}"))
    assert prompts.resolve(own, run) == PromptConfig("", "Q: {problem}")
    assert prompts.messages("1+1", prompts.resolve(own, run)) == [{"role": "user", "content": "Q: 1+1"}]
    assert prompts.messages("x{y}", prompts.NEMO_SKILLS_GENERIC_MATH)[0]["content"] == NS_MATH + "x{y}"


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("override, message", [  # YAML values: quoted, as on a shell command line
    ("prompt.user='Solve it.'", r"prompt.user: the template has no \{problem\} field"),
    ("prompt.user='Solve {question}'", r"prompt.user: unknown field \{question\}; the only field is \{problem\}"),
    ("prompt.user='{problem} in \\boxed{}'", r"prompt.user: unknown field \{\}.*doubled"),
    ("prompt.user='{problem!r}'", r"prompt.user: unknown field \{problem!r\}"),
    ("prompt.user='{problem'", r"prompt.user: not a valid template"),
    ("benchmarks=[{name: embedded, prompt: {user: '{problem} {examples}'}}]",
     r"benchmarks\[0\]\.prompt\.user: unknown field \{examples\}"),
])
def test_bad_user_template_is_a_config_error_naming_the_key(override, message, tmp_path, capsys):
    out = tmp_path / "never"
    cfg = load_config(EvalConfig, ROOT / "nemo_configs/eval/embedded.yaml", [override, f"output_dir={out}"])
    with pytest.raises(ConfigError, match=message):
        run_eval(cfg)
    args = ["eval", "run", "--config", str(ROOT / "nemo_configs/eval/embedded.yaml"), override, f"output_dir={out}"]
    assert nrr(args) == 2
    assert "config error: " in capsys.readouterr().err
    assert not out.exists()  # failed before anything was written or loaded


def test_unknown_prompt_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'prompt.sytem' \(did you mean 'prompt.system'\?\)"):
        load_config(EvalConfig, ROOT / "nemo_configs/eval/embedded.yaml", ["prompt.sytem=x"])


# ------------------------------------------------------------------------------ the text the backends receive


@pytest.fixture(scope="module")
def hf_prompts(families, tmp_path_factory):
    """{family: (prompts each generate() call of the transformers backend received, run output folder)}."""
    from recipes.generation.hf import HFBackend

    received: list[list[str]] = []
    generate = HFBackend.generate
    mp = pytest.MonkeyPatch()
    mp.setattr(HFBackend, "generate", lambda self, ps, params: received.append(list(ps)) or generate(self, ps, params))
    out = {}
    try:
        for name in EXPECTED:
            received.clear()
            folder = tmp_path_factory.mktemp(f"prompts-{name}")
            run_eval(_config(families[name], folder))
            out[name] = ([p for call in received for p in call], folder)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("family", list(EXPECTED))
def test_hf_backend_receives_the_models_own_template(family, hf_prompts, families):
    received, out = hf_prompts[family]
    users = [NS_MATH + p for p in _math500()]
    assert received == [EXPECTED[family](None, u) for u in users] + [EXPECTED[family](SYSTEM, u) for u in users]
    tok = load_tokenizer(families[family])  # the same as the template applied through the tokenizer
    assert received[0] == tok.render([{"role": "user", "content": users[0]}], add_generation_prompt=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == {"math500": {"system": None, "user": prompts.NEMO_SKILLS_GENERIC_MATH.user},
                                  "math500-system": {"system": SYSTEM, "user": prompts.NEMO_SKILLS_GENERIC_MATH.user}}
    generations = [json.loads(line)["generation"] for line in (out / "math500.jsonl").read_text().splitlines()]
    if family == "r1-distill":  # the prompt opened the think block: the record puts the tag back
        assert all(g.startswith("<think>\n") for g in generations)


def test_thinking_the_template_cannot_honour_fails_before_the_model_loads(families, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "make_backend", lambda cfg, d: pytest.fail("the backend started"))
    with pytest.raises(ConfigError, match=r"generation.thinking=False: .*qwen2.5: the chat template cannot honour "
                                          r"enable_thinking=False; it supports no think switch"):
        run_eval(_config(families["qwen2.5"], tmp_path, thinking=False))


# ------------------------------------------------------------------------------ through vLLM

# Loaded into the vLLM worker process by PYTHONPATH: records what vLLM itself received for every request
# (RequestOutput.prompt and .prompt_token_ids) to the file $NRR_TEST_VLLM_PROMPTS. No code path changes.
HOOK = '''
import json, os
if os.environ.get("NRR_TEST_VLLM_PROMPTS"):
    import recipes.generation.vllm_batching as batching
    _generate = batching.generate
    def generate(llm, requests, params, prompt_lengths, n):
        outputs = _generate(llm, requests, params, prompt_lengths, n)
        with open(os.environ["NRR_TEST_VLLM_PROMPTS"], "a", encoding="utf-8") as f:
            for o in outputs:
                f.write(json.dumps({"ids": list(o.prompt_token_ids)}) + "\\n")
        return outputs
    batching.generate = generate
'''


@pytest.fixture(scope="module")
def vllm_run(families, tmp_path_factory):
    """The Llama 3.1 family model evaluated through `backend: vllm`, with the token ids vLLM received recorded."""
    base = tmp_path_factory.mktemp("vllm-prompts")
    model = families["llama3.1"]
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(HOOK)
    log = base / "received.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(base / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    mp.setenv("NRR_TEST_VLLM_PROMPTS", str(log))
    try:
        run_eval(_config(model, base / "run", backend="vllm"))
    finally:
        mp.undo()
    return model, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_worker_receives_the_models_own_template_without_an_added_bos(vllm_run):
    """The ids vLLM received are the template's text tokenized as it is: one <|begin_of_text|>, written by the
    template (vLLM's own tokenization of the text would add a second)."""
    model, received = vllm_run
    tok = load_tokenizer(model)
    users = [NS_MATH + p for p in _math500()]
    expected = [_llama31(None, u) for u in users] + [_llama31(SYSTEM, u) for u in users]
    assert [tok.decode(r["ids"]) for r in received] == expected
    assert [r["ids"] for r in received] == [tok.encode(text) for text in expected]
    assert all(r["ids"].count(r["ids"][0]) == 1 for r in received)  # the bos once


def test_an_endpoints_prompts_render_with_generation_tokenizer(tmp_path):
    """openai backend: generation.tokenizer names the served model's tokenizer folder; a served name alone is an
    error naming the key."""
    from recipes.evaluation.runner import endpoint_tokenizer
    from recipes.tokenizer import EMBEDDED_MODEL

    gen = GenerationConfig(backend="openai", base_url="http://127.0.0.1:1/v1", tokenizer=str(EMBEDDED_MODEL))
    assert endpoint_tokenizer(EvalConfig(model="served-name", generation=gen)) == EMBEDDED_MODEL
    with pytest.raises(ValueError, match="generation.tokenizer: the openai backend serves 'served-name'"):
        endpoint_tokenizer(EvalConfig(model="served-name", generation=GenerationConfig(backend="openai")))
