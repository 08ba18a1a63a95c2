"""The curation pipeline: a NeMo Curator `Pipeline` of one stage per concern, and how a run is set up.

    read -> generate -> parse -> filter_* -> dedup_exact -> dedup_fuzzy -> decontam -> select -> write -> report

With `generation.source: traces` the input is a dataset of finished traces and `read` (`ReadTracesStage`)
stands for read + generate: the traces are curated as they are, through the same stages.

The reader emits the whole problem set as one `DocumentBatch`, so the global stages (dedup,
selection) see every record. A run gets its own Ray session (`curator_pipelines.ray_session`). With
`embedded_teacher`, the teacher server runs as a child process for the length of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from curator_pipelines.config import CurateConfig
from curator_pipelines.ray_session import ray_session
from recipes.config import ConfigError
from recipes.data import catalog

RESULTS_FILE = "generations.jsonl"
RESULTS_FINGERPRINT = "generations.fingerprint.json"
QUARANTINE_FILE = "quarantine.jsonl"
# What a teacher's responses depend on (n_samples is not: sample i is asked the same way whatever the count, so
# more samples reuse the earlier ones; nor are the client's concurrency, timeouts and retries). With the embedded
# teacher, base_url is a new free port each run: its config (teacher_config + teacher_overrides) stands for it.
GENERATION_KEYS = ("source", "model", "system_prompt", "prompt_template", "temperature", "top_p", "max_tokens",
                   "seed")
INPUT_KEYS = ("format", "id_field", "problem_field", "answer_field", "answer_regex")
# the embedded teacher's settings its responses do not depend on
TEACHER_AS_IS = ("host", "port", "latency_s", "log_path", "auth_key_env", "faults")


# ------------------------------------------------------------------ set-up


def resolve_paths(cfg: CurateConfig, root: Path | None = None) -> CurateConfig:
    """Absolute paths (Ray workers do not share the driver's working directory)."""
    root = root or Path.cwd()

    def absolute(p: str | None) -> str | None:
        return None if p is None else str((root / p).resolve())

    cfg = dataclasses.replace(cfg, data_root=absolute(cfg.data_root))
    check_input(cfg)
    if not 0.0 <= cfg.generation.max_failed_fraction <= 1.0:
        raise ConfigError(f"generation.max_failed_fraction={cfg.generation.max_failed_fraction}: a share of the "
                          "requests, between 0 (any failure fails the run) and 1 (never)")
    path = absolute(cfg.input.path)
    if cfg.input.dataset:
        named = str(catalog.path_of(cfg.input.dataset, cfg.data_root).resolve())
        if path not in (None, named):  # a resolved config (its saved copy) holds both, naming one file
            raise ConfigError(f"input: set one of `path` and `dataset`, not both (path={cfg.input.path!r}, "
                              f"dataset={cfg.input.dataset!r}); to read a file instead, add input.dataset=null")
        path = named
    elif path is None:
        raise ConfigError("input: set `path` (a .jsonl / .parquet file or a datasets folder) or `dataset` "
                          "(a name from `nrr data list`)"
                          + ("; with generation.source=traces, the trace dataset" if reads_traces(cfg) else ""))
    cfg.input = dataclasses.replace(cfg.input, path=path)
    cfg.output_dir = absolute(cfg.output_dir)
    paths = [absolute(p) for p in cfg.decontam.benchmark_paths]
    cfg.decontam = dataclasses.replace(cfg.decontam, benchmark_paths=paths)
    cfg.generation = dataclasses.replace(cfg.generation, teacher_config=absolute(cfg.generation.teacher_config))
    return cfg


def reads_traces(cfg: CurateConfig) -> bool:
    """The input is a dataset of finished traces, curated without a teacher."""
    return cfg.generation.source == "traces"


def check_input(cfg: CurateConfig) -> None:
    """The combinations of keys a trace dataset (generation.source=traces) does not go with."""
    inp = cfg.input
    if not reads_traces(cfg):
        if inp.schema != "auto" or inp.fields:
            key = "input.schema" if inp.schema != "auto" else "input.fields"
            raise ConfigError(f"{key} describes a trace dataset, but generation.source={cfg.generation.source!r} "
                              f"reads problems (input.problem_field, input.answer_field): set "
                              f"generation.source=traces to curate the input's traces, or drop {key}")
        return
    if cfg.embedded_problems.enabled:
        raise ConfigError("embedded_problems.enabled writes problems for a teacher, but generation.source=traces "
                          "curates the traces of input.path as they are: set embedded_problems.enabled=false")
    if inp.on_bad_record == "skip":
        raise ConfigError("input.on_bad_record=skip: a trace dataset stops at its first bad row (the error names "
                          "its file and row); set input.on_bad_record=error and fix or remove that row")


def write_embedded_problems(cfg: CurateConfig) -> int:
    """The embedded task's train problems (plus held-out ones at `contamination_rate`) as JSONL."""
    from recipes import task

    ep = cfg.embedded_problems
    problems = task.train_problems(ep.levels, ep.n_per_level, seed=ep.seed)
    rng = random.Random(f"contaminate:{ep.seed}")
    n_swap = round(len(problems) * ep.contamination_rate)
    if n_swap:
        levels = ep.levels + ep.extra_heldout_levels
        pool = task.heldout_problems(levels, max(1, n_swap // len(levels) + 1))
        rng.shuffle(pool)
        for pos, held in zip(rng.sample(range(len(problems)), n_swap), pool):
            problems[pos] = held
    path = Path(cfg.input.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict()) + "\n")
    tmp.replace(path)
    return len(problems)


@contextlib.contextmanager
def embedded_teacher(cfg: CurateConfig, log_path: Path, startup_s: float = 60.0):
    """Start `nrr teacher serve` on a free port; yield its base URL; stop it."""
    g = cfg.generation
    cmd = [sys.executable, "-m", "recipes.cli", "teacher", "serve", "--config", g.teacher_config,
           "--parent-pid", str(os.getpid()), *g.teacher_overrides, "port=0", f"log_path={log_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        deadline = time.monotonic() + startup_s
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.strip().rsplit(" ", 1)[-1]
                break
        if url is None:
            raise RuntimeError(f"the embedded teacher did not start (exit code {proc.poll()}): {' '.join(cmd)}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def generation_fingerprint(cfg: CurateConfig) -> dict:
    """The values the generations of a (resolved) config depend on, as dotted keys."""
    from recipes.fingerprint import file_identity

    g = cfg.generation
    values = {f"generation.{k}": getattr(g, k) for k in GENERATION_KEYS}
    if g.embedded_teacher:  # what its responses depend on: its config as `nrr teacher serve` reads it
        from recipes.config import parse_override, read_yaml
        from recipes.fingerprint import flatten

        teacher = flatten(read_yaml(g.teacher_config)[0], skip=TEACHER_AS_IS)
        for text in g.teacher_overrides:
            key, value = parse_override(text)
            if not any(key == k or key.startswith(k + ".") for k in TEACHER_AS_IS):
                teacher.update(flatten({key: value}))
        values.update({f"teacher.{k}": v for k, v in teacher.items()})
    else:
        values["generation.base_url"] = g.base_url
    values.update({f"input.{k}": getattr(cfg.input, k) for k in INPUT_KEYS})
    values["input.path"] = file_identity(cfg.input.path)  # the problems' content, wherever the file lives
    return values


def check_generations(cfg: CurateConfig) -> None:
    """Reuse generations.jsonl only if it was made under the same values (see recipes.fingerprint.guard_reuse)."""
    from recipes.fingerprint import guard_reuse

    out = Path(cfg.output_dir)
    guard_reuse([out / RESULTS_FILE], out / RESULTS_FINGERPRINT, generation_fingerprint(cfg),
                "generation.allow_config_change", cfg.generation.allow_config_change,
                log=lambda msg: print(msg, file=sys.stderr))


# ------------------------------------------------------------------ the pipeline


def build_pipeline(cfg: CurateConfig, show_progress: bool = True):
    from nemo_curator.pipeline import Pipeline

    from curator_pipelines.decontam import DecontamStage
    from curator_pipelines.dedup import dedup_stages
    from curator_pipelines.filters import ParseStage, filter_stages
    from curator_pipelines.generate import GenerateStage
    from curator_pipelines.read import ReadProblemsStage, ReadTracesStage
    from curator_pipelines.report import ReportStage
    from curator_pipelines.select import SelectStage
    from curator_pipelines.write import WriteStage

    out = Path(cfg.output_dir)
    responses = [ReadTracesStage(cfg.input, cfg.generation.teacher_name)] if reads_traces(cfg) else [
        ReadProblemsStage(cfg.input, str(out / QUARANTINE_FILE)),
        GenerateStage(cfg.generation, str(out / RESULTS_FILE), show_progress, cfg.name),
    ]
    stages = [
        *responses,
        ParseStage(),
        *filter_stages(cfg.filters),
        *dedup_stages(cfg.dedup),
        *([DecontamStage(cfg.decontam, cfg.data_root)] if cfg.decontam.enabled else []),
        SelectStage(cfg.select),
        WriteStage(str(out), cfg.output.jsonl, cfg.output.parquet),
        ReportStage(str(out), cfg.name, cfg.output.histograms),
    ]
    return Pipeline(name=f"nrr-curate-{cfg.name}", description="long chain-of-thought curation", stages=stages)


def make_executor(cfg: CurateConfig):
    if cfg.executor.name == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        return XennaExecutor(config={"execution_mode": "batch"})
    from nemo_curator.backends.ray_data import RayDataExecutor

    return RayDataExecutor()


def run_curation(cfg: CurateConfig, show_progress: bool = True) -> dict:
    """Run the whole curation; returns the report (also written to `output_dir`)."""
    from recipes.config import save_config

    cfg = resolve_paths(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.embedded_problems.enabled:
        write_embedded_problems(cfg)
    # a malformed input fails here, in seconds, before Ray and the teacher start (the read stage reads it again);
    # of a trace dataset, the first trace: its schema, the `fields` mapping (a later bad row stops the read stage)
    from curator_pipelines.read import read_problems, read_traces

    if reads_traces(cfg):
        read_traces(cfg.input, first_only=True)
    else:
        problems, _ = read_problems(cfg.input)
    if cfg.generation.source == "endpoint":
        from curator_pipelines.generate import api_key

        api_key(cfg.generation)  # the named env var must be set (its value stays in memory only)
        check_generations(cfg)
    with contextlib.ExitStack() as stack:
        if cfg.generation.source == "endpoint" and cfg.generation.embedded_teacher:
            url = stack.enter_context(embedded_teacher(cfg, out / "teacher_log.jsonl"))
            cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, base_url=url))
        stack.enter_context(ray_session(cfg.executor))
        started = time.perf_counter()
        if cfg.generation.source == "endpoint":
            from curator_pipelines.generate import watch_progress

            total = len(problems) * cfg.generation.n_samples
            stack.enter_context(watch_progress(out / RESULTS_FILE, total, show_progress and sys.stderr.isatty()))
        build_pipeline(cfg, show_progress).run(make_executor(cfg))
        seconds = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["pipeline_seconds"] = round(seconds, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def root_cause(err: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (a bad record, a generation error)."""
    import re

    from curator_pipelines.generate import GenerationError
    from curator_pipelines.read import BadRecordError

    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (BadRecordError, GenerationError)) and not hasattr(e, "cause"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    # Ray may hand back only the remote traceback as text: take the error line from it
    for cls in (BadRecordError, GenerationError):
        found = re.findall(rf"{cls.__module__}\.{cls.__name__}: (.+)", str(err))
        if found:
            return cls(found[-1].strip())
    return err
