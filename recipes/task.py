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


def train_problems(levels: list[int] | tuple[int, ...], n_per_level: int | list[int], seed: int = 0) -> list[Problem]:
    """Training problems, level by level (one count for all levels, or one per level), shuffled with the seed."""
    counts = n_per_level if isinstance(n_per_level, (list, tuple)) else [n_per_level] * len(levels)
    if len(counts) != len(levels):
        raise ValueError(f"n_per_level has {len(counts)} counts for {len(levels)} levels")
    out = [p for lvl, n in zip(levels, counts) for p in generate(lvl, n, seed=seed)]
    random.Random(seed).shuffle(out)
    return out


def heldout_problems(levels: list[int] | tuple[int, ...], n_per_level: int) -> list[Problem]:
    """The fixed held-out split: the same problems for every caller (seed fixed at 0)."""
    return [p for lvl in levels for p in generate(lvl, n_per_level, seed=0, heldout=True)]


# ------------------------------------------------------------------------------ solving

_TOKEN = re.compile(r"\d+|[()+\-*]")


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr.replace(" ", ""))


def _spelled_out(a: int, op: str, b: int) -> list[str] | None:
    """The written-out form of a hard operation, or None when it is easy enough to do at once.

    83-47 -> 83-40-7 (tens, then units); 47*3 -> (40*3+7*3) (tens and units times the digit).
    Every part is an operation on a round number or a single digit.
    """
    def split(x: int) -> tuple[str, str]:
        return str(x - x % 10), str(x % 10)

    def hard(x: int) -> bool:  # two digits, not round
        return 10 < x < 100 and x % 10 != 0

    if op == "-" and hard(b):
        tens, units = split(b)
        return [str(a), "-", tens, "-", units]
    if op == "*" and hard(a) and 2 <= b <= 9:
        tens, units = split(a)
        return ["(", tens, "*", str(b), "+", units, "*", str(b), ")"]
    if op == "*" and hard(b) and 2 <= a <= 9:
        tens, units = split(b)
        return ["(", str(a), "*", tens, "+", str(a), "*", units, ")"]
    return None


def _reduce_flat(tokens: list[str], spell_out: bool = False) -> list[str]:
    """One operation inside a parenthesis-free token list: the first *, else the first + or -.

    spell_out: a hard operation is rewritten into its written-out form instead of its value.
    """
    for ops in ("*", "+-"):
        for i in range(1, len(tokens) - 1, 2):
            if tokens[i] in ops:
                a, b = int(tokens[i - 1]), int(tokens[i + 1])
                value = a * b if tokens[i] == "*" else a + b if tokens[i] == "+" else a - b
                if value < 0:
                    raise NegativeIntermediate(value)
                written = _spelled_out(a, tokens[i], b) if spell_out else None
                if written and written[0] == "(" and len(tokens) == 3:  # the whole group: no extra parentheses
                    written = written[1:-1]
                return tokens[: i - 1] + (written or [str(value)]) + tokens[i + 2 :]
    raise ValueError(f"nothing to reduce in {''.join(tokens)!r}")


class NegativeIntermediate(ValueError):
    """The task keeps every intermediate value >= 0; generators skip expressions that break it."""


def reduce_once(expr: str, spell_out: bool = False) -> str:
    """Evaluate exactly one operation of `expr` (innermost parentheses first), or write a hard one out."""
    tokens = _tokens(expr)
    if ")" in tokens:
        close = tokens.index(")")
        open_ = max(i for i in range(close) if tokens[i] == "(")
        inner = _reduce_flat(tokens[open_ + 1 : close], spell_out)
        if len(inner) == 1:  # "(7)" loses its parentheses in the same step
            tokens = tokens[:open_] + inner + tokens[close + 1 :]
        else:
            tokens = tokens[: open_ + 1] + inner + tokens[close:]
        return "".join(tokens)
    return "".join(_reduce_flat(tokens, spell_out))


def solve_steps(expr: str, spell_out: bool = False) -> list[str]:
    """Every rewrite of expr, one operation per step; the last item is the integer answer.

    spell_out: hard operations (a two-digit subtrahend, a two-digit times one-digit product) are first
    rewritten into operations on round numbers and digits, as a careful solver writes them.
    """
    steps = []
    cur = expr
    while not cur.isdigit():
        cur = reduce_once(cur, spell_out)
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


def cot_text(problem: Problem, spell_out: bool = False) -> str:
    """The canonical reasoning: the steps separated by ';' (the content between the think tags)."""
    return ";".join(solve_steps(problem.question, spell_out=True) if spell_out else problem.steps)


def answer_text(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def assistant_response(problem: Problem, think: bool = True, spell_out: bool = False) -> str:
    """The canonical assistant message: '<think>\\nsteps\\n</think>\\n\\n\\boxed{N}' (or no-think)."""
    from recipes.response_format import format_response

    return format_response(cot_text(problem, spell_out) if think else None, answer_text(problem.answer))
