"""Stage 2: sample n responses per problem from a teacher behind an OpenAI-compatible endpoint.

Requests run concurrently (asyncio + httpx, at most `concurrency` in flight), each with its own
timeout, retried with exponential backoff and jitter on 429, 5xx, timeouts and connection errors
(a Retry-After header is honoured). Every finished (problem, sample) is appended to
`generations.jsonl` and flushed at once, so after a crash or a rerun only the missing pairs are
asked again. A pair whose retries run out is written as a failure record with its reason (and
asked again on the next run). The API key is read from the env var the config names and is never
logged or written.

Every failure carries an error class (`http_401`, `http_500`, `timeout`, `connection`, `malformed_json`,
`malformed_response`): the run fails when more than `max_failed_fraction` of its requests failed, and the
counts by class go into the report. A 401 / 403 stops the run at once (no request after it is sent): a
wrong key would fail every request, and asking thousands of times only delays the error.

A reasoning endpoint's thinking, returned apart from the answer (`reasoning_content`,
`reasoning`), is put back into the think format; the record says which field it came from.

`source: solution` turns human-written solutions (GSM8K) into think-format responses instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

import pandas as pd
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch

from curator_pipelines.config import TeacherRequestConfig
from curator_pipelines.records import FAILURES, log_stage, record_id
from recipes.response_format import THINK_CLOSE, THINK_OPEN, format_response

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
AUTH_STATUS = {401, 403}
NOT_ASKED = "not_asked"  # the error class of requests never sent (the run stopped at an auth error)
# where reasoning endpoints put the thinking: the DeepSeek API and older vLLM, then newer vLLM
REASONING_FIELDS = ("reasoning_content", "reasoning")


class GenerationError(RuntimeError):
    pass


def auth_error_message(cfg: TeacherRequestConfig, status: int) -> str:
    """What to fix when the endpoint refuses the key: the endpoint and the variable (never the key)."""
    where = (f"the key in ${cfg.api_key_env} (generation.api_key_env)" if cfg.api_key_env else
             "no key: generation.api_key_env is null; set it to the env var holding the endpoint's key")
    return f"the endpoint {cfg.base_url} refused the request with HTTP {status}: check {where}"


def api_key(cfg: TeacherRequestConfig) -> str:
    if not cfg.api_key_env:
        return "EMPTY"  # local servers (vLLM, the embedded teacher) accept any key
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise GenerationError(f"generation.api_key_env names the env var {cfg.api_key_env!r}, which is not set")
    return key


# ------------------------------------------------------------------ the resume file


def load_results(path: Path) -> dict[tuple[str, int], dict]:
    """Finished pairs from an earlier run; a torn last line (a killed writer) is ignored."""
    done: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return done
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            key = (rec["problem_id"], int(rec["sample_index"]))
            if done.get(key, {}).get("status") != "ok":  # a success stays; of failures, the latest tells
                done[key] = rec
    return done


def error_class(res: dict) -> str:
    """A failure's class; records written before classes existed get theirs from the error text."""
    if res.get("error_class"):
        return res["error_class"]
    found = re.match(r"HTTP (\d+)", res.get("error") or "")
    if found:
        return f"http_{found.group(1)}"
    for prefix, cls in (("timeout", "timeout"), ("connection", "connection"), ("malformed", "malformed_response")):
        if (res.get("error") or "").startswith(prefix):
            return cls
    return "unknown"


class ResultWriter:
    """Appends one JSON line per result and flushes it (the resume log)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        else:
            torn = False
        self._f = open(path, "a", encoding="utf-8")
        if torn:
            self._f.write("\n")  # end the line a killed run left unfinished
        self._lock = threading.Lock()

    def write(self, rec: dict) -> None:
        with self._lock:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------ the client


def request_body(cfg: TeacherRequestConfig, problem: str, sample_index: int) -> dict:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": cfg.prompt_template.format(problem=problem)})
    return {
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed + sample_index,
        "n": 1,
    }


def _retry_delay(cfg: TeacherRequestConfig, attempt: int, retry_after: str | None, rng: random.Random) -> float:
    delay = min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt) * (0.5 + 0.5 * rng.random())
    if retry_after:
        try:
            delay = max(delay, min(float(retry_after), cfg.backoff_max_s))
        except ValueError:
            pass
    return delay


def response_text(message: dict) -> tuple[str, str | None]:
    """The response in the project's format, and the message field its thinking came from (None: inline).

    A reasoning endpoint returns the thinking in its own field and only the answer in `content`, with
    the newlines around the think tags left on either side (vLLM's parsers) or not (the DeepSeek API);
    `format_response` puts its own. No answer at all means the thinking was never closed (cut at
    max_tokens), so it stays an open think block for the filters to see.
    """
    content = message.get("content") or ""
    field = next((f for f in REASONING_FIELDS if isinstance(message.get(f), str) and message[f]), None)
    if field is None or THINK_OPEN in content or THINK_CLOSE in content:
        return content, None
    thinking = message[field]
    if not content:
        return THINK_OPEN + "\n" + thinking.lstrip("\n"), field
    return format_response(thinking.strip("\n"), content.strip()), field


async def _one(client, cfg: TeacherRequestConfig, url: str, headers: dict, body: dict, rng: random.Random) -> dict:
    """One (problem, sample): the completion, or a failure with the last error (and its class) after all
    retries. Malformed JSON is retried like a 5xx: a proxy or a server cut off mid-write is usually transient."""
    import httpx

    last_error, error_class = "", ""
    for attempt in range(cfg.max_retries + 1):
        retry_after = None
        try:
            resp = await asyncio.wait_for(client.post(url, json=body, headers=headers), timeout=cfg.timeout_s)
            if resp.status_code == 200:
                try:
                    data = json.loads(resp.content)
                except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
                    raise _MalformedJSON(f"{type(err).__name__}: {err}") from None
                choice = data["choices"][0]
                response, reasoning_field = response_text(choice["message"])
                return {
                    "status": "ok",
                    "response": response,
                    "reasoning_field": reasoning_field,
                    "finish_reason": choice.get("finish_reason") or "",
                    "teacher_label": choice.get("nrr_defect", data.get("nrr_defect")),
                    "usage": data.get("usage"),
                    "attempts": attempt + 1,
                }
            last_error, error_class = f"HTTP {resp.status_code}: {resp.text[:200]}", f"http_{resp.status_code}"
            if resp.status_code not in RETRY_STATUS:
                return {"status": "failed", "error": last_error, "error_class": error_class, "attempts": attempt + 1}
            retry_after = resp.headers.get("retry-after")
        except (asyncio.TimeoutError, httpx.TimeoutException):
            last_error, error_class = f"timeout after {cfg.timeout_s:g}s", "timeout"
        except httpx.TransportError as err:
            last_error, error_class = f"connection error: {type(err).__name__}: {err}", "connection"
        except _MalformedJSON as err:
            last_error, error_class = f"malformed JSON: {err}", "malformed_json"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            last_error, error_class = f"malformed response: {type(err).__name__}: {err}", "malformed_response"
        if attempt < cfg.max_retries:
            await asyncio.sleep(_retry_delay(cfg, attempt, retry_after, rng))
    return {"status": "failed", "error": f"{last_error} (after {cfg.max_retries + 1} attempts)",
            "error_class": error_class, "attempts": cfg.max_retries + 1}


class _MalformedJSON(Exception):
    """A 200 whose body is not JSON (its own error class: not the same fix as a JSON missing `choices`)."""


async def _generate_all(cfg: TeacherRequestConfig, jobs: list[tuple[str, int, str]], writer: ResultWriter,
                        teacher: str, on_done) -> int | None:
    """Every job, unless the endpoint refuses the key: then the HTTP status (401 / 403), and the jobs not yet
    sent are dropped (only those already in flight, at most `concurrency`, come back)."""
    import httpx

    url = cfg.base_url.rstrip("/") + "/chat/completions"
    key = api_key(cfg)
    headers = {"Authorization": f"Bearer {key}"}
    sem = asyncio.Semaphore(cfg.concurrency)
    refused: list[int] = []
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:

        async def run(pid: str, s: int, problem: str) -> None:
            async with sem:
                if refused:
                    return
                rng = random.Random(f"{pid}#{s}")
                out = await _one(client, cfg, url, headers, request_body(cfg, problem, s), rng)
                if out.get("error_class") in {f"http_{c}" for c in AUTH_STATUS}:
                    refused.append(int(out["error_class"][5:]))  # under the semaphore: no later job is sent
            if "error" in out and key != "EMPTY" and len(key) >= 4:  # a server may echo the header back
                out["error"] = out["error"].replace(key, "***")
            writer.write({"problem_id": pid, "sample_index": s, "teacher": teacher, "time": time.time(), **out})
            on_done(out["status"])

        await asyncio.gather(*(run(pid, s, problem) for pid, s, problem in jobs))
    return refused[0] if refused else None


@contextlib.contextmanager
def watch_progress(results_path: Path, total: int, enabled: bool = True):
    """A progress bar in the driver that follows the resume log a generation stage writes elsewhere."""
    if not enabled:
        yield
        return
    from recipes.metrics import progress

    stop = threading.Event()

    def follow() -> None:
        with progress() as bar:
            task = bar.add_task("generate", total=total, info="")
            while not stop.wait(0.5):
                done = results_path.read_bytes().count(b"\n") if results_path.exists() else 0
                bar.update(task, completed=min(done, total))
                if done >= total:
                    return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def _run_coroutine(coro):
    """asyncio.run, also from a thread that already runs an event loop (an async Ray actor)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(coro)))
    thread.start()
    thread.join()
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def _catch(coro) -> tuple:
    try:
        return asyncio.run(coro), None
    except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
        return None, err


def generate(cfg: TeacherRequestConfig, problems: pd.DataFrame, results_path: Path, show_progress: bool = True) -> dict:
    """Ask the teacher for every missing (problem, sample) and append them to `results_path`."""
    teacher = cfg.teacher_name or cfg.model
    done = load_results(results_path)
    jobs = [(pid, s, prob) for pid, prob in zip(problems["problem_id"], problems["problem"])
            for s in range(cfg.n_samples) if done.get((pid, s), {}).get("status") != "ok"]
    stats = {"requested": len(jobs), "resumed": len(problems) * cfg.n_samples - len(jobs), "ok": 0, "failed": 0,
             "refused_status": None}
    if not jobs:
        return stats
    writer = ResultWriter(results_path)
    from recipes.metrics import progress

    try:
        # a bar when run in a terminal (in a Ray worker, the driver shows one: `watch_progress`)
        with progress(disable=not (show_progress and sys.stderr.isatty())) as bar:
            bar_task = bar.add_task("generate", total=len(jobs), info="")

            def on_done(status: str) -> None:
                stats[status] = stats.get(status, 0) + 1
                bar.update(bar_task, advance=1, info=f"failed {stats['failed']}")

            stats["refused_status"] = _run_coroutine(_generate_all(cfg, jobs, writer, teacher, on_done))
    finally:
        writer.close()
    return stats


# ------------------------------------------------------------------ human solutions (GSM8K)

_CALC = re.compile(r"<<[^<>]*>>")


def solution_response(solution: str, answer: str) -> str:
    """A human solution as a think-format response: annotations and the '####' line dropped."""
    lines = [ln.rstrip() for ln in _CALC.sub("", solution).splitlines()]
    think = "\n".join(ln for ln in lines if ln.strip() and not ln.lstrip().startswith("####"))
    return format_response(think, f"\\boxed{{{answer}}}")


# ------------------------------------------------------------------ the stage


def results_frame(problems: pd.DataFrame, results: dict[tuple[str, int], dict], n_samples: int,
                  refused_status: int | None = None) -> pd.DataFrame:
    """One row per (problem, sample) in input order, joined with its generation result; every row that is not
    a completion says why (`gen_error`, `gen_error_class`)."""
    rows = []
    missing = ({"status": "failed", "error": f"not sent: the endpoint refused the key (HTTP {refused_status})",
                "error_class": NOT_ASKED} if refused_status else
               {"status": "failed", "error": "no result recorded", "error_class": "missing"})
    for prob in problems.to_dict("records"):
        for s in range(n_samples):
            res = results.get((prob["problem_id"], s)) or missing
            ok = res.get("status") == "ok"
            rows.append({
                **prob,
                "sample_index": s,
                "record_id": record_id(prob["problem_id"], s),
                "response": res.get("response") if ok else None,
                "finish_reason": res.get("finish_reason") if ok else None,
                "teacher": res.get("teacher"),
                "teacher_label": res.get("teacher_label"),
                "reasoning_field": res.get("reasoning_field") if ok else None,
                "gen_attempts": res.get("attempts"),
                "gen_error": None if ok else res.get("error"),
                "gen_error_class": None if ok else error_class(res),
                "kept": ok,
                "dropped_by": None if ok else "generate",
                "drop_reason": None if ok else "generation_failed",
            })
    return pd.DataFrame(rows)


def failure_summary(df: pd.DataFrame, max_failed_fraction: float) -> dict:
    """Failed requests by error class (with one example error each) against the run's failure budget."""
    failed = df.loc[~df["kept"]]
    by_class = failed["gen_error_class"].value_counts()
    fraction = len(failed) / len(df) if len(df) else 0.0
    return {
        "requests": int(len(df)),
        "failed": int(len(failed)),
        "failed_problems": int(failed["problem_id"].nunique()),
        "failed_fraction": round(fraction, 4),
        "max_failed_fraction": max_failed_fraction,
        "exceeded": fraction > max_failed_fraction,
        "by_class": {str(k): int(v) for k, v in by_class.items()},
        "examples": {str(k): str(g["gen_error"].iloc[0]) for k, g in failed.groupby("gen_error_class")},
    }


def format_classes(by_class: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in by_class.items())


class GenerateStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Fails (GenerationError, after writing the report of what happened) when the endpoint refuses the key or
    more than `max_failed_fraction` of the requests failed."""

    name = "generate"
    resources = Resources(cpus=1.0)

    def __init__(self, cfg: TeacherRequestConfig, results_path: str, show_progress: bool = True,
                 run_name: str = "generate"):
        self.cfg = cfg
        self.results_path = results_path
        self.show_progress = show_progress
        self.run_name = run_name

    def process(self, task: DocumentBatch) -> DocumentBatch:
        started = time.perf_counter()
        problems = task.to_pandas()
        path = Path(self.results_path)
        n = self.cfg.n_samples
        if self.cfg.source == "solution":
            n = 1
            results = {(pid, 0): {"status": "ok", "response": solution_response(sol, ans), "finish_reason": "stop",
                                  "teacher": self.cfg.teacher_name or "human-solution", "attempts": 0}
                       for pid, sol, ans in zip(problems["problem_id"], problems["solution"], problems["reference"])}
            stats = {"requested": 0, "resumed": 0, "ok": len(results), "failed": 0, "refused_status": None}
        else:
            stats = generate(self.cfg, problems, path, self.show_progress)
            results = load_results(path)
        df = results_frame(problems, results, n, stats["refused_status"])
        metadata = dict(task._metadata)
        failures = failure_summary(df, self.cfg.max_failed_fraction)
        log_stage(metadata, self.name, len(df), len(df) - failures["failed"],
                  {"generation_failed": failures["failed"]} if failures["failed"] else {},
                  time.perf_counter() - started, requested=stats["requested"], resumed=stats["resumed"],
                  **({"errors": failures["by_class"]} if failures["failed"] else {}))
        metadata[FAILURES] = failures
        if stats["refused_status"]:
            error = f"{auth_error_message(self.cfg, stats['refused_status'])} ({format_classes(failures['by_class'])})"
        elif failures["exceeded"]:
            error = (f"generation failed for {failures['failed']} of {failures['requests']} requests "
                     f"({failures['failed_fraction']:.1%} > generation.max_failed_fraction "
                     f"{self.cfg.max_failed_fraction:.1%}): {format_classes(failures['by_class'])}")
        else:
            return DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=metadata)
        from curator_pipelines.report import write_failed_report

        write_failed_report(path.parent, self.run_name, metadata, error)
        raise GenerationError(error + f"; report in {path.parent}/report.md")
