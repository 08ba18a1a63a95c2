"""The embedded reasoning task: multi-step integer arithmetic with verifiable answers.

A problem at level L has L binary operations (+, -, *) on 1-2 digit operands, with parentheses.
Its chain of thought rewrites the expression one operation at a time (innermost parentheses
first, then * before + and -, left to right), so the trace length grows with the level: levels 1-3
are learnable by a tiny model on CPU in minutes, levels 4+ leave room for RL.

Every intermediate value stays within 0..MAX_VALUE. The task is about multi-step reduction, not
memorising a multiplication table: a 0.8M-parameter student scores near 0% on problems whose steps
reach 3-4 digit products (e.g. 43*79) and 50-90% on the rest after the same SFT budget.

The held-out split is fixed by a hash of the expression (about 1 in 10 expressions), so every
train generator, whatever its seed, never yields a held-out problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

OPS = "+-*"
HELDOUT_MODULUS = 10
MAX_VALUE = 200


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    level: int
    question: str  # the expression, e.g. "(3+4)*5-2"
    answer: str  # the integer value as text, e.g. "33"
    steps: tuple[str, ...]  # each rewrite of the expression, the last is the answer

    def to_dict(self) -> dict:
        return {"id": self.id, "level": self.level, "problem": self.question, "answer": self.answer}


# ------------------------------------------------------------------------------ generation


def _random_expr(rng: random.Random, n_ops: int) -> str:
    """A random expression with exactly n_ops operations; subtrees get parentheses at random."""
    if n_ops == 0:
        return str(rng.randint(1, 99) if rng.random() < 0.6 else rng.randint(1, 9))
    left_ops = rng.randint(0, n_ops - 1)
    left = _random_expr(rng, left_ops)
    right = _random_expr(rng, n_ops - 1 - left_ops)
    op = rng.choice(OPS)
    if left_ops > 0 and rng.random() < 0.5:
        left = f"({left})"
    if n_ops - 1 - left_ops > 0 and (op in "-*" or rng.random() < 0.5):
        right = f"({right})"
    return f"{left}{op}{right}"


def is_heldout(expr: str) -> bool:
    digest = hashlib.sha256(expr.encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELDOUT_MODULUS == 0


def _problem(expr: str, level: int) -> Problem:
    steps = tuple(solve_steps(expr))
    pid = f"arith-L{level}-{hashlib.sha1(expr.encode()).hexdigest()[:12]}"
    return Problem(id=pid, level=level, question=expr, answer=steps[-1], steps=steps)


def _stream(level: int, seed: int, heldout: bool, max_value: int):
    rng = random.Random(f"{seed}:{level}:{heldout}")
    seen: set[str] = set()
    misses = 0  # draws since the last new problem
    while True:
        misses += 1
        if misses > 200_000:  # level 1 has ~14k train problems in all: asking for more cannot finish
            raise ValueError(f"level {level}: no new {'held-out' if heldout else 'train'} problem in 200,000 "
                             f"draws after {len(seen)}; ask for fewer problems of this level")
        expr = _random_expr(rng, level)
        if expr in seen or is_heldout(expr) != heldout:
            continue
        try:
            steps = solve_steps(expr)
        except NegativeIntermediate:
            continue
        if any(int(tok) > max_value for s in steps for tok in re.findall(r"\d+", s)):
            continue  # keep intermediate numbers small: big products only add table lookups, not reasoning
        seen.add(expr)
        misses = 0
        yield _problem(expr, level)


def generate(level: int, n: int, seed: int = 0, heldout: bool = False, max_value: int = MAX_VALUE) -> list[Problem]:
    """n distinct problems of one level from the train split (or the held-out split)."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    stream = _stream(level, seed, heldout, max_value)
    return [next(stream) for _ in range(n)]


def train_problems(levels: list[int] | tuple[int, ...], n_per_level: int, seed: int = 0) -> list[Problem]:
    """Training problems, level by level, shuffled together with the seed."""
    out = [p for lvl in levels for p in generate(lvl, n_per_level, seed=seed)]
    random.Random(seed).shuffle(out)
    return out


def heldout_problems(levels: list[int] | tuple[int, ...], n_per_level: int) -> list[Problem]:
    """The fixed held-out split: the same problems for every caller (seed fixed at 0)."""
    return [p for lvl in levels for p in generate(lvl, n_per_level, seed=0, heldout=True)]


# ------------------------------------------------------------------------------ solving

_TOKEN = re.compile(r"\d+|[()+\-*]")


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr.replace(" ", ""))


def _reduce_flat(tokens: list[str]) -> list[str]:
    """One operation inside a parenthesis-free token list: the first *, else the first + or -."""
    for ops in ("*", "+-"):
        for i in range(1, len(tokens) - 1, 2):
            if tokens[i] in ops:
                a, b = int(tokens[i - 1]), int(tokens[i + 1])
                value = a * b if tokens[i] == "*" else a + b if tokens[i] == "+" else a - b
                if value < 0:
                    raise NegativeIntermediate(value)
                return tokens[: i - 1] + [str(value)] + tokens[i + 2 :]
    raise ValueError(f"nothing to reduce in {''.join(tokens)!r}")


class NegativeIntermediate(ValueError):
    """The task keeps every intermediate value >= 0; generators skip expressions that break it."""


def reduce_once(expr: str) -> str:
    """Evaluate exactly one operation of `expr` (innermost parentheses first)."""
    tokens = _tokens(expr)
    if ")" in tokens:
        close = tokens.index(")")
        open_ = max(i for i in range(close) if tokens[i] == "(")
        inner = _reduce_flat(tokens[open_ + 1 : close])
        if len(inner) == 1:  # "(7)" loses its parentheses in the same step
            tokens = tokens[:open_] + inner + tokens[close + 1 :]
        else:
            tokens = tokens[: open_ + 1] + inner + tokens[close:]
        return "".join(tokens)
    return "".join(_reduce_flat(tokens))


def solve_steps(expr: str) -> list[str]:
    """Every rewrite of expr, one operation per step; the last item is the integer answer."""
    steps = []
    cur = expr
    while not cur.isdigit():
        cur = reduce_once(cur)
        steps.append(cur)
    # the step chain must agree with Python's arithmetic; a mismatch is a bug in the reducer
    if int(cur) != evaluate(expr):
        raise AssertionError(f"reducer disagrees with eval on {expr!r}: {cur}")
    return steps


def evaluate(expr: str) -> int:
    if not re.fullmatch(r"[\d+\-*() ]+", expr):
        raise ValueError(f"not an arithmetic expression of this task: {expr!r}")
    return int(eval(expr, {"__builtins__": {}}))  # noqa: S307


# ------------------------------------------------------------------------------ traces


def cot_text(problem: Problem) -> str:
    """The canonical reasoning: the steps separated by ';' (the content between the think tags)."""
    return ";".join(problem.steps)


def answer_text(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def assistant_response(problem: Problem, think: bool = True) -> str:
    """The canonical assistant message: '<think>\\nsteps\\n</think>\\n\\n\\boxed{N}' (or no-think)."""
    from recipes.chat_template import format_response

    return format_response(cot_text(problem) if think else None, answer_text(problem.answer))
