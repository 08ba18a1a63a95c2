"""An evaluation run: read benchmarks -> generate k samples per problem -> grade -> metrics -> report.

Samples are appended to `<output_dir>/<benchmark>.jsonl` as each batch finishes; a rerun skips the
(problem, sample) pairs already there, so an interrupted run resumes where it stopped.
Record fields follow NeMo-Skills' names where they exist (`generation`, `expected_answer`,
`predicted_answer`, `is_correct`, `num_generated_tokens`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from recipes import grader
from recipes.chat_template import render_prompt, split_response
from recipes.config import save_config
from recipes.generation import Completion, SamplingParams, make_backend as start_backend
from recipes.evaluation.benchmarks import default_instruction, load_benchmark
from recipes.evaluation.config import BenchmarkConfig, EvalConfig, GenerationConfig
from recipes.evaluation.metrics import reflection_count, summarize
from recipes.evaluation.records import drop_torn_tail, read_records


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


def make_backend(cfg: EvalConfig, model_dir: str):
    g = cfg.generation
    if g.backend == "hf":
        return start_backend("hf", model_dir, dtype=g.dtype, batch_size=max(g.batch_size, g.k))
    if g.backend == "vllm":  # in a worker process: the caller may itself be a trainer or a test
        return start_backend("vllm-worker", model_dir, dtype=g.dtype, max_model_len=g.max_model_len, seed=g.seed,
                             gpu_memory_utilization=0.85)
    if g.backend == "openai":
        tok_dir = cfg.model if Path(cfg.model).is_dir() else None
        return start_backend("openai", cfg.model, base_url=g.base_url, api_key_env=g.api_key_env,
                             max_concurrency=g.max_concurrency, timeout=g.request_timeout, tokenizer_dir=tok_dir)
    raise ValueError(f"unknown backend '{g.backend}'")


def build_record(problem: dict, sample_idx: int, comp: Completion, g: GenerationConfig, count_tokens,
                 grade_timeout: float) -> dict:
    result = grader.grade_response(comp.text, problem["answer"], timeout=grade_timeout)
    thinking, _, closed = split_response(comp.text)
    if thinking:
        n = count_tokens(thinking)
        if n is None:  # no tokenizer (a remote endpoint): share the count by characters
            n = round(comp.num_tokens * len(thinking) / max(1, len(comp.text)))
        thinking_tokens = min(n, comp.num_tokens)
    else:
        thinking_tokens = 0
    rec = {
        "id": problem["id"],
        "benchmark": problem["benchmark"],
        "sample_idx": sample_idx,
        "problem": problem["problem"],
        "expected_answer": problem["answer"],
        "generation": comp.text,
        "predicted_answer": result.predicted,
        "is_correct": result.correct,
        "grade_method": result.method,
        "num_generated_tokens": comp.num_tokens,
        "thinking_tokens": thinking_tokens,
        "answer_tokens": comp.num_tokens - thinking_tokens,
        "finish_reason": comp.finish_reason,
        "truncated": comp.finish_reason == "length",
        "format_ok": result.predicted is not None and (closed or not g.thinking),
        "reflection_markers": reflection_count(thinking if thinking is not None else comp.text),
    }
    if problem.get("level") is not None:
        rec["level"] = problem["level"]
    return rec


def _prompt(problem: dict, bench: BenchmarkConfig, g: GenerationConfig) -> str:
    instruction = bench.instruction if bench.instruction is not None else default_instruction(bench.name)
    return render_prompt(problem["problem"] + instruction, enable_thinking=g.thinking, system=g.system_prompt)


# ------------------------------------------------------------------------------ the run


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
    labels = [_label(b) for b in cfg.benchmarks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"benchmark labels must be distinct, got {labels}: set `label` on repeated ones")

    backend = None
    model_dir = None
    summary: dict = {"run": cfg.run_name or out.name, "model": cfg.model, "backend": g.backend, "k": g.k,
                     "temperature": g.temperature, "thinking": g.thinking, "benchmarks": {}}
    started = time.monotonic()
    for bench, label in zip(cfg.benchmarks, labels):
        problems = load_benchmark(dataclasses.replace(bench, label=label), cfg.data_root)
        path = out / f"{label}.jsonl"
        drop_torn_tail(path)
        done = {(str(r["id"]), r["sample_idx"]) for r in read_records(path)}
        pending = [p for p in problems if any((p["id"], i) not in done for i in range(g.k))]
        if pending and backend is None:
            model_dir = model_dir or (cfg.model if g.backend == "openai" else resolve_model(cfg.model, out, cfg.init_seed))
            backend = pool.get(model_dir)
        with progress(disable=not cfg.progress) as bar, path.open("a", encoding="utf-8") as f:
            task = bar.add_task(label, total=len(problems), completed=len(problems) - len(pending), info="")
            for start in range(0, len(pending), g.batch_size):
                chunk = pending[start : start + g.batch_size]
                outputs = backend.generate([_prompt(p, bench, g) for p in chunk], params)
                for problem, comps in zip(chunk, outputs):
                    for i, comp in enumerate(comps):
                        if (problem["id"], i) in done:
                            continue
                        rec = build_record(problem, i, comp, g, backend.count_tokens, cfg.grade_timeout)
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(task, advance=len(chunk))
        ids = {p["id"] for p in problems}
        records = [r for r in read_records(path) if str(r["id"]) in ids and r["sample_idx"] < g.k]
        summary["benchmarks"][label] = summarize(records)
    summary["seconds"] = round(time.monotonic() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if cfg.report:
        from recipes.evaluation.report import write_eval_report

        write_eval_report([out], out / "report.html")
    return summary


def evaluate_model(model_path_or_hf_dir: str, benchmark: str = "embedded", levels: list[int] | None = None,
                   n_per_level: int = 20, k: int = 1, temperature: float = 0.0, backend: str = "vllm",
                   out_dir: str | None = None, max_tokens: int = 256, thinking: bool = True,
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
