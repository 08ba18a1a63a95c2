"""Stage 2: sample n responses per problem from a teacher behind an OpenAI-compatible endpoint.

Requests run concurrently (asyncio + httpx, at most `concurrency` in flight), each with its own
timeout, retried with exponential backoff and jitter on 429, 5xx, timeouts and connection errors
(a Retry-After header is honoured). Every finished (problem, sample) is appended to
`generations.jsonl` and flushed at once, so after a crash or a rerun only the missing pairs are
asked again. A pair whose retries run out is written as a failure record with its reason (and
asked again on the next run). The API key is read from the env var the config names and is never
logged or written.

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
from curator_pipelines.records import log_stage, record_id
from recipes.response_format import THINK_CLOSE, THINK_OPEN, format_response

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# where reasoning endpoints put the thinking: the DeepSeek API and older vLLM, then newer vLLM
REASONING_FIELDS = ("reasoning_content", "reasoning")


class GenerationError(RuntimeError):
    pass


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
            if rec.get("status") == "ok" or key not in done:
                if done.get(key, {}).get("status") != "ok":
                    done[key] = rec
    return done


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
    """One (problem, sample): the completion, or a failure with the last error after all retries."""
    import httpx

    last_error = ""
    for attempt in range(cfg.max_retries + 1):
        retry_after = None
        try:
            resp = await asyncio.wait_for(client.post(url, json=body, headers=headers), timeout=cfg.timeout_s)
            if resp.status_code == 200:
                data = resp.json()
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
            last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code not in RETRY_STATUS:
                return {"status": "failed", "error": last_error, "attempts": attempt + 1}
            retry_after = resp.headers.get("retry-after")
        except (asyncio.TimeoutError, httpx.TimeoutException):
            last_error = f"timeout after {cfg.timeout_s:g}s"
        except httpx.TransportError as err:
            last_error = f"connection error: {type(err).__name__}: {err}"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            last_error = f"malformed response: {type(err).__name__}: {err}"
        if attempt < cfg.max_retries:
            await asyncio.sleep(_retry_delay(cfg, attempt, retry_after, rng))
    return {"status": "failed", "error": f"{last_error} (after {cfg.max_retries + 1} attempts)",
            "attempts": cfg.max_retries + 1}


async def _generate_all(cfg: TeacherRequestConfig, jobs: list[tuple[str, int, str]], writer: ResultWriter,
                        teacher: str, on_done) -> None:
    import httpx

    url = cfg.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key(cfg)}"}
    sem = asyncio.Semaphore(cfg.concurrency)
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:

        async def run(pid: str, s: int, problem: str) -> None:
            async with sem:
                rng = random.Random(f"{pid}#{s}")
                out = await _one(client, cfg, url, headers, request_body(cfg, problem, s), rng)
            writer.write({"problem_id": pid, "sample_index": s, "teacher": teacher, "time": time.time(), **out})
            on_done(out["status"])

        await asyncio.gather(*(run(pid, s, problem) for pid, s, problem in jobs))


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


def _run_coroutine(coro) -> None:
    """asyncio.run, also from a thread that already runs an event loop (an async Ray actor)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: errors.extend(_catch(coro)))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _catch(coro) -> list[BaseException]:
    try:
        asyncio.run(coro)
    except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
        return [err]
    return []


def generate(cfg: TeacherRequestConfig, problems: pd.DataFrame, results_path: Path, show_progress: bool = True) -> dict:
    """Ask the teacher for every missing (problem, sample) and append them to `results_path`."""
    teacher = cfg.teacher_name or cfg.model
    done = load_results(results_path)
    jobs = [(pid, s, prob) for pid, prob in zip(problems["problem_id"], problems["problem"])
            for s in range(cfg.n_samples) if done.get((pid, s), {}).get("status") != "ok"]
    stats = {"requested": len(jobs), "resumed": len(problems) * cfg.n_samples - len(jobs), "ok": 0, "failed": 0}
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

            _run_coroutine(_generate_all(cfg, jobs, writer, teacher, on_done))
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


def results_frame(problems: pd.DataFrame, results: dict[tuple[str, int], dict], n_samples: int) -> pd.DataFrame:
    """One row per (problem, sample) in input order, joined with its generation result."""
    rows = []
    for prob in problems.to_dict("records"):
        for s in range(n_samples):
            res = results.get((prob["problem_id"], s))
            if res is None:
                res = {"status": "failed", "error": "no result recorded"}
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
                "kept": ok,
                "dropped_by": None if ok else "generate",
                "drop_reason": None if ok else "generation_failed",
            })
    return pd.DataFrame(rows)


class GenerateStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    name = "generate"
    resources = Resources(cpus=1.0)

    def __init__(self, cfg: TeacherRequestConfig, results_path: str, show_progress: bool = True):
        self.cfg = cfg
        self.results_path = results_path
        self.show_progress = show_progress

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
            stats = {"requested": 0, "resumed": 0, "ok": len(results), "failed": 0}
        else:
            stats = generate(self.cfg, problems, path, self.show_progress)
            results = load_results(path)
        df = results_frame(problems, results, n)
        metadata = dict(task._metadata)
        failed = int((~df["kept"]).sum())
        log_stage(metadata, self.name, len(df), len(df) - failed, {"generation_failed": failed} if failed else {},
                  time.perf_counter() - started, requested=stats["requested"], resumed=stats["resumed"])
        return DocumentBatch(dataset_name=task.dataset_name, data=df, _metadata=metadata)
