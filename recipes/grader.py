"""The answer grader shared by curation, rewards and evaluation.

    final_answer(response) -> str | None      the final answer a raw response commits to (after its think block)
    extract_answer(text) -> str | None        the same, in a response's answer part
    grade(predicted, reference) -> bool       is it the reference answer?
    grade_response(response, reference)       both, with the path that decided (GradeResult)

Grading has two paths. The fast path normalises LaTeX (`\\dfrac`, `\\frac12`, `\\left(`, `\\!`,
`^\\circ`, `\\%`, `\\text{}`, units, `$`) and compares strings, numbers (integers, decimals,
fractions, mixed numbers, percentages, scientific notation, thousands separators), tuples,
intervals and unordered lists of answers item by item. Only what it cannot decide goes to
math-verify (`parse` + `verify`), which runs in persistent worker processes: math-verify times out
with `signal.alarm`, which neither works outside the main thread nor interrupts sympy inside a
C-level big-integer operation, so a call that overruns has its worker killed and restarted.

`timeout` bounds the grading of one response, every math-verify call it makes together (a list answer
can chain up to MAX_LIST_ITEMS^2 of them): once it is spent the response is incorrect with method
"timeout". A worker runs one call at a time (signal.alarm is per process, and the pipe carries one
request); threads share a pool of up to MAX_WORKERS of them, and the wait for a free one counts
against the same budget. A pathological response therefore costs at most `timeout` seconds (plus a
worker's start, which is not charged), never a hang.

`stats()` counts which path decided each `grade` call (the fast-path hit rate in `nrr bench eval`).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from recipes.response_format import split_response

# Longest answer the grader compares; longer text is no answer a benchmark has.
MAX_ANSWER_CHARS = 2_000
# How far past `\boxed{` brace matching looks before giving up on an unclosed box.
MAX_BOXED_SCAN = 20_000
# How many `\boxed` occurrences (from the end) extraction tries before other conventions.
MAX_BOXED_TRIES = 8
# Items in an answer list compared one by one; more is not an answer, it is noise.
MAX_LIST_ITEMS = 32
# Largest decimal exponent the numeric path evaluates (1e400 is fine, 1e99999999 is not).
MAX_EXPONENT = 400
# Seconds the math-verify worker may take to start (imports sympy); not charged to a call.
STARTUP_TIMEOUT = 60.0
# math-verify processes graded on at once: sympy is CPU-bound, so more than the cores gain nothing (and each holds
# ~100 MB); a fifth thread waits for a free one, within its response's budget.
MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))

METHODS = ("exact", "numeric", "math_verify", "timeout", "no_answer")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    predicted: str | None
    correct: bool
    method: str  # one of METHODS: the path that decided


_STATS: collections.Counter = collections.Counter()


def stats() -> dict[str, int]:
    """How many grade() calls each path decided since the last reset (keys: METHODS)."""
    return {m: _STATS.get(m, 0) for m in METHODS}


def reset_stats() -> None:
    _STATS.clear()


def fast_path_rate() -> float:
    """Share of graded (non-empty) answers the fast path decided without math-verify."""
    s = stats()
    graded = s["exact"] + s["numeric"] + s["math_verify"] + s["timeout"]
    return (s["exact"] + s["numeric"]) / graded if graded else 0.0


# ============================================================================== extraction


def _match_brace(text: str, open_idx: int, limit: int) -> int | None:
    """Index of the brace closing text[open_idx] == '{', scanning at most `limit` chars; linear."""
    depth = 0
    end = min(len(text), open_idx + limit)
    i = open_idx
    while i < end:
        c = text[i]
        if c == "\\":  # an escaped brace `\{` does not count
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the `\\boxed{...}` / `\\boxed 5` / `\\fbox{...}` whose command starts at `start`."""
    m = _BOX_RE.match(text, start)
    if not m:
        return None
    i = m.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        close = _match_brace(text, i, MAX_BOXED_SCAN)
        if close is None:
            return None
        return text[i + 1 : close].strip()
    # `\boxed 5`: the form some solutions use for a single token
    if i > m.end():
        tok = re.match(r"[^\s$]+", text[i : i + MAX_ANSWER_CHARS])
        return tok.group(0).rstrip(".") if tok else None
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last closed `\\boxed{}`/`\\fbox{}` (earlier ones if the last is unclosed)."""
    pos = len(text)
    for _ in range(MAX_BOXED_TRIES):
        pos = max(text.rfind("\\boxed", 0, pos), text.rfind("\\fbox", 0, pos))
        if pos < 0:
            return None
        content = _boxed_content(text, pos)
        if content is not None:
            return content
    return None


# "The (final) answer is X", "Answer: X", "#### X": X runs to the end of its line.
_CONVENTIONS = [
    re.compile(r"#### *([^\n]+)"),
    re.compile(r"(?i)\bthe (?:final )?answer is[: ]*([^\n]+)"),
    re.compile(r"(?i)(?:^|\n)\**(?:final )?answer\**\s*[:：]\**\s*([^\n]+)"),
]
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Conventions are searched only in the tail of a response: a final answer comes last.
_TAIL_CHARS = 4_000


def _clean_convention(ans: str) -> str | None:
    ans = ans.strip().strip("*").strip()
    ans = re.sub(r"[.。]\s*$", "", ans).strip()
    if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
        ans = ans.strip("$").strip()
    boxed = last_boxed(ans)
    if boxed is not None:
        return boxed
    return ans or None


def extract_answer(text: str | None, last_number: bool = False) -> str | None:
    """The final answer in the answer part of a response (what follows the think block), or None.

    The last `\\boxed{}`/`\\fbox{}`; then "#### X", "the answer is X", "Answer: X"; then, only with
    `last_number=True`, the last number in the text. A raw model response goes through `final_answer`.
    """
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed if len(boxed) <= MAX_ANSWER_CHARS else None
    tail = text[-_TAIL_CHARS:]
    for pattern in _CONVENTIONS:
        matches = pattern.findall(tail)
        if matches:
            ans = _clean_convention(matches[-1])
            if ans and len(ans) <= MAX_ANSWER_CHARS:
                return ans
    if last_number:
        nums = _NUMBER_RE.findall(tail)
        if nums:
            return nums[-1].rstrip(".")
    return None


# ============================================================================== normalisation


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """One TeX argument at s[i:]: `{...}` or a single character; returns (arg, index after it)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        close = _match_brace(s, i, len(s))
        if close is None:
            return None
        return s[i + 1 : close], close + 1
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
    return s[i], i + 1


def _braced_frac_sqrt(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac 59` -> `\\frac{5}{9}`, `\\sqrt2` -> `\\sqrt{2}`."""
    out: list[str] = []
    i = 0
    while True:
        m = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])").search(s, i)
        if not m:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i : m.start()])
        j = m.end()
        if m.group(1) == "sqrt" and j < len(s) and s[j] == "[":
            out.append(s[m.start() : j])  # nth roots: leave as written
            i = j
            continue
        nargs = 2 if m.group(1) == "frac" else 1
        args = []
        for _ in range(nargs):
            got = _brace_arg(s, j)
            if got is None:
                break
            args.append(got[0])
            j = got[1]
        if len(args) != nargs:
            out.append(s[m.start() : m.end()])
            i = m.end()
            continue
        out.append("\\" + m.group(1) + "".join("{" + a.strip() + "}" for a in args))
        i = j


_UNIT_WORDS = (
    "degrees?|cents?|dollars?|units?|inches|inch|feet|foot|ft|meters?|cm|mm|km|m|hours?|hrs?|"
    "minutes?|mins?|seconds?|sec|s|days?|weeks?|years?|miles?|mph|km/h|kg|g|pounds?|lbs?|square|sq|"
    "cubic|people|students?|marbles?|apples?|cookies?|pages?|ways?|points?|times"
)
_TRAILING_UNIT_RE = re.compile(rf"(?<=[\d}}])\s*(?:(?:{_UNIT_WORDS})\b(?:\^?\{{?[23]\}}?)?\s*)+$")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def normalize(ans: str) -> str:
    """A canonical string form of an answer: what equal answers written differently share."""
    s = ans.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.replace("\n", " ")
    # math delimiters and spacing
    s = re.sub(r"\\[\[\]()]", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:displaystyle|textstyle|left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[!,;: ]", "", s).replace("~", " ")  # spacing; a row break stays
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\geqslant", "\\geq").replace("\\leqslant", "\\leq").replace("\\ge ", "\\geq ")
    s = s.replace("\\le ", "\\leq ").replace("\\cdot", "*").replace("\\times", "*")
    # degrees, percent, currency
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "").replace("°", "")
    pct = "%" in s
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    # \text{...}: units after a value are dropped; a whole-text answer keeps its words
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z /.]*\}(\^\{?[23]\}?)?\s*$", "", s)
    for _ in range(3):
        s = _TEXT_CMD_RE.sub(lambda m: m.group(1), s)
    s = _TRAILING_UNIT_RE.sub("", s.strip())
    s = _braced_frac_sqrt(s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 52_{8} -> 52_8, E_{1} -> E_1
    s = re.sub(r"\bnp\.(?=[a-z])", "\\\\", s)  # np.arcsin(...) -> \arcsin(...)
    # thousands separators: "10,080", "11,111,111,100" (only when every group has three digits)
    compact = re.sub(r",\s+(?=\d{3}\b)", ",", s.strip())
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", compact):
        s = compact.replace(",", "")
    s = re.sub(r"\s+", " ", s).strip()
    # "x = 5", "f(x) = x+1": the value is the answer
    m = re.fullmatch(r"[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-z]\))?\s*=\s*(.+)", s)
    if m and "=" not in m.group(1):
        s = m.group(1).strip()
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)
    s = s.rstrip(".").strip()
    # multiple-choice letters: "(C)", "\text{(C)}" -> "C"
    m = re.fullmatch(r"\(([A-E])\)", s)
    if m:
        s = m.group(1)
    if pct:
        s += "%"
    return s


# ============================================================================== fast path

_INT = r"\d+"
_DEC = r"(?:\d+\.\d*|\.\d+|\d+)"
_NUM_PATTERNS = [
    (re.compile(rf"({_DEC})(?:e([+-]?\d+))?"), "dec"),
    (re.compile(rf"({_DEC})\s*\*\s*10\^\{{?([+-]?\d+)\}}?"), "dec"),
    (re.compile(r"()10\^\{?([+-]?\d+)\}?"), "dec"),
    (re.compile(rf"\\frac\{{\s*(-?{_DEC})\s*\}}\{{\s*(-?{_DEC})\s*\}}"), "frac"),
    (re.compile(rf"({_DEC})\s*/\s*({_DEC})"), "frac"),
    (re.compile(rf"({_INT})\s*\\frac\{{({_INT})\}}\{{({_INT})\}}"), "mixed"),
]


def _dec(text: str, exp: str | None = None) -> Fraction:
    value = Fraction(text.rstrip(".") or "1")  # "10^{-5}" has no mantissa
    if exp:
        e = int(exp)
        if abs(e) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        value *= Fraction(10) ** e
    return value


def to_number(s: str) -> Fraction | None:
    """The exact value of a plain number in normalised form, or None (never evaluates powers)."""
    t = s.replace(" ", "")
    if not t or len(t) > 100:
        return None
    sign = 1
    while t[:1] in "+-" and t:
        sign = -sign if t[0] == "-" else sign
        t = t[1:]
    if t.startswith("{") and t.endswith("}"):
        t = t[1:-1]
    for pattern, kind in _NUM_PATTERNS:
        m = pattern.fullmatch(t)
        if not m:
            continue
        try:
            if kind == "dec":
                return sign * _dec(m.group(1), m.group(2))
            if kind == "frac":
                den = _dec(m.group(2).lstrip("-")) * (-1 if m.group(2).startswith("-") else 1)
                num = _dec(m.group(1).lstrip("-")) * (-1 if m.group(1).startswith("-") else 1)
                return sign * num / den if den else None
            if kind == "mixed":
                return sign * (int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    # decimals rounded in the last place: 0.3333 for 1/3 does not count, 1e-9 relative does
    return abs(a - b) <= Fraction(1, 10**9) * max(abs(a), abs(b))


_OPEN, _CLOSE = "([{", ")]}"


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside (), [], {}; linear."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == sep and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts.append(s[start:].strip())
    return parts


def _bracketed(s: str) -> tuple[str, list[str], str] | None:
    """`(a, b]` -> ('(', ['a', 'b'], ']') when the outer brackets wrap the whole string."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i != len(s) - 1:
                return None
    items = split_top_level(s[1:-1])
    return (s[0], items, s[-1]) if len(items) > 1 else None


def _is_text(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z .'-]*", s))


def _fast(p: str, r: str) -> tuple[bool | None, str]:
    """(verdict or None when undecided, method) on normalised strings."""
    if p == r:
        return True, "exact"
    if p.replace(" ", "") == r.replace(" ", ""):
        return True, "exact"
    pp, rp = p.endswith("%"), r.endswith("%")
    pn, rn = to_number(p.rstrip("%")), to_number(r.rstrip("%"))
    if pn is not None and rn is not None:
        if _numbers_equal(pn, rn):
            return True, "numeric"
        # "8%" vs "0.08": a percentage may be written as its fraction
        if pp != rp and _numbers_equal(pn / (100 if pp else 1), rn / (100 if rp else 1)):
            return True, "numeric"
        return False, "numeric"
    if _is_text(p) and _is_text(r):
        return p.lower() == r.lower(), "exact"
    pb, rb = _bracketed(p), _bracketed(r)
    if pb and rb:
        if len(pb[1]) != len(rb[1]):
            return False, "exact"
        method, undecided = "exact", False
        for a, b in zip(pb[1], rb[1]):
            v, m = _fast(a, b)
            method = "numeric" if m == "numeric" else method
            if v is False:
                return False, method
            undecided = undecided or v is None
        if undecided:
            return None, method
        return (pb[0], pb[2]) == (rb[0], rb[2]), method
    return None, "exact"


# ============================================================================== math-verify worker

_WORKER_CODE = "from recipes.grader import _worker_loop; _worker_loop()"


def _worker_loop() -> None:
    """Runs in the worker process: one JSON request per stdin line, one verdict per stdout line."""
    from math_verify import parse, verify

    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        pred, ref, timeout = json.loads(line)
        t = max(1, int(timeout))
        try:
            gold = parse(f"${ref}$", parsing_timeout=t)
            answer = parse(f"${pred}$", parsing_timeout=t)
            ok = bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=t))
        except BaseException:  # noqa: BLE001 - any failure of the checker is a wrong answer
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


class _MathVerifyWorker:
    """A persistent math-verify process, used by one thread at a time (`_WorkerPool`); killed and restarted when a
    call overruns its time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._owner = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        self._owner = os.getpid()
        return proc

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            proc.kill()
            proc.wait()

    def _read_line(self, proc: subprocess.Popen, seconds: float) -> str | None:
        """One line from the worker within `seconds`; None on timeout, '' when it died."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                return proc.stdout.readline()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._owner == os.getpid()

    def ensure_started(self) -> subprocess.Popen | None:
        if self.running():
            return self._proc
        self._proc = self._start()
        # startup (sympy, antlr imports) is not charged to the first call's timeout
        if self._read_line(self._proc, STARTUP_TIMEOUT) != "ready\n":
            self.kill()
            return None
        return self._proc

    def verify(self, pred: str, ref: str, seconds: float) -> bool | None:
        """True/False, or None when the call took more than `seconds` (the worker is then restarted)."""
        proc = self.ensure_started()
        try:
            proc.stdin.write(json.dumps([pred, ref, seconds]) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return False
        line = self._read_line(proc, seconds)
        if line is None:
            self.kill()
            return None
        if not line:  # the worker died (e.g. out of memory): a wrong answer
            self.kill()
            return False
        return line.strip() == "1"


class _Budget:
    """The seconds left to grade one response."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class _OutOfTime(Exception):
    """The response's grading budget is spent."""


class _WorkerPool:
    """Up to `size` workers, each lent to one thread for one call; the lock guards only the lending. Starting a
    worker (seconds: sympy's imports) is charged to no response, neither the one it starts for nor those waiting."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[_MathVerifyWorker] = []
        self._all: list[_MathVerifyWorker] = []
        self._starting = 0
        self._free = threading.Condition()

    def verify(self, pred: str, ref: str, budget: _Budget) -> bool:
        worker = self._borrow(budget)
        try:
            if not worker.running():
                started = time.monotonic()
                with self._free:
                    self._starting += 1
                try:
                    if worker.ensure_started() is None:
                        raise RuntimeError("the math-verify worker did not start: is math-verify installed?")
                finally:
                    with self._free:
                        self._starting -= 1
                budget.deadline += time.monotonic() - started
            left = budget.left()
            ok = worker.verify(pred, ref, left) if left > 0 else None
        finally:
            with self._free:
                self._idle.append(worker)
                self._free.notify_all()
        if ok is None:
            raise _OutOfTime
        return ok

    def _borrow(self, budget: _Budget) -> _MathVerifyWorker:
        with self._free:
            while not self._idle and len(self._all) >= self.size:
                starting = self._starting
                if budget.left() <= 0 and not starting:
                    raise _OutOfTime  # every worker busy for the rest of this response's time
                waited = time.monotonic()
                self._free.wait(0.1 if starting else budget.left())
                if starting:  # the wait was (at least partly) for a worker's start
                    budget.deadline += time.monotonic() - waited
            if self._idle:
                return self._idle.pop()
            worker = _MathVerifyWorker()
            self._all.append(worker)
            return worker

    def kill(self) -> None:
        for worker in list(self._all):
            worker.kill()


_WORKERS = _WorkerPool(MAX_WORKERS)
atexit.register(_WORKERS.kill)


def shutdown() -> None:
    """Stop the math-verify workers (they are restarted by the next call that needs one)."""
    _WORKERS.kill()


# ============================================================================== grading


def _as_text(reference) -> str:
    if isinstance(reference, (list, tuple)):
        return ",".join(str(r) for r in reference)
    if isinstance(reference, float) and reference.is_integer():
        return str(int(reference))
    return str(reference)


def _items(s: str) -> list[str]:
    """Top-level answers of a list, `\\{a, b\\}` included; one item when it is not a list."""
    if s.startswith("\\{") and s.endswith("\\}"):
        s = s[2:-2]
    parts = split_top_level(s)
    if not all(parts):
        return [s]
    out = []
    for part in parts:  # "1 \pm \sqrt{19}" is two answers
        a, pm, b = part.partition("\\pm")
        if pm and a.strip() and "\\pm" not in b:
            out += [f"{a.strip()}+{b.strip()}", f"{a.strip()}-{b.strip()}"]
        else:
            out.append(part)
    return out


def _for_math_verify(s: str) -> str:
    return s[:-1] + "\\%" if s.endswith("%") else s


def _grade_one(p: str, r: str, budget: _Budget) -> tuple[bool, str]:
    """One normalised answer against one: fast path, then math-verify (raises _OutOfTime)."""
    verdict, method = _fast(p, r)
    if verdict is not None:
        return verdict, method
    return _WORKERS.verify(_for_math_verify(p), _for_math_verify(r), budget), "math_verify"


_RANK = {"exact": 0, "numeric": 1, "math_verify": 2, "timeout": 3}


def _grade(predicted: str | None, reference, timeout: float) -> tuple[bool, str]:
    try:
        return _grade_within(predicted, reference, _Budget(timeout))
    except _OutOfTime:
        return False, "timeout"


def _grade_within(predicted: str | None, reference, budget: _Budget) -> tuple[bool, str]:
    if predicted is None or not str(predicted).strip():
        return False, "no_answer"
    predicted = str(predicted)
    if len(predicted) > MAX_ANSWER_CHARS:
        return False, "exact"
    ref = _as_text(reference)
    p, r = normalize(predicted), normalize(ref)
    p_items, r_items = _items(p), _items(r)
    if len(r_items) == 1 and len(p_items) == 1:
        return _grade_one(p, r, budget)
    # several answers: every reference answer matched by a distinct predicted one, in any order
    verdict, method = _fast(p, r)
    if verdict is True:
        return True, method
    if len(p_items) != len(r_items) or len(r_items) > MAX_LIST_ITEMS:
        if len(p_items) == 1:  # one expression for several answers (a set, "x = 1 or x = 2")
            return _grade_one(p, r, budget)
        return False, "exact"
    p_items, r_items = [normalize(x) for x in p_items], [normalize(x) for x in r_items]
    unused = list(range(len(p_items)))
    worst = "exact"
    for ri in r_items:
        found = None
        # fast comparisons for every candidate first; math-verify only when none decides
        undecided = []
        for j in unused:
            v, m = _fast(p_items[j], ri)
            if v:
                found, worst = j, max(worst, m, key=_RANK.get)
                break
            if v is None:
                undecided.append(j)
        if found is None:
            for j in undecided:
                v, m = _grade_one(p_items[j], ri, budget)
                worst = max(worst, m, key=_RANK.get)
                if v:
                    found = j
                    break
        if found is None:
            return False, worst
        unused.remove(found)
    return True, worst


def grade(predicted: str | None, reference, timeout: float = 5.0) -> bool:
    """Is `predicted` the answer `reference`? Reference: a string, a number, or a list of answers
    (OlympiadBench `final_answer`: all must match, in any order). `timeout`: seconds for the whole answer."""
    return grade_with_method(predicted, reference, timeout)[0]


def grade_with_method(predicted: str | None, reference, timeout: float = 5.0) -> tuple[bool, str]:
    correct, method = _grade(predicted, reference, timeout)
    _STATS[method] += 1
    return correct, method


def final_answer(response: str | None, last_number: bool = False) -> str | None:
    """The final answer of a raw model response: its answer part (`response_format.split_response`, the one cut at
    the think block; an unclosed block has none), then `extract_answer`."""
    _, answer_part, _ = split_response(response or "")
    return extract_answer(answer_part, last_number=last_number)


def grade_response(response: str, reference, timeout: float = 5.0, last_number: bool = False) -> GradeResult:
    """Grade a raw model response (think block and all) against the reference: every stage that grades a
    response calls this, so curation, rewards, GRPO's held-out check and evaluation agree on the same text."""
    predicted = final_answer(response, last_number=last_number)
    correct, method = grade_with_method(predicted, reference, timeout)
    return GradeResult(predicted=predicted, correct=correct, method=method)
