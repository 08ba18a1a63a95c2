"""Any OpenAI-compatible endpoint (a vLLM or NIM server, a hosted API) through the Completions API."""

from __future__ import annotations

import os
from pathlib import Path

from recipes.generation.backend import Completion, Prompt, SamplingParams


class OpenAIBackend:
    """Completions on pre-rendered prompts (the server must not apply a chat template again); the key comes
    from the variable `api_key_env` names and is handed to the client only, never logged or written."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 timeout: float = 600.0, tokenizer_dir: str | None = None):
        import openai

        if not base_url:
            raise ValueError("generation.base_url is required for the openai backend")
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    timeout=timeout, max_retries=2)
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
        resp = self.client.completions.create(
            model=self.model, prompt=prompt, n=params.n, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_tokens, seed=params.seed, extra_body={"skip_special_tokens": False},
        )
        total = resp.usage.completion_tokens if resp.usage else None
        comps = []
        for choice in sorted(resp.choices, key=lambda c: c.index):
            n_tok = self.count_tokens(choice.text)
            if n_tok is None:
                n_tok = (total or 0) // max(1, len(resp.choices))
            finish = "length" if choice.finish_reason == "length" else "stop"
            comps.append(Completion([], choice.text, finish, num_tokens=n_tok))
        return comps

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, params), prompts))

    def close(self) -> None:
        self.client.close()
