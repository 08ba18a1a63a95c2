"""Generation backends behind one small interface.

    backend.generate(prompts, params) -> for each prompt, params.n Completions
    backend.count_tokens(text) -> int | None
    backend.close()

- `hf`: transformers `AutoModelForCausalLM`, batched greedy or sampled `generate` (CPU tests, fallback).
- `vllm`: `vllm.LLM` in a worker process (vLLM spawns processes of its own, so it never runs inside
  the caller); float32 and eager mode on CPU.
- `openai`: any OpenAI-compatible endpoint (a vLLM or NIM server); the key comes from an env var.

Prompts are rendered text (the chat template already applied), so every backend sees the same input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0


@dataclasses.dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_tokens)


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def _resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if _on_cpu() else "bfloat16"


# ------------------------------------------------------------------------------ transformers


class HFBackend:
    def __init__(self, model_dir: str, dtype: str = "auto", batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, _resolve_dtype(dtype)))
        self.model.eval()
        self.device = "cpu" if _on_cpu() else "cuda"
        self.model.to(self.device)
        self.batch_size = batch_size
        self.eos_id = self.tokenizer.eos_token_id

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        torch = self.torch
        out: list[list[Completion]] = []
        per_batch = max(1, self.batch_size // params.n)
        for start in range(0, len(prompts), per_batch):
            batch = prompts[start : start + per_batch]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            kwargs = dict(max_new_tokens=params.max_tokens, num_return_sequences=params.n,
                          eos_token_id=self.eos_id, pad_token_id=self.tokenizer.pad_token_id)
            if params.temperature > 0:
                torch.manual_seed(params.seed + start)
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                seqs = self.model.generate(**enc, **kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(batch)):
                comps = []
                for ids in new[i * params.n : (i + 1) * params.n]:
                    stop = self.eos_id in ids
                    ids = ids[: ids.index(self.eos_id)] if stop else ids
                    text = self.tokenizer.decode(ids, skip_special_tokens=False)
                    comps.append(Completion(text, len(ids) + int(stop), "stop" if stop else "length"))
                out.append(comps)
        return out

    def close(self) -> None:
        self.model = None


# ------------------------------------------------------------------------------ vLLM (worker process)


class VLLMBackend:
    """Talks to `recipes.evaluation.vllm_worker` over pipes: one JSON request/reply per line."""

    def __init__(self, model_dir: str, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 enforce_eager: bool | None = None, gpu_memory_utilization: float = 0.85):
        on_cpu = _on_cpu()
        spec = {
            "model": str(model_dir),
            "dtype": _resolve_dtype(dtype),
            "enforce_eager": on_cpu if enforce_eager is None else enforce_eager,
            "seed": seed,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a quarter of the machine
            # the engine core in the worker process itself: two fewer process start-ups (each imports vLLM, ~20 s
            # on 2 cores), and generation on every core instead of one core bound to a spawned worker
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.in_process = env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"  # vLLM's default: its own process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipes.evaluation.vllm_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        try:  # the tokenizer loads while the worker imports vLLM (~20 s on 2 cores), not before it starts
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            reply = self._read()
            if reply.get("status") != "ready":
                raise RuntimeError(f"vLLM worker failed to start: {reply}")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def swaps_weights(self, model_dir: str, new_dir: str) -> bool:
        """Whether `load_weights(new_dir)` can replace `model_dir` in the running engine: the engine runs in the
        worker process itself (CPU), and both folders hold the same architecture and tokenizer."""
        if not self.in_process:
            return False
        files = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        try:
            return all(_read_bytes(Path(model_dir, f)) == _read_bytes(Path(new_dir, f)) for f in files)
        except OSError:
            return False

    def load_weights(self, model_dir: str) -> None:
        """Replace the engine's weights with `model_dir`'s safetensors (prefix cache dropped)."""
        self.proc.stdin.write(json.dumps({"load": str(model_dir)}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if reply.get("status") != "loaded":
            raise RuntimeError(f"vLLM worker could not load {model_dir}: {reply.get('error', reply)}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"vLLM worker exited with code {code} (its log is on stderr above)")
        return json.loads(line)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "params": dataclasses.asdict(params)}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"vLLM worker: {reply['error']}")
        return [[Completion(**c) for c in comps] for comps in reply["outputs"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------ OpenAI-compatible endpoint


class OpenAIBackend:
    """Completions API on pre-rendered prompts (the server must not apply a chat template again)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 600.0, tokenizer_dir: str | None = None):
        import openai

        # the key is read here and handed to the client only: it is never logged or written
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

    def _one(self, prompt: str, params: SamplingParams) -> list[Completion]:
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
            comps.append(Completion(choice.text, n_tok, "length" if choice.finish_reason == "length" else "stop"))
        return comps

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, params), prompts))

    def close(self) -> None:
        self.client.close()
