"""Any OpenAI-compatible endpoint (a vLLM or NIM server, a hosted API) through the Completions API.

`generate` raises at a prompt's first failure (after the client's retries); `generate_tolerant` hands back an
`EndpointFailure` (error class and message) for that prompt instead, so evaluation can count failures against its
budget. A 401 / 403 stops both at once: a refused key would fail every request.

`prompt_logprobs` scores given token ids (a teacher behind an endpoint, `recipes.distillation`) through vLLM's
extension of the Completions API (`prompt_logprobs`), and `tokenize` reads the server's tokenizer (vLLM's
POST /tokenize); an endpoint without them (a hosted API, most NIMs) is an `EndpointCapabilityError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

from recipes.config import ConfigError
from recipes.generation.backend import Completion, Prompt, SamplingParams

AUTH_CLASSES = ("http_401", "http_403")


@dataclasses.dataclass
class EndpointFailure:
    """A prompt the endpoint gave no completion for, after its retries."""

    error_class: str  # http_<status>, timeout, connection, malformed_json, not_asked
    error: str


class EndpointAuthError(RuntimeError):
    """The endpoint refused the key (HTTP 401 / 403)."""


class EndpointCapabilityError(RuntimeError):
    """The endpoint lacks what was asked of it (prompt log-probs, a tokenizer route)."""


def endpoint_api_key(api_key_env: str | None, key_setting: str = "generation.api_key_env") -> str:
    """The key from the variable the config names; None names none: an endpoint that needs no key (a local vLLM).
    `key_setting` is the config key that names the variable (for the error)."""
    if api_key_env is None:
        return "EMPTY"  # the client requires some value; a server without auth ignores it
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(f"{key_setting} names the env var {api_key_env!r}, which is not set: export it, "
                          f"or set {key_setting}=null for an endpoint that needs no key")
    return key


def error_class(err: BaseException) -> str | None:
    """An endpoint failure's class; None: not the endpoint's (a bug here), to be raised."""
    import openai

    if isinstance(err, openai.APIStatusError):
        return f"http_{err.status_code}"
    if isinstance(err, openai.APITimeoutError):  # before APIConnectionError, its base class
        return "timeout"
    if isinstance(err, openai.APIConnectionError):
        return "connection"
    if isinstance(err, json.JSONDecodeError):  # a 200 whose body is not JSON (the client parses it as such)
        return "malformed_json"
    return None


class OpenAIBackend:
    """Completions on pre-rendered prompts (the server must not apply a chat template again); the key comes
    from the variable `api_key_env` names and is handed to the client only, never logged or written."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 600.0, tokenizer_dir: str | None = None,
                 max_retries: int = 2, key_setting: str = "generation.api_key_env"):
        import openai

        if not base_url:
            raise ValueError("generation.base_url is required for the openai backend")
        self._key = endpoint_api_key(api_key_env, key_setting)
        self.base_url, self.api_key_env, self.max_retries = base_url, api_key_env, max_retries
        self.key_setting, self.timeout = key_setting, timeout
        # the client retries 429 / 5xx / timeouts / connection errors itself; malformed JSON is retried here
        self.client = openai.OpenAI(base_url=base_url, api_key=self._key, timeout=timeout, max_retries=max_retries)
        self.model = model
        self.max_concurrency = max_concurrency
        self.tokenizer = None
        if tokenizer_dir and Path(tokenizer_dir, "tokenizer.json").exists():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count_tokens(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _one(self, prompt: Prompt, params: SamplingParams) -> list[Completion]:
        if not isinstance(prompt, str):
            raise TypeError("the openai backend takes rendered text prompts, not token ids")
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.completions.create(
                    model=self.model, prompt=prompt, n=params.n, temperature=params.temperature,
                    top_p=params.top_p, max_tokens=params.max_tokens, seed=params.seed,
                    extra_body={"skip_special_tokens": False},
                )
                break
            except json.JSONDecodeError:
                if attempt == self.max_retries:
                    raise
        total = resp.usage.completion_tokens if resp.usage else None
        comps = []
        for choice in sorted(resp.choices, key=lambda c: c.index):
            n_tok = self.count_tokens(choice.text)
            if n_tok is None:
                n_tok = (total or 0) // max(1, len(resp.choices))
            finish = "length" if choice.finish_reason == "length" else "stop"
            comps.append(Completion([], choice.text, finish, num_tokens=n_tok))
        return comps

    def _auth_error(self, cls: str) -> EndpointAuthError:
        where = (f"the key in ${self.api_key_env} ({self.key_setting})" if self.api_key_env else
                 f"no key: {self.key_setting} is null; set it to the env var holding the endpoint's key")
        return EndpointAuthError(f"the endpoint {self.base_url} refused the request with HTTP {cls[5:]}: "
                                 f"check {where}")

    def _redact(self, message: str) -> str:
        if self._key != "EMPTY" and len(self._key) >= 4:  # a server may echo the header back
            message = message.replace(self._key, "***")
        return message

    def generate_tolerant(self, prompts: list[Prompt],
                          params: SamplingParams) -> list[list[Completion] | EndpointFailure]:
        """Completions per prompt, or its failure; raises EndpointAuthError at a 401 / 403 (prompts not yet sent
        are not sent)."""
        from concurrent.futures import ThreadPoolExecutor

        refused: list[str] = []
        lock = threading.Lock()

        def one(prompt: Prompt):
            if refused:
                return EndpointFailure("not_asked", "not sent: the endpoint refused the key")
            try:
                return self._one(prompt, params)
            except Exception as err:  # noqa: BLE001 - classified; what is not the endpoint's is raised
                cls = error_class(err)
                if cls is None:
                    raise
                if cls in AUTH_CLASSES:
                    with lock:
                        refused.append(cls)
                return EndpointFailure(cls, self._redact(f"{type(err).__name__}: {err}")[:300])

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            results = list(pool.map(one, prompts))
        if refused:
            raise self._auth_error(refused[0])
        return results

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        results = self.generate_tolerant(prompts, params)
        failed = next((r for r in results if isinstance(r, EndpointFailure)), None)
        if failed is not None:
            raise RuntimeError(f"the endpoint {self.base_url} gave no completion ({failed.error_class}): "
                               f"{failed.error}")
        return results

    # ---------------------------------------------------------------- scoring given token ids (vLLM's extensions)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per sequence, the log-prob of each token after the first given the ones before it (len - 1 values), at
        temperature 1: the served model's raw distribution, as vLLM computes prompt log-probs."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self._score, sequences))

    def _score(self, ids: list[int]) -> list[float]:
        import openai

        try:
            resp = self.client.completions.create(model=self.model, prompt=list(ids), max_tokens=1, temperature=0.0,
                                                  extra_body={"prompt_logprobs": 0})
        except openai.APIStatusError as err:
            cls = error_class(err)
            if cls in AUTH_CLASSES:
                raise self._auth_error(cls) from None
            if err.status_code == 400 and "context length" in str(err):  # vLLM: the row exceeds --max-model-len
                raise EndpointCapabilityError(
                    f"the endpoint {self.base_url} cannot score a row of {len(ids)} tokens: it is longer than the "
                    f"served model's context ({self._redact(str(err))[:200]}); serve the teacher with a "
                    "--max-model-len of at least the prompt + rollout.max_tokens") from None
            if 400 <= err.status_code < 500:  # the request itself is refused: token-id prompts or the field unknown
                raise EndpointCapabilityError(
                    f"the endpoint {self.base_url} refused a prompt log-prob request (HTTP {err.status_code}: "
                    f"{self._redact(str(err))[:200]}): {NEEDS_PROMPT_LOGPROBS}") from None
            raise
        except openai.APIConnectionError as err:  # after the client's retries; its message names no server
            raise RuntimeError(f"the endpoint {self.base_url} could not be reached: {type(err).__name__}: "
                               f"{self._redact(str(err))}") from err
        choice = resp.choices[0]
        entries = (choice.model_extra or {}).get("prompt_logprobs")
        return logprobs_of_tokens(entries, ids, self.base_url)

    def tokenize(self, text: str) -> list[int]:
        """The server's token ids of `text` (no special tokens added): vLLM's POST <server>/tokenize."""
        import httpx

        url = self.base_url.rstrip("/").removesuffix("/v1") + "/tokenize"
        try:
            r = httpx.post(url, json={"model": self.model, "prompt": text, "add_special_tokens": False},
                           headers={"Authorization": f"Bearer {self._key}"}, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise EndpointCapabilityError(f"POST {url}: {type(err).__name__}: {self._redact(str(err))}") from None
        if r.status_code in (401, 403):
            raise self._auth_error(f"http_{r.status_code}")
        tokens = r.json().get("tokens") if r.status_code == 200 and "json" in r.headers.get("content-type", "") \
            else None
        if not isinstance(tokens, list):
            raise EndpointCapabilityError(
                f"the endpoint {self.base_url} has no tokenizer route: POST {url} answered HTTP {r.status_code} "
                f"without token ids, so its tokenizer cannot be checked against the student's; {NEEDS_PROMPT_LOGPROBS}")
        return [int(t) for t in tokens]

    def close(self) -> None:
        self.client.close()


NEEDS_PROMPT_LOGPROBS = ("a teacher endpoint must score given token ids and return them per position "
                         "(`prompt_logprobs`) and serve POST /tokenize, as a vLLM server does "
                         "(`vllm serve <teacher>`); a hosted API or a server without these cannot be the teacher")


def logprobs_of_tokens(entries, ids: list[int], base_url: str) -> list[float]:
    """The log-prob of each token of `ids` after the first from vLLM's `prompt_logprobs` of that prompt (None for
    the first token, then {token_id: {"logprob": ...}}: the token actually there, and the top ones)."""
    if not isinstance(entries, list):
        raise EndpointCapabilityError(f"the endpoint {base_url} answered without prompt log-probs: "
                                      f"{NEEDS_PROMPT_LOGPROBS}")
    if len(entries) != len(ids):
        raise EndpointCapabilityError(f"the endpoint {base_url} returned {len(entries)} prompt log-probs for a "
                                      f"prompt of {len(ids)} tokens: it did not score the token ids it was given")
    out = []
    for pos, (entry, token) in enumerate(zip(entries[1:], ids[1:]), start=1):
        hit = (entry or {}).get(str(token))
        if hit is None:
            raise EndpointCapabilityError(f"the endpoint {base_url}: no log-prob for token {token} at position "
                                          f"{pos} of a {len(ids)}-token prompt")
        out.append(float(hit["logprob"]))
    return out
