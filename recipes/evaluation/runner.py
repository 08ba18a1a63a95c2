"""An evaluation run: read benchmarks -> generate k samples per problem -> grade -> metrics -> report.

Samples are appended to `<output_dir>/<benchmark>.jsonl` as each batch finishes; a rerun skips the
(problem, sample) pairs already there, so an interrupted run resumes where it stopped, if it runs under the same
model, prompt, sampling and benchmark file (`<benchmark>.fingerprint.json`; generation.allow_config_change). With an endpoint, a
problem it gave no completion for is counted by error class; more than `generation.max_failed_fraction` of a
benchmark's problems failing fails the run (`GenerationBudgetError`, after writing summary.json).
Record fields follow NeMo-Skills' names where they exist (`generation`, `expected_answer`,
`predicted_answer`, `is_correct`, `num_generated_tokens`); `nemo_skills_layout: true` also writes NeMo-Skills'
own files (`recipes.evaluation.nemo_skills`). Prompts: `recipes.evaluation.prompts`, rendered by the model's
chat template.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from recipes import grader
from recipes.response_format import split_response
from recipes.tokenizer import load as load_tokenizer
from recipes.config import ConfigError, save_config
from recipes.data import catalog
from recipes.fingerprint import file_identity, guard_reuse
from recipes.generation import Completion, SamplingParams, make_backend as start_backend
from recipes.evaluation import nemo_skills, prompts, scaling
from recipes.evaluation.benchmarks import load_benchmark
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig, PromptConfig
from recipes.evaluation.metrics import reflection_count, summarize
from recipes.evaluation.records import drop_torn_tail, read_records


class GenerationBudgetError(RuntimeError):
    """More of a benchmark's problems failed at the endpoint than generation.max_failed_fraction allows."""


# ------------------------------------------------------------------------------ model and backend


def resolve_model(model: str, output_dir: Path, init_seed: int = 1234) -> str:
    """An HF folder as is; a Megatron checkpoint is exported to `<output_dir>/hf_model` first; an HF config.json
    becomes a randomly initialised Megatron checkpoint (`init_seed`, as `nrr convert init`), then exported."""
    path = Path(model)
    if (path / "config.json").exists():
        return str(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {model} (an HF folder with config.json, a Megatron checkpoint "
                                "or an HF config.json)")
    out = output_dir / "hf_model"
    if not (out / "config.json").exists():
        try:
            from recipes.megatron.hf_checkpoint import export_to_hf, init_tiny_checkpoint
        except ImportError as err:
            raise RuntimeError(f"{model} is not an HF folder and the Megatron exporter is unavailable: {err}") from None
        if path.is_file() and path.suffix == ".json":
            init_tiny_checkpoint(str(path), str(output_dir / "random_init"), init_seed)
            path = output_dir / "random_init"
        export_to_hf(str(path), str(out))
    return str(out)


def check_failures(n_problems: int, failures: list, max_failed_fraction: float) -> dict | None:
    """A benchmark's failed problems by error class against the budget (None: none failed)."""
    if not failures:
        return None
    by_class: dict[str, int] = {}
    examples: dict[str, str] = {}
    for f in failures:
        by_class[f.error_class] = by_class.get(f.error_class, 0) + 1
        examples.setdefault(f.error_class, f.error)
    fraction = len(failures) / max(1, n_problems)
    return {"problems": n_problems, "failed": len(failures), "failed_fraction": round(fraction, 4),
            "max_failed_fraction": max_failed_fraction, "exceeded": fraction > max_failed_fraction,
            "by_class": by_class, "examples": examples}


def make_backend(cfg: EvalConfig, model_dir: str):
    g = cfg.generation
    if g.backend == "hf":
        return start_backend("hf", model_dir, dtype=g.dtype, batch_size=max(g.batch_size, g.k))
    if g.backend == "vllm":  # in a worker process: the caller may itself be a trainer or a test
        return start_backend("vllm-worker", model_dir, dtype=g.dtype, max_model_len=g.max_model_len, seed=g.seed,
                             gpu_memory_utilization=0.85)
    if g.backend == "openai":
        return start_backend("openai", cfg.model, base_url=g.base_url, api_key_env=g.api_key_env,
                             max_concurrency=g.max_concurrency, timeout=g.request_timeout,
                             tokenizer_dir=str(endpoint_tokenizer(cfg)))
    raise ValueError(f"unknown backend '{g.backend}'")


def endpoint_tokenizer(cfg: EvalConfig) -> Path:
    """The tokenizer folder whose template renders an endpoint's prompts: generation.tokenizer, else the model
    when it names a folder."""
    g = cfg.generation
    if g.tokenizer:
        return Path(g.tokenizer)
    if Path(cfg.model).is_dir():
        return Path(cfg.model)
    raise ValueError(f"generation.tokenizer: the openai backend serves '{cfg.model}'; name the folder of its "
                     "tokenizer (its chat template renders the prompts)")


def build_record(problem: dict, sample_idx: int, comp: Completion, expect_thinking: bool, count_tokens,
                 grade_timeout: float, tokenizer=None) -> dict:
    """One sample's record; `tokenizer` puts back a think tag the prompt opened (R1-distill templates)."""
    text = tokenizer.response_text(comp.text) if tokenizer is not None else comp.text
    result = grader.grade_response(text, problem["answer"], timeout=grade_timeout)
    thinking, _, closed = split_response(text)
    if thinking:
        n = count_tokens(thinking)
        if n is None:  # no tokenizer (a remote endpoint): share the count by characters
            n = round(comp.num_tokens * len(thinking) / max(1, len(text)))
        thinking_tokens = min(n, comp.num_tokens)
    else:
        thinking_tokens = 0
    rec = {
        "id": problem["id"],
        "benchmark": problem["benchmark"],
        "sample_idx": sample_idx,
        "problem": problem["problem"],
        "expected_answer": problem["answer"],
        "generation": text,
        "predicted_answer": result.predicted,
        "is_correct": result.correct,
        "grade_method": result.method,
        "num_generated_tokens": comp.num_tokens,
        "thinking_tokens": thinking_tokens,
        "answer_tokens": comp.num_tokens - thinking_tokens,
        "finish_reason": comp.finish_reason,
        "truncated": comp.finish_reason == "length",
        "format_ok": result.predicted is not None and (closed or not expect_thinking),
        "reflection_markers": reflection_count(thinking if thinking is not None else text),
    }
    if problem.get("level") is not None:
        rec["level"] = problem["level"]
    return rec


def _prompt(problem: dict, prompt: PromptConfig, g: GenerationConfig, tokenizer) -> str:
    """The text the backend receives: the prompt config's turns through the model's own chat template."""
    return tokenizer.render(prompts.messages(problem["problem"], prompt), add_generation_prompt=True,
                            enable_thinking=g.thinking)


def _check_thinking(tokenizer, g: GenerationConfig) -> None:
    """A ConfigError naming generation.thinking and the template's folder when the template cannot honour it."""
    if g.thinking is None:  # the template's default: always honoured
        return
    try:
        tokenizer.render([{"role": "user", "content": "x"}], add_generation_prompt=True, enable_thinking=g.thinking)
    except ValueError as err:
        raise ConfigError(f"generation.thinking={g.thinking}: {err}") from None


# ------------------------------------------------------------------------------ the run

# What a benchmark's samples depend on besides the model, prompt and benchmark file (not k: sample i is drawn the
# same way whatever the count, so a larger k reuses the earlier ones; nor batch sizes, concurrency or timeouts).
SAMPLING_KEYS = ("backend", "temperature", "top_p", "max_tokens", "thinking", "seed", "dtype")


def samples_fingerprint(cfg: EvalConfig, bench: BenchmarkConfig, prompt: PromptConfig) -> dict:
    """The values a benchmark's sample records depend on, as dotted keys."""
    g = cfg.generation
    values = {f"generation.{k}": getattr(g, k) for k in SAMPLING_KEYS}
    if g.backend == "openai":  # a served name: the endpoint and the tokenizer rendering its prompts stand for it
        values.update({"model": cfg.model, "generation.base_url": g.base_url,
                       "generation.tokenizer": file_identity(endpoint_tokenizer(cfg))})
    else:  # the weights' folder (or checkpoint, or config.json and its seed) by content or file times
        values.update({"model": file_identity(cfg.model) if Path(cfg.model).exists() else cfg.model,
                       "init_seed": cfg.init_seed if Path(cfg.model).is_file() else None})
    values.update({"prompt.system": prompt.system, "prompt.user": prompt.user, "grade_timeout": cfg.grade_timeout,
                   "benchmark.name": bench.name})
    if bench.name == "jsonl":
        values.update({f"benchmark.{k}": getattr(bench, k) for k in ("problem_field", "answer_field", "id_field")})
    if bench.name != "embedded":  # the embedded task's problems are fixed by their ids
        path = bench.path or catalog.path_of(bench.name, cfg.data_root)
        values["benchmark.file"] = file_identity(path) if Path(path).exists() else str(path)
    return values



def _label(bench: BenchmarkConfig) -> str:
    if bench.label:
        return bench.label
    return Path(bench.path).stem if bench.name == "jsonl" and bench.path else bench.name


class BackendPool:
    """The backend a run's models share: a vLLM engine swaps weights in place between models of one architecture
    and tokenizer; any other change of model starts a new backend."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.backend, self.model_dir = cfg, None, None

    def get(self, model_dir: str):
        if self.backend is not None and model_dir != self.model_dir:
            if hasattr(self.backend, "swaps_weights") and self.backend.swaps_weights(self.model_dir, model_dir):
                self.backend.load_folder(model_dir)
            else:
                self.close()
        if self.backend is None:
            self.backend = make_backend(self.cfg, model_dir)
        self.model_dir = model_dir
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.model_dir = None, None


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate cfg.model (or each of cfg.models, into <output_dir>/<label>/) on every benchmark; write samples,
    summary.json and report.html. Returns the summary ({"models": {label: summary}} for several models)."""
    if bool(cfg.model) == bool(cfg.models):
        raise ValueError("set either `model` (one model) or `models` ({label: model}), not both"
                         if cfg.model else "`model` is required (or `models`: {label: model})")
    prompts.check_prompts(cfg)
    if not 0.0 <= cfg.generation.max_failed_fraction <= 1.0:
        raise ConfigError(f"generation.max_failed_fraction={cfg.generation.max_failed_fraction}: a share of the "
                          "problems, between 0 (any failure fails the run) and 1 (never)")
    if cfg.generation.backend == "openai":  # before any model or engine starts
        from recipes.generation.openai_endpoint import endpoint_api_key

        endpoint_api_key(cfg.generation.api_key_env)
    pool = BackendPool(cfg)
    try:
        if cfg.model:
            return _evaluate(cfg, pool)
        out = Path(cfg.output_dir)
        summaries = {label: _evaluate(dataclasses.replace(cfg, model=model, models={}, run_name=label,
                                                          output_dir=str(out / label)), pool)
                     for label, model in cfg.models.items()}
    finally:
        pool.close()
    if cfg.report:
        from recipes.evaluation.report import write_eval_report

        write_eval_report([out / label for label in cfg.models], out / "report.html")
    return {"models": summaries}


def _evaluate(cfg: EvalConfig, pool: BackendPool) -> dict:
    from recipes.metrics import progress

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    g = cfg.generation
    params = SamplingParams(n=g.k, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
                             seed=g.seed)
    if not cfg.benchmarks:
        raise ValueError("no benchmarks configured (benchmarks: [{name: math500, limit: 50}, ...])")
    scaling.check_scaling(cfg.scaling)
    labels = [_label(b) for b in cfg.benchmarks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"benchmark labels must be distinct, got {labels}: set `label` on repeated ones")

    backend = None
    model_dir = None
    summary: dict = {"run": cfg.run_name or out.name, "status": "ok", "model": cfg.model, "backend": g.backend,
                     "k": g.k, "temperature": g.temperature, "thinking": g.thinking, "benchmarks": {}, "prompts": {}}
    layout: dict[str, dict] = {}
    started = time.monotonic()
    for bench, label in zip(cfg.benchmarks, labels):
        problems = load_benchmark(dataclasses.replace(bench, label=label), cfg.data_root)
        prompt = prompts.resolve(bench, cfg.prompt)
        summary["prompts"][label] = dataclasses.asdict(prompt)
        path = out / f"{label}.jsonl"
        # a model not on this machine cannot be identified: only finished samples can be summarised without it
        unknown = ("model",) if g.backend != "openai" and not Path(cfg.model).exists() else ()
        guard_reuse([path], out / f"{label}.fingerprint.json", samples_fingerprint(cfg, bench, prompt),
                    "generation.allow_config_change", g.allow_config_change, unknown=unknown)
        drop_torn_tail(path)
        done = {(str(r["id"]), r["sample_idx"]) for r in read_records(path)}
        pending = [p for p in problems if any((p["id"], i) not in done for i in range(g.k))]
        if (pending or cfg.scaling.thinking_budgets) and backend is None:  # budget runs need the model too
            model_dir = model_dir or (cfg.model if g.backend == "openai" else resolve_model(cfg.model, out, cfg.init_seed))
            tok = load_tokenizer(endpoint_tokenizer(cfg) if g.backend == "openai" else model_dir)
            _check_thinking(tok, g)  # before the backend starts
            backend = pool.get(model_dir)
            # what the prompts ask for: the config's think mode, else the template's default
            expect_thinking = g.thinking if g.thinking is not None else True in tok.thinking_modes
            summary["thinking"] = expect_thinking
        with progress(disable=not cfg.progress) as bar, path.open("a", encoding="utf-8") as f:
            task = bar.add_task(label, total=len(problems), completed=len(problems) - len(pending), info="")
            failures = []  # EndpointFailure per problem without a completion (an endpoint's)
            generate = (getattr(backend, "generate_tolerant", None) or backend.generate) if pending else None
            for start in range(0, len(pending), g.batch_size):
                chunk = pending[start : start + g.batch_size]
                outputs = generate([_prompt(p, prompt, g, tok) for p in chunk], params)
                for problem, comps in zip(chunk, outputs):
                    if hasattr(comps, "error_class"):
                        failures.append(comps)
                        continue
                    for i, comp in enumerate(comps):
                        if (problem["id"], i) in done:
                            continue
                        rec = build_record(problem, i, comp, expect_thinking, backend.count_tokens,
                                           cfg.grade_timeout, tok)
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(task, advance=len(chunk))
        ids = {p["id"] for p in problems}
        records = [r for r in read_records(path) if str(r["id"]) in ids and r["sample_idx"] < g.k]
        summary["benchmarks"][label] = summarize(records)
        if g.k > 1 or cfg.scaling.thinking_budgets:
            curves = scaling.sample_curves(records, cfg.scaling.verifier) if g.k > 1 else {}
            if cfg.scaling.thinking_budgets:
                curves["budget_forcing"] = scaling.run_budgets(
                    backend, problems, [_prompt(p, prompt, g, tok) for p in problems], params, cfg.scaling,
                    backend.count_tokens,
                    lambda problem, i, comp: build_record(problem, i, comp, expect_thinking, backend.count_tokens,
                                                          cfg.grade_timeout, tok), out, label)
            summary["benchmarks"][label]["scaling"] = curves
        failed = check_failures(len(problems), failures, g.max_failed_fraction)
        if failed:
            summary["benchmarks"][label]["generation_failures"] = failed
        if failed and failed["exceeded"]:
            counts = ", ".join(f"{k}: {v}" for k, v in failed["by_class"].items())
            summary["status"] = "failed"
            summary["error"] = (f"{label}: the endpoint gave no completion for {failed['failed']} of "
                                f"{failed['problems']} problems ({failed['failed_fraction']:.1%} > "
                                f"generation.max_failed_fraction {g.max_failed_fraction:.1%}): {counts}")
            (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            raise GenerationBudgetError(summary["error"] + f"; summary in {out}/summary.json")
        if cfg.nemo_skills_layout:
            layout[label] = nemo_skills.write_benchmark(out / "nemo_skills", label, [p["id"] for p in problems],
                                                        records, g.k, greedy=g.temperature == 0)
    if cfg.nemo_skills_layout:
        nemo_skills.write_summary(out / "nemo_skills", layout)
    summary["seconds"] = round(time.monotonic() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if cfg.report:
        from recipes.evaluation.report import write_eval_report

        write_eval_report([out], out / "report.html")
    return summary


def evaluate_model(model_path_or_hf_dir: str, benchmark: str = "embedded", levels: list[int] | None = None,
                   n_per_level: int = 20, k: int = 1, temperature: float = 0.0, backend: str = "vllm",
                   out_dir: str | None = None, max_tokens: int = 256, thinking: bool | None = None,
                   limit: int | None = None, batch_size: int = 64, report: bool = False) -> dict:
    """Evaluate one model on one benchmark; the summary of that benchmark, with `accuracy` (pass@1)
    and, for the embedded task, `accuracy_by_level`."""
    import tempfile

    out_dir = out_dir or tempfile.mkdtemp(prefix="nrr-eval-")
    cfg = EvalConfig(
        model=str(model_path_or_hf_dir),
        benchmarks=[BenchmarkConfig(name=benchmark, levels=list(levels or [1, 2, 3]), n_per_level=n_per_level,
                                    limit=limit)],
        generation=GenerationConfig(backend=backend, k=k, temperature=temperature, max_tokens=max_tokens,
                                    thinking=thinking, batch_size=batch_size),
        output_dir=str(out_dir),
        report=report,
        progress=False,
    )
    summary = run_eval(cfg)
    bench = summary["benchmarks"][_label(cfg.benchmarks[0])]
    result = {"benchmark": benchmark, "output_dir": str(out_dir), "accuracy": bench.get("pass@1", 0.0), **bench}
    if "by_level" in bench:
        result["accuracy_by_level"] = {lvl: m["pass@1"] for lvl, m in bench["by_level"].items()}
    return result
