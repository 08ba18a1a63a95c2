"""What each benchmark asks the model: a system turn and a user template, then the model's own chat template.

A prompt is a `PromptConfig` (system, user); every field left unset is inherited, the benchmark's own `prompt`
first, then the run's `prompt`, then the benchmark's default. The defaults are the prompts every earlier run used,
so results stay comparable: the math benchmarks put the step-by-step / boxed-answer instruction after the problem,
the embedded task is the bare expression, and neither has a system turn (the template's own default applies, e.g.
Qwen2.5's "You are Qwen, ..."). The user template is a `str.format` template whose only field is `{problem}`;
literal braces are doubled (`\\boxed{{}}`), as in NeMo-Skills' prompt configs. The system turn is plain text.
"""

from __future__ import annotations

import string

from recipes.config import ConfigError
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, PromptConfig

MATH = PromptConfig(user="{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.")
BARE = PromptConfig(user="{problem}")
# NeMo-Skills' default prompt for its math benchmarks (math-500, aime24, amc23, gsm8k, ...), the user turn of
# nemo_skills/prompt/config/generic/math.yaml (NVIDIA/NeMo-Skills, checked at commit 0b012df, Nov 2025), without
# its `{examples}` field: few-shot examples, empty unless a run configures some. It has no system turn.
NEMO_SKILLS_GENERIC_MATH = PromptConfig(
    user="Solve the following math problem. Make sure to put the answer (and only answer) inside \\boxed{{}}.\n\n"
         "{problem}")


def default_prompt(benchmark: str) -> PromptConfig:
    return BARE if benchmark == "embedded" else MATH


def resolve(bench: BenchmarkConfig, run: PromptConfig) -> PromptConfig:
    """The prompt a benchmark is evaluated with: each field from the benchmark, else the run, else the default."""
    layers = (bench.prompt, run, default_prompt(bench.name))
    pick = lambda field: next((getattr(p, field) for p in layers if getattr(p, field) is not None), None)  # noqa: E731
    return PromptConfig(system=pick("system"), user=pick("user"))


def check_template(template: str | None, key: str) -> None:
    """A ConfigError naming `key` unless the template formats with `{problem}` and nothing else."""
    if template is None:
        return
    doubled = "write literal braces doubled, e.g. \\boxed{{}}"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{key}: not a valid template ({err}); {doubled}: {template!r}") from None
    for name, spec, conv in fields:
        if name != "problem" or spec or conv:
            field = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{key}: unknown field {field}; the only field is {{problem}} ({doubled}): {template!r}")
    if not fields:
        raise ConfigError(f"{key}: the template has no {{problem}} field, so the model would never see the problem: "
                          f"{template!r}")


def check_prompts(cfg: EvalConfig) -> None:
    """Every configured user template of a run, each error naming its key."""
    check_template(cfg.prompt.user, "prompt.user")
    for i, bench in enumerate(cfg.benchmarks):
        check_template(bench.prompt.user, f"benchmarks[{i}].prompt.user")


def messages(problem: str, prompt: PromptConfig) -> list[dict]:
    """The conversation for one problem (a resolved prompt): the system turn when set, then the user turn."""
    turns = [{"role": "system", "content": prompt.system}] if prompt.system else []
    return turns + [{"role": "user", "content": prompt.user.format(problem=problem)}]
