"""Test-time scaling: accuracy as a function of the tokens spent per problem.

- Self-consistency: a majority vote over the first k samples (maj@k), costing k samples' tokens.
- Best-of-N with a verifier: of the first N samples, the one the verifier scores highest, costing N samples'
  tokens. `agreement` scores a sample by how many of the N share its answer (the grader's normalised form);
  `format` by the format reward (a closed think block and a committed answer), ties to the shorter response.
- Budget forcing (s1, Muennighoff et al. 2025): thinking is capped at B tokens (the think block is closed for the
  model when it runs out: "\n</think>\n\n", then it answers in at most `answer_tokens`); with `wait_rounds: N` an
  end of thinking that comes before the cap is suppressed up to N times and "Wait" appended, so that the model
  thinks on. One sample per problem per budget (the generation's temperature), written to
  `<benchmark>.budget<B>[.wait<N>].jsonl` beside the benchmark's own samples.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from typing import Literal

from recipes.evaluation.metrics import group_by_problem, ks_for
from recipes.generation.backend import Completion, SamplingParams
from recipes.grader import normalize
from recipes.response_format import THINK_CLOSE

FORCED_CLOSE = f"\n{THINK_CLOSE}\n\n"
WAIT = "Wait"


@dataclasses.dataclass
class ScalingConfig:
    thinking_budgets: list[int] = dataclasses.field(default_factory=list)  # budget forcing, one run per budget
    wait_rounds: int = 0  # suppress the end of thinking this many times per sample, appending "Wait"
    answer_tokens: int = 64  # the answer's budget once thinking is closed
    verifier: Literal["agreement", "format"] = "agreement"  # best-of-N's choice among the k samples


def check_scaling(cfg: ScalingConfig) -> None:
    if any(b <= 0 for b in cfg.thinking_budgets):
        raise ValueError(f"scaling.thinking_budgets must be positive token counts, got {cfg.thinking_budgets}")
    if cfg.wait_rounds < 0 or cfg.answer_tokens <= 0:
        raise ValueError("scaling.wait_rounds must be >= 0 and scaling.answer_tokens > 0")


def budget_forced(backend, prompts: list[str], budget: int, params: SamplingParams, cfg: ScalingConfig,
                  count_tokens) -> list[Completion]:
    """One completion per prompt whose thinking used at most `budget` tokens (by `count_tokens`)."""
    n = len(prompts)
    texts, used, waits = [""] * n, [0] * n, [0] * n
    thinking, answering, finished = list(range(n)), [], {}
    while thinking:
        outs = {}
        by_remaining: dict[int, list[int]] = {}  # one generate call per remaining budget
        for i in thinking:
            by_remaining.setdefault(budget - used[i], []).append(i)
        for remaining, idx in by_remaining.items():
            res = backend.generate([prompts[i] + texts[i] for i in idx],
                                   dataclasses.replace(params, n=1, max_tokens=remaining))
            outs.update(zip(idx, res))
        still = []
        for i in thinking:
            comps = outs[i]
            piece = comps[0].text
            if THINK_CLOSE in piece:
                before = piece[:piece.index(THINK_CLOSE)]
                used[i] += count_tokens(before)
                if waits[i] < cfg.wait_rounds and used[i] + count_tokens(WAIT) < budget:  # room to think on
                    texts[i] += before + WAIT
                    used[i] += count_tokens(WAIT)
                    waits[i] += 1
                    still.append(i)
                else:
                    texts[i] += before + FORCED_CLOSE  # its own close, then the answer in its own budget
                    answering.append(i)
            elif comps[0].finish_reason == "length":  # out of thinking budget: close it for the model
                texts[i] += piece + FORCED_CLOSE
                used[i] = budget
                answering.append(i)
            else:  # ended its turn without closing the think block: that is its response
                texts[i] += piece
                finished[i] = "stop"
        thinking = still
    if answering:
        outs = backend.generate([prompts[i] + texts[i] for i in answering],
                                dataclasses.replace(params, n=1, max_tokens=cfg.answer_tokens))
        for i, comps in zip(answering, outs):
            texts[i] += comps[0].text
            finished[i] = comps[0].finish_reason
    return [Completion(token_ids=[], text=texts[i], finish_reason=finished[i], num_tokens=count_tokens(texts[i]))
            for i in range(n)]


def budget_label(label: str, budget: int, waits: int) -> str:
    return f"{label}.budget{budget}" + (f".wait{waits}" if waits else "")


def best_of(samples: list[dict], n: int, verifier: str) -> dict:
    """The sample of the first n the verifier picks."""
    first = samples[:n]
    if verifier == "agreement":
        votes = Counter(normalize(s["predicted_answer"]) for s in first if s.get("predicted_answer") is not None)
        return max(first, key=lambda s: (votes.get(normalize(s["predicted_answer"]), 0)
                                         if s.get("predicted_answer") is not None else -1, -s["sample_idx"]))
    if verifier == "format":
        return max(first, key=lambda s: (bool(s["format_ok"]), -s["num_generated_tokens"], -s["sample_idx"]))
    raise ValueError(f"scaling.verifier must be agreement or format, got {verifier!r}")


def sample_curves(records: list[dict], verifier: str) -> dict:
    """maj@k and best-of-k accuracy against the tokens k samples cost, for k = 1, 2, 4, .. up to the samples."""
    by = group_by_problem(records)
    if not by:
        return {}
    n = min(len(s) for s in by.values())
    tokens = statistics.fmean(r["num_generated_tokens"] for s in by.values() for r in s[:n])
    from recipes.evaluation.metrics import majority_correct

    curves = {"self_consistency": [], "best_of": []}
    for k in ks_for(n):
        cost = round(k * tokens, 1)
        curves["self_consistency"].append({"k": k, "tokens": cost, "accuracy": statistics.fmean(
            float(majority_correct(s, k)) for s in by.values())})
        curves["best_of"].append({"k": k, "tokens": cost, "accuracy": statistics.fmean(
            float(bool(best_of(s, k, verifier)["is_correct"])) for s in by.values())})
    return curves


def budget_point(records: list[dict], budget: int, waits: int) -> dict:
    return {"budget": budget, "waits": waits,
            "tokens": round(statistics.fmean(r["num_generated_tokens"] for r in records), 1),
            "thinking_tokens": round(statistics.fmean(r["thinking_tokens"] for r in records), 1),
            "accuracy": statistics.fmean(float(bool(r["is_correct"])) for r in records)}


def run_budgets(backend, problems: list[dict], prompt_texts: list[str], params: SamplingParams, cfg: ScalingConfig,
                count_tokens, make_record, out_dir, label: str) -> list[dict]:
    """Budget forcing over the benchmark at each of cfg.thinking_budgets: its samples written to
    <label>.budget<B>[.wait<N>].jsonl (replaced whole), and one curve point per budget."""
    import json
    from pathlib import Path

    if count_tokens(WAIT) is None:
        raise ValueError("scaling.thinking_budgets counts thinking tokens: this backend has no tokenizer "
                         "(an endpoint: set generation.tokenizer)")
    points = []
    for budget in sorted(cfg.thinking_budgets):
        comps = budget_forced(backend, prompt_texts, budget, params, cfg, count_tokens)
        records = [make_record(problem, 0, comp) for problem, comp in zip(problems, comps)]
        path = Path(out_dir) / f"{budget_label(label, budget, cfg.wait_rounds)}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        points.append(budget_point(records, budget, cfg.wait_rounds))
    return points
