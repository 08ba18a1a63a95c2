"""R1-style traces for the embedded task, with realistic defects injected at configured rates.

Everything a response contains is a pure function of (question, seed, config): the same request
always gets the same answer, so a curation run that is killed and resumed sees exactly what an
uninterrupted run would have seen. The request's `seed` plays the role of the sample index:
duplicates copy the clean response of `seed - 1` (the previous sample of the same problem).

Clean traces stay compact (the canonical reduction steps of `recipes.task.cot_text`, a short
self-check in a minority) because a sub-million-parameter student must learn them in minutes.
"""

from __future__ import annotations

import dataclasses
import random
import re

from recipes import task
from recipes.response_format import THINK_CLOSE, THINK_OPEN, format_response

# what the filters must remove; "contaminated" comes from the problem, not the response
RESPONSE_DEFECTS = (
    "wrong_answer",
    "unclosed_think",
    "loop",
    "language_mix",
    "truncated",
    "exact_duplicate",
    "near_duplicate",
)
LABELS = ("none", "contaminated", "unsolvable", *RESPONSE_DEFECTS)

# short spans of other scripts, as a multilingual teacher drifts into them mid-thought
_FOREIGN_SPANS = ("让我们一步一步计算", "давайте проверим", "計算してみます", "다시 확인해 보자", "لنحسب خطوة")
_NEAR_DUP_EDITS = ("spaced", "period")
_EXPR = re.compile(r"[\d()+\-*][\d()+\-* ]*[\d)]")


@dataclasses.dataclass
class DefectRates:
    """Share of responses that get each defect (drawn independently of the problem)."""

    wrong_answer: float = 0.0
    unclosed_think: float = 0.0
    loop: float = 0.0
    language_mix: float = 0.0
    truncated: float = 0.0
    exact_duplicate: float = 0.0
    near_duplicate: float = 0.0

    def total(self) -> float:
        return sum(dataclasses.asdict(self).values())


@dataclasses.dataclass
class TraceConfig:
    self_check_rate: float = 0.08  # clean traces that end with "wait, let me verify: expr=N"
    spell_out_rate: float = 0.0  # clean traces that write hard operations out (83-47 -> 83-40-7;43-7;36)
    defects: DefectRates = dataclasses.field(default_factory=DefectRates)
    loop_repeats: tuple[int, int] = (4, 24)  # how often a looping trace repeats its last step
    seed: int = 0  # the server's own seed, mixed into every draw


@dataclasses.dataclass(frozen=True)
class Trace:
    text: str
    finish_reason: str  # "stop" or "length"
    defect: str  # one of LABELS
    injected: bool  # False when the label describes what happened anyway (a natural duplicate)


def parse_expression(message: str) -> str | None:
    """The arithmetic expression in a user message (the longest one with an operator)."""
    candidates = [m.group(0).replace(" ", "") for m in _EXPR.finditer(message)]
    candidates = [c for c in candidates if any(op in c for op in "+-*") and c.count("(") == c.count(")")]
    if not candidates:
        return None
    expr = max(candidates, key=len)
    try:
        task.solve_steps(expr)
    except (ValueError, AssertionError, IndexError):
        return None
    return expr


def _rng(expr: str, seed: int, cfg: TraceConfig, purpose: str) -> random.Random:
    return random.Random(f"{cfg.seed}|{expr}|{seed}|{purpose}")


def draw_defect(expr: str, seed: int, cfg: TraceConfig) -> str:
    """The defect a response gets (or "none"), decided by the request alone."""
    u = _rng(expr, seed, cfg, "defect").random()
    acc = 0.0
    for name, rate in dataclasses.asdict(cfg.defects).items():
        acc += rate
        if u < acc:
            if name.endswith("_duplicate") and (seed < 1 or _clean_or_dup_source(expr, seed - 1, cfg) is None):
                return "none"  # nothing to copy: the previous sample is not a clean trace
            return name
    return "none"


def clean_think(expr: str, seed: int, cfg: TraceConfig) -> str:
    # two solution styles, as a real teacher's traces vary: RL can learn which one its student executes better
    spell_out = cfg.spell_out_rate > 0 and _rng(expr, seed, cfg, "spell").random() < cfg.spell_out_rate
    steps = task.solve_steps(expr, spell_out=spell_out)
    think = ";".join(steps)
    if _rng(expr, seed, cfg, "check").random() < cfg.self_check_rate:
        think += f";wait, let me verify: {expr}={steps[-1]}"
    return think


def clean_response(expr: str, seed: int, cfg: TraceConfig) -> str:
    return format_response(clean_think(expr, seed, cfg), task.answer_text(str(task.evaluate(expr))))


def _clean_or_dup_source(expr: str, seed: int, cfg: TraceConfig) -> str | None:
    """The response of sample `seed` when it is clean (a duplicate may copy it), else None."""
    if draw_defect(expr, seed, cfg) != "none":
        return None
    return clean_response(expr, seed, cfg)


def make_trace(question: str, seed: int, cfg: TraceConfig, max_tokens: int | None = None) -> Trace:
    """The teacher's response to one request: a clean trace or one with a labelled defect."""
    expr = parse_expression(question)
    if expr is None:
        return Trace("I can only solve arithmetic expressions with +, - and *.", "stop", "unsolvable", False)
    if task.is_heldout(expr):  # a problem copied from the evaluation split
        trace = Trace(clean_response(expr, seed, cfg), "stop", "contaminated", False)
    else:
        trace = _inject(expr, seed, cfg, draw_defect(expr, seed, cfg))
        if trace.defect == "none":
            # identical to an earlier sample anyway: a real duplicate, labelled as such
            for earlier in range(seed - 1, -1, -1):
                if draw_defect(expr, earlier, cfg) == "none" and clean_response(expr, earlier, cfg) == trace.text:
                    trace = Trace(trace.text, "stop", "exact_duplicate", False)
                    break
    if max_tokens is not None:
        trace = _cap_tokens(trace, max_tokens)
    return trace


def _inject(expr: str, seed: int, cfg: TraceConfig, defect: str) -> Trace:
    rng = _rng(expr, seed, cfg, "inject")
    steps = task.solve_steps(expr)
    answer = steps[-1]
    if defect == "none":
        return Trace(clean_response(expr, seed, cfg), "stop", "none", False)
    if defect == "wrong_answer":
        wrong = str(int(answer) + rng.choice([-1, 1]) * rng.randint(1, 9))
        wrong = wrong if int(wrong) >= 0 else str(int(answer) + rng.randint(1, 9))
        think = ";".join(steps[:-1] + [wrong])
        return Trace(format_response(think, task.answer_text(wrong)), "stop", defect, True)
    if defect == "unclosed_think":
        text = f"{THINK_OPEN}\n{clean_think(expr, seed, cfg)}\n\n{task.answer_text(answer)}"
        return Trace(text, "stop", defect, True)
    if defect == "loop":
        last = steps[-2] if len(steps) > 1 else expr
        repeats = rng.randint(*cfg.loop_repeats)
        think = ";".join(steps[:-1] + [f"wait, let me verify: {last}"] * repeats + [answer])
        return Trace(format_response(think, task.answer_text(answer)), "stop", defect, True)
    if defect == "language_mix":
        span = rng.choice(_FOREIGN_SPANS)
        parts = clean_think(expr, seed, cfg).split(";")
        at = rng.randint(0, len(parts) - 1)
        parts[at] = f"{span} {parts[at]}"
        return Trace(format_response(";".join(parts), task.answer_text(answer)), "stop", defect, True)
    if defect == "truncated":
        full = clean_response(expr, seed, cfg)
        end = full.index(THINK_CLOSE)
        cut = rng.randint(len(THINK_OPEN) + 1, end)
        return Trace(full[:cut], "length", defect, True)
    if defect == "exact_duplicate":
        return Trace(clean_response(expr, seed - 1, cfg), "stop", defect, True)
    if defect == "near_duplicate":
        # the previous sample again with surface edits: spacing after separators, a final period
        text = clean_response(expr, seed - 1, cfg)
        edits = [e for e in _NEAR_DUP_EDITS if e != "spaced" or ";" in text]
        for edit in rng.sample(edits, rng.randint(1, len(edits))):
            text = text.replace(";", "; ") if edit == "spaced" else text + "."
        return Trace(text, "stop", defect, True)
    raise ValueError(f"unknown defect {defect!r}")


def _cap_tokens(trace: Trace, max_tokens: int) -> Trace:
    """A response longer than the request's max_tokens is cut there, as a server would."""
    from recipes import tokenizer

    tok = tokenizer.load()  # the embedded teacher speaks the embedded students' tokenizer
    ids = tok.encode(trace.text)
    if len(ids) <= max_tokens:
        return trace
    label = trace.defect if trace.defect != "none" else "truncated"
    return Trace(tok.decode(ids[:max_tokens]), "length", label, trace.injected)
