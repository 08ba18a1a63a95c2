"""Rejection sampling / self-improvement: sample N responses per problem with the current policy,
keep the verified-correct ones, and write them as an SFT corpus in the curation chat format.

    nrr grpo rejection-sample --config nemo_configs/grpo/tiny_cpu.yaml model.init_checkpoint=runs/grpo/checkpoints

Each record is a trace record (`recipes.data.trace_record`) with the problem's level and the sampling provenance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class RejectionConfig:
    """`rejection:` of a GRPO config, read in `mode: rejection_sample`."""

    samples_per_problem: int = 8
    problems_per_level: int = 50  # embedded task: train problems of each of prompts.levels (a dataset: prompts.limit)
    max_keep_per_problem: int = 2  # distinct correct responses kept per problem
    out: str | None = None  # the JSONL written (default: <output_dir>/rejection_sampled.jsonl)


def select_correct(problem: dict, responses: list[str], max_keep: int | None = None) -> list[str]:
    """Distinct responses whose final answer the grader accepts (the think block must be closed)."""
    from recipes import response_format as ct
    from recipes.grader import grade_response

    kept: list[str] = []
    for text in responses:
        closed = ct.split_response(text)[2]
        if closed and text not in kept and grade_response(text, problem["answer"]).correct:
            kept.append(text)
        if max_keep is not None and len(kept) >= max_keep:
            break
    return kept


def to_record(problem: dict, response: str, k: int, provenance: dict) -> dict:
    from recipes.data.trace_record import make_record

    return make_record(f"{problem['id']}-rs{k}", problem["problem"], response, problem_id=problem["id"],
                       reference=problem["answer"], source="rejection-sampling",
                       teacher=provenance.get("policy", "policy"), level=problem.get("level"), provenance=provenance)


def run(cfg, hf: dict, tokenizer, problems: list[dict]) -> dict:
    """Single process: load the policy (architecture `hf`), fill a rollout engine by refit, sample the problems
    ({id, problem, answer}) with the model's own tokenizer and template, verify, write JSONL."""
    from recipes.config import resolve_path
    from recipes.data.trace_record import write_records
    from recipes.megatron import providers, runtime
    from recipes.megatron.hf_checkpoint import load_pretrained
    from recipes.rl.refit import refit, write_engine_dir
    from recipes.rl.rollout import start_engine

    opts = cfg.rejection
    runtime.init_distributed(1, 1, seed=cfg.training.seed)
    chunks = providers.build_model(hf, 1, 1, seed=cfg.training.seed, ddp=False)
    if cfg.model.init_checkpoint:
        load_pretrained(chunks, resolve_path(cfg.model.init_checkpoint))
    run_dir = Path(cfg.output_dir)
    backend = start_engine(cfg.rollout, write_engine_dir(hf, run_dir / "engine", tokenizer),
                           max_model_len=int(hf.get("max_position_embeddings", 512)), seed=cfg.training.seed)
    refit(backend, chunks, hf)
    n = opts.samples_per_problem
    outs = backend.generate([tokenizer.prompt_ids(p["problem"]) for p in problems],
                            cfg.rollout.sampling(n, cfg.training.seed))
    provenance = {"policy": str(cfg.model.init_checkpoint or "random-init"), "samples_per_problem": n,
                  "temperature": cfg.rollout.temperature, "seed": cfg.training.seed}
    records, solved = [], 0
    for p, comps in zip(problems, outs):
        kept = select_correct(p, [tokenizer.response_text(c.text) for c in comps], opts.max_keep_per_problem)
        solved += bool(kept)
        records += [to_record(p, text, k, provenance) for k, text in enumerate(kept)]
    out = Path(opts.out or run_dir / "rejection_sampled.jsonl")
    write_records(records, out)
    summary = {"problems": len(problems), "solved": solved, "records": len(records), "out": str(out),
               "pass_at_n": solved / max(len(problems), 1)}
    (run_dir / "rejection_summary.json").write_text(json.dumps(summary, indent=2))
    runtime.print_rank0(f"[rejection-sample] {solved}/{len(problems)} problems solved at n={n}; "
                        f"{len(records)} records -> {out}")
    backend.close()
    return summary
