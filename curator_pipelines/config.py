"""The typed config of a curation run (`nemo_configs/curate/*.yaml`), one section per stage."""

from __future__ import annotations

import dataclasses
from typing import Literal

from recipes.data.catalog import BENCHMARKS


@dataclasses.dataclass
class InputConfig:
    """Where the problems come from and which fields hold what."""

    path: str | None = None  # a .jsonl / .parquet file, or a folder saved by `datasets`
    dataset: str | None = None  # or a dataset of the data root by name (`nrr data list`), e.g. gsm8k_train
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    id_field: str | None = "id"  # None: ids are `<file stem>-<line>`
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_regex: str | None = None  # take group 1 of this regex from the answer field (GSM8K: '####')
    solution_field: str | None = None  # a human-written solution, for `generation.source: solution`
    extra_fields: list[str] = dataclasses.field(default_factory=list)  # carried into the output
    limit: int = 0  # 0: every record
    on_bad_record: Literal["error", "skip"] = "error"  # skip: quarantine it and go on
    # a trace dataset (`generation.source: traces`) is read by recipes.data.schemas, not by the fields above:
    schema: str = "auto"  # openr1, nemotron, openthoughts, numina, messages, pair, record; auto: from the columns
    fields: dict[str, str] = dataclasses.field(default_factory=dict)  # our field name -> the dataset's column


@dataclasses.dataclass
class EmbeddedProblemsConfig:
    """Write the embedded task's train problems to `input.path` before the run."""

    enabled: bool = False
    levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    n_per_level: int = 500
    seed: int = 0
    contamination_rate: float = 0.0  # share swapped for held-out (evaluation) problems
    extra_heldout_levels: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TeacherRequestConfig:
    """The teacher behind an OpenAI-compatible endpoint (or human solutions, `source: solution`, or no teacher:
    the input is a dataset of finished traces, curated as it is, `source: traces`)."""

    source: Literal["endpoint", "solution", "traces"] = "endpoint"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "nrr-embedded-teacher"
    api_key_env: str | None = None  # name of the env var holding the key (never the key itself)
    embedded_teacher: bool = False  # start `nrr teacher serve` for this run (base_url is then ignored)
    teacher_config: str = "nemo_configs/teacher/embedded.yaml"
    teacher_overrides: list[str] = dataclasses.field(default_factory=list)
    n_samples: int = 2
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    system_prompt: str | None = None
    prompt_template: str = "{problem}"  # the user message
    seed: int = 0  # request seed = seed + sample index (reproducible sampling where supported)
    concurrency: int = 16
    timeout_s: float = 30.0  # per request
    max_retries: int = 5  # after the first attempt, on 429 / 5xx / timeouts / connection errors
    backoff_s: float = 0.5  # first retry delay, doubled each retry (with jitter), capped below
    backoff_max_s: float = 8.0
    # the run fails (non-zero exit, counts by error class in the report) when more than this share of its
    # (problem, sample) requests end failed after their retries; 0: any failure fails the run, 1: never
    max_failed_fraction: float = 0.1
    teacher_name: str | None = None  # provenance label; default: the model name (traces: the rows' own, else None)
    # generations.jsonl carries a fingerprint of what makes them (GENERATION_KEYS, the input file): a rerun under
    # other values is an error naming each; true sets the earlier generations aside (kept) and makes them again
    allow_config_change: bool = False


@dataclasses.dataclass
class FilterConfig:
    """Each filter is its own stage; `enabled: false` skips it."""

    truncation: bool = True  # empty responses and finish_reason == "length"
    format: bool = True  # one closed think block, an answer present
    correctness: bool = True  # the answer graded against the reference (recipes.grader)
    grade_timeout_s: float = 5.0  # seconds the grading of one response may take on the math-verify path
    # a record without a reference (a trace dataset's chat or code rows) cannot be verified: keep it (counted as
    # "unverified" in the report) or drop it
    unverified: Literal["keep", "drop"] = "drop"
    length: bool = True
    max_tokens: int = 512  # prompt + response, rendered with the student's chat template
    # the student's tokenizer folder (an HF model or tokenizer folder); None: the embedded students'
    student_tokenizer: str | None = None
    min_response_tokens: int = 1
    repetition: bool = True
    ngram_chars: int = 12  # looping: a character n-gram repeated...
    max_ngram_repeats: int = 3  # ...more than this many times
    max_repeated_fraction: float = 0.5  # or more than this share of the think covered by repeats
    language: bool = True
    allowed_scripts: list[str] = dataclasses.field(default_factory=lambda: ["LATIN", "GREEK"])
    max_foreign_ratio: float = 0.0  # share of letters outside allowed_scripts
    min_foreign_chars: int = 2


@dataclasses.dataclass
class DedupConfig:
    exact: bool = True
    fuzzy: bool = True
    backend: Literal["auto", "cpu", "gpu"] = "auto"  # auto, cpu: the CPU stages; gpu: refused (Curator cuDF dedup is not part of this pipeline)
    num_perm: int = 128
    shingle_chars: int = 3
    threshold: float = 0.8  # Jaccard similarity of problem + response shingles
    lsh_threshold: float = 0.5  # candidate threshold (LSH), every candidate is then verified


@dataclasses.dataclass
class DecontamConfig:
    enabled: bool = True
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: list(BENCHMARKS))  # datasets of the data root
    benchmark_paths: list[str] = dataclasses.field(default_factory=list)  # other JSONL files of problems
    ngram: int = 13  # word n-grams; shorter problems must match a benchmark problem whole
    embedded_heldout: bool = True  # recipes.task.heldout_problems
    heldout_levels: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    heldout_per_level: int = 1000


@dataclasses.dataclass
class SelectConfig:
    max_per_problem: int = 2  # correct traces kept per problem
    prefer_distinct: bool = True
    order: Literal["curriculum", "input", "shuffle"] = "curriculum"  # curriculum: shortest first
    think_off_ratio: float = 0.0  # share of records turned into no-think answers, interleaved
    easy_pass_rate: float = 0.8  # difficulty buckets from the teacher's pass rate
    hard_pass_rate: float = 0.3
    seed: int = 0


@dataclasses.dataclass
class OutputConfig:
    jsonl: bool = True
    parquet: bool = True
    histograms: bool = True


@dataclasses.dataclass
class ExecutorConfig:
    name: Literal["ray_data", "xenna"] = "ray_data"  # xenna runs in batch mode (streaming needs more cores)
    num_cpus: int = 2


@dataclasses.dataclass
class CurateConfig:
    name: str = "curate"
    output_dir: str = "runs/curate/embedded"  # curated.jsonl / .parquet, the report and the run's own files
    data_root: str | None = None  # where named datasets are read (None: $NRR_DATA_ROOT, else the repository's)
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    embedded_problems: EmbeddedProblemsConfig = dataclasses.field(default_factory=EmbeddedProblemsConfig)
    generation: TeacherRequestConfig = dataclasses.field(default_factory=TeacherRequestConfig)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    decontam: DecontamConfig = dataclasses.field(default_factory=DecontamConfig)
    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    executor: ExecutorConfig = dataclasses.field(default_factory=ExecutorConfig)
