"""An OpenAI-compatible teacher that solves the embedded task (POST /v1/chat/completions and /v1/completions,
GET /v1/models).

It stands in for a vLLM server, a NIM or a hosted API when none is reachable: the curation
pipeline talks to it through the same client code (and evaluation's endpoint backend through POST
/v1/completions, the arithmetic read from the rendered prompt). Each response carries the defect it was given
in a side-channel field (`nrr_defect`, `nrr_defect_injected`, per choice and at the top level) and
the server appends the same to its log, so tests can score the curation filters against the truth.
For client tests it also fails on purpose: 429 (with Retry-After), 500, a hang, or a 200 whose body is
cut-off JSON, for a share of requests; and, with `auth_key_env`, it answers 401 to any other key. Like a
reasoning endpoint (the DeepSeek API, vLLM with a reasoning parser) it can return the thinking in its own
message field (`reasoning_field`) and only the answer in `content`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from recipes.response_format import THINK_OPEN, split_response
from recipes.teacher.traces import TraceConfig, make_trace


@dataclasses.dataclass
class FaultConfig:
    """Share of requests answered with a failure instead of a completion."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_hang: float = 0.0
    rate_malformed_json: float = 0.0  # a 200 whose body is cut-off JSON (a proxy or a server dying mid-write)
    hang_s: float = 30.0  # how long a hanging request sleeps before it answers 504
    retry_after_s: float = 0.0  # the Retry-After header of a 429
    seed: int = 0


def fault_counts(log_path: str | Path) -> dict[str, int]:
    """Faults injected, by kind ("429", "500", "hang", "malformed_json", "401"), from a server's request log."""
    counts: dict[str, int] = {}
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        fault = json.loads(line).get("fault")
        if fault:
            counts[fault] = counts.get(fault, 0) + 1
    return counts


@dataclasses.dataclass
class TeacherServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, printed on startup
    model: str = "nrr-embedded-teacher"
    latency_s: float = 0.0  # added to every completion (a slower teacher, e.g. to interrupt a run)
    log_path: str | None = None  # JSONL of every request's outcome (the defect labels, faults)
    # the env var holding the key a client must send (Bearer); any other key gets 401. None: any key is accepted
    auth_key_env: str | None = None
    # None: the thinking inline in content; else the message field it moves to (DeepSeek API, vLLM)
    reasoning_field: Literal["reasoning_content", "reasoning"] | None = None
    traces: TraceConfig = dataclasses.field(default_factory=TraceConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)


def _user_message(messages: list) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def assistant_message(text: str, reasoning_field: str | None) -> dict:
    """A response as an endpoint returns it: inline, or its thinking in `reasoning_field` and the answer in content."""
    if reasoning_field is None or not text.startswith(THINK_OPEN):
        return {"role": "assistant", "content": text}
    thinking, answer, closed = split_response(text)
    if not closed:  # cut inside the thinking: all of it is reasoning, no answer (None, as vLLM sends)
        return {"role": "assistant", "content": None, reasoning_field: text[len(THINK_OPEN):].removeprefix("\n")}
    return {"role": "assistant", "content": answer, reasoning_field: thinking}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # the stdlib's listen backlog is 5: a client opening 16 connections at once would see some reset
    # (connection errors that a vLLM server would not cause)
    request_queue_size = 256


class TeacherServer:
    """The HTTP server plus its state (fault RNG, log file, counters)."""

    def __init__(self, cfg: TeacherServerConfig):
        from recipes import tokenizer

        self.cfg = cfg
        # the embedded students' tokenizer counts usage and caps max_tokens; loaded before the first request, so a
        # client's timeout never covers the load
        self.tokenizer = tokenizer.load()
        self._fault_rng = random.Random(cfg.faults.seed)
        self._auth_key = None
        if cfg.auth_key_env:
            self._auth_key = os.environ.get(cfg.auth_key_env)
            if not self._auth_key:
                raise ValueError(f"auth_key_env names the env var {cfg.auth_key_env!r}, which is not set")
        self._lock = threading.Lock()
        self._log = None
        if cfg.log_path:
            Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(cfg.log_path, "a", encoding="utf-8")
        self.counts: dict[str, int] = {}
        self.httpd = _HTTPServer((cfg.host, cfg.port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}/v1"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> TeacherServer:
        """Serve in a background thread (tests, in-process use)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="teacher", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- behaviour

    def _record(self, event: dict) -> None:
        with self._lock:
            key = event.get("defect") or event.get("fault") or "other"
            self.counts[key] = self.counts.get(key, 0) + 1
            if self._log is not None:
                self._log.write(json.dumps(event) + "\n")
                self._log.flush()

    def _draw_fault(self) -> str | None:
        f = self.cfg.faults
        with self._lock:
            u = self._fault_rng.random()
        for name, rate in (("429", f.rate_429), ("500", f.rate_500), ("hang", f.rate_hang),
                           ("malformed_json", f.rate_malformed_json)):
            if u < rate:
                return name
            u -= rate
        return None

    def complete(self, body: dict) -> dict:
        """A chat.completion for a request body (no faults; those are the handler's)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        question = _user_message(messages)
        seed = int(body.get("seed") or 0)
        n = int(body.get("n") or 1)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        choices = []
        completion_tokens = 0
        tok = self.tokenizer
        for i in range(n):
            trace = make_trace(question, seed + i, self.cfg.traces, int(max_tokens) if max_tokens else None)
            completion_tokens += len(tok.encode(trace.text))
            choices.append({
                "index": i,
                "message": assistant_message(trace.text, self.cfg.reasoning_field),
                "finish_reason": trace.finish_reason,
                "nrr_defect": trace.defect,
                "nrr_defect_injected": trace.injected,
            })
            self._record({"time": time.time(), "question": question, "seed": seed + i,
                          "defect": trace.defect, "injected": trace.injected, "finish_reason": trace.finish_reason})
        prompt_tokens = sum(len(tok.encode(str(m.get("content", "")))) for m in messages if isinstance(m, dict))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.cfg.model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "nrr_defect": choices[0]["nrr_defect"],
            "nrr_defect_injected": choices[0]["nrr_defect_injected"],
        }

    def complete_text(self, body: dict) -> dict:
        """A text_completion (the Completions API) for a request body: the question is the rendered prompt."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        # reasoning_field moves the thinking out of a chat message's content; a completion is plain text
        if self.cfg.reasoning_field:
            raise ValueError("reasoning_field is a chat-completions feature; /v1/completions returns text")
        chat = self.complete({**body, "messages": [{"role": "user", "content": prompt}]})
        choices = [{"index": c["index"], "text": c["message"]["content"] or "", "finish_reason": c["finish_reason"],
                    "nrr_defect": c["nrr_defect"]} for c in chat["choices"]]
        return {**chat, "object": "text_completion", "choices": choices}

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
                pass  # one line per request would drown the pipeline's own log

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._send_raw(status, json.dumps(payload).encode(), headers)

            def _send_raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout), nothing to do

            def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": server.cfg.model, "object": "model", "created": 0, "owned_by": "nrr"}]})
                elif self.path.rstrip("/") in ("/health", "/v1/health"):
                    self._send(200, {"status": "ok"})
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                route = self.path.rstrip("/").removeprefix("/v1")
                if route not in ("/chat/completions", "/completions"):
                    self._error(404, f"no route {self.path}", "not_found")
                    return
                if server._auth_key is not None and \
                        self.headers.get("Authorization", "") != f"Bearer {server._auth_key}":
                    server._record({"time": time.time(), "fault": "401"})
                    self._error(401, "invalid API key", "authentication_error")
                    return
                fault = server._draw_fault()
                if fault == "429":
                    server._record({"time": time.time(), "fault": "429"})
                    self._error(429, "rate limited (injected)", "rate_limit_error",
                                {"Retry-After": str(server.cfg.faults.retry_after_s)})
                    return
                if fault == "500":
                    server._record({"time": time.time(), "fault": "500"})
                    self._error(500, "internal error (injected)", "server_error")
                    return
                if fault == "hang":
                    server._record({"time": time.time(), "fault": "hang"})
                    time.sleep(server.cfg.faults.hang_s)
                    self._error(504, "timed out (injected hang)", "timeout")
                    return
                if fault == "malformed_json":
                    server._record({"time": time.time(), "fault": "malformed_json"})
                    self._send_raw(200, b'{"id": "chatcmpl-cut", "choices": [{"index": 0, "message": {"role": "ass')
                    return
                try:
                    body = json.loads(raw or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("the request body must be a JSON object")
                    if server.cfg.latency_s:
                        time.sleep(server.cfg.latency_s)
                    chat = route == "/chat/completions"
                    self._send(200, server.complete(body) if chat else server.complete_text(body))
                except (ValueError, TypeError) as err:
                    self._error(400, str(err), "invalid_request_error")

        return Handler
