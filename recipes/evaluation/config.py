"""Typed config of an evaluation run (`nemo_configs/eval/*.yaml`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from recipes.config import required
from recipes.evaluation.scaling import ScalingConfig


@dataclasses.dataclass
class PromptConfig:
    """What a problem is turned into before the model's chat template renders it: an optional system turn and the
    user turn. Each field left unset (None) is inherited: a benchmark's `prompt` from the run's `prompt`, that from
    the benchmark's default (`recipes.evaluation.prompts.default_prompt`)."""

    system: str | None = None  # the system turn as written ("": none, the template's own default applies)
    # the user turn: a str.format template whose only field is {problem}; literal braces doubled (\boxed{{}})
    user: str | None = None


@dataclasses.dataclass
class BenchmarkConfig:
    # math500 | aime24 | amc23 | gsm8k | minerva_math | olympiadbench | embedded | jsonl
    name: str = required()
    label: str | None = None  # the name in outputs and reports (default: name)
    path: str | None = None  # a JSONL file: required for `jsonl`, replaces a built-in file otherwise
    problem_field: str = "problem"  # `jsonl` only
    answer_field: str = "answer"  # `jsonl` only
    id_field: str | None = None  # `jsonl` only; the line number when unset
    limit: int | None = None  # the first N problems
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])  # embedded only
    n_per_level: int = 20  # embedded only
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)  # overrides the run's `prompt`


@dataclasses.dataclass
class GenerationConfig:
    backend: Literal["hf", "vllm", "openai"] = "vllm"
    k: int = 1  # samples per problem
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    # think / no-think through the model's template (None: the template's default); a mode the template cannot
    # switch to is an error naming what it supports
    thinking: bool | None = None
    batch_size: int = 64  # problems per generate call (and per resume checkpoint)
    seed: int = 0
    dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU
    max_model_len: int | None = None  # vllm
    # openai-compatible endpoint
    tokenizer: str | None = None  # the served model's tokenizer folder (its chat template renders the prompts)
    base_url: str | None = None
    # the name of the variable holding the key, never the key; null: an endpoint that needs no key (a local vLLM).
    # A variable named but not set is an error, not an empty key
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = 8
    request_timeout: float = 600.0
    # the run fails (non-zero exit, counts by error class in summary.json) when the endpoint gives no completion
    # for more than this share of a benchmark's problems; below it the failed problems are left out of the
    # metrics, counted in the summary, and asked again by the next run
    max_failed_fraction: float = 0.1
    # each <benchmark>.jsonl carries a fingerprint of what makes its samples (recipes.evaluation.runner
    # .samples_fingerprint): a rerun under other values is an error naming each; true sets the earlier samples
    # aside (kept) and makes them again
    allow_config_change: bool = False


@dataclasses.dataclass
class EvalConfig:
    # an HF model folder, a Megatron checkpoint (exported to HF on the fly), an HF config.json (that architecture
    # with random weights: the untrained baseline) or, for `openai`, the served name
    model: str | None = None
    # several models through one engine instead: {label: model}, each written to <output_dir>/<label>/; models of
    # one architecture and tokenizer swap weights in place (one engine start, ~25 s on 2 cores, for all of them)
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    init_seed: int = 1234  # the random weights' seed when `model` is a config.json
    benchmarks: list[BenchmarkConfig] = dataclasses.field(default_factory=list)
    data_root: str | None = None  # where built-in benchmarks are read (None: $NRR_DATA_ROOT, else the repository's)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)  # every benchmark's, unless it sets its own
    output_dir: str = "outputs/eval/run"
    run_name: str | None = None  # the name in reports (default: the output folder's name)
    grade_timeout: float = 5.0  # seconds the grading of one response may take on the math-verify path (all its calls)
    report: bool = True  # write report.html next to summary.json
    # also write <output_dir>/nemo_skills/<benchmark>/output[-rs<seed>].jsonl + metrics.json, as NeMo-Skills does
    nemo_skills_layout: bool = False
    progress: bool = True
    # test-time scaling: accuracy against tokens per problem (self-consistency and best-of-N over the k samples,
    # budget forcing at each thinking budget), in summary.json and the report (recipes/evaluation/scaling.py)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
