"""A vLLM engine in this process: rollouts (weights replaced in memory by refit) and the evaluation worker.

With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine core runs in this process, so a refit hands vLLM the
tensors by reference (`reload_weights(weights_iterator=...)` on HF-named tensors): no checkpoint is written.
Under torchrun (a trainer process group already exists) the engine core gets its own process
(in_process=False) so its distributed state cannot collide with the trainer's; a refit then sends the
tensors over vLLM's RPC channel. Create it under `if __name__ == "__main__"` (vLLM may spawn processes).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable

import torch

from recipes.generation.backend import (Completion, Prompt, SamplingParams, on_cpu, resolve_dtype, stop_ids,
                                        to_completion)
from recipes.generation.vllm_batching import generate, prompt_seed


class VLLMEngine:
    def __init__(self, model_dir: str | Path, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 enforce_eager: bool | None = None, kv_cache_mb: int | None = None,
                 gpu_memory_utilization: float | None = None, load_weights: bool = True,
                 in_process: bool | None = None, cpu_threads: int = 0):
        """kv_cache_mb: the KV cache's size (None: vLLM's rule); load_weights=False: placeholder weights, for a
        trainer that refits them; in_process: None keeps the environment's choice; cpu_threads: torch threads
        while this process decodes on CPU (0: the caller's)."""
        if in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        if not self.in_process:  # the refit function travels to the engine process by pickle
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        eager = on_cpu() if enforce_eager is None else enforce_eager
        kwargs = dict(model=str(model_dir), dtype=resolve_dtype(dtype), enforce_eager=eager, seed=seed,
                      trust_remote_code=False, enable_prefix_caching=True,
                      load_format="auto" if load_weights else "dummy")
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_mb:
            kwargs["kv_cache_memory_bytes"] = kv_cache_mb * 2**20
        if gpu_memory_utilization and not eager:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.cpu_threads = cpu_threads
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_ids(model_dir, self.tokenizer)
        self.context = self.llm.llm_engine.model_config.max_model_len

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """A prompt that fills the context cannot be answered: it gets n empty, truncated completions (vLLM
        would reject the whole batch)."""
        from vllm import SamplingParams as VLLMParams

        # rendered text is tokenized here without special tokens: the template wrote them (vLLM's own tokenization
        # would add a second <|begin_of_text|> to a Llama 3 prompt)
        ids = [self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
        fits = [len(i) < self.context for i in ids]
        todo = [(p, i) for p, i, ok in zip(prompts, ids, fits) if ok]
        requests = [{"prompt_token_ids": i} for _, i in todo]
        sampling = [VLLMParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                               max_tokens=params.max_tokens, seed=prompt_seed(params.seed, p, params.n),
                               stop_token_ids=sorted(self.stop_ids), detokenize=False) for p, _ in todo]
        with self._decode_threads():
            outputs = iter(generate(self.llm, requests, sampling, [len(i) for _, i in todo], params.n))
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
        empty = [Completion([], "", "length")] * params.n
        return [[to_completion(list(c.token_ids), self.stop_ids, params.max_tokens, decode)
                 for c in next(outputs).outputs] if ok else list(empty) for ok in fits]

    @contextlib.contextmanager
    def _decode_threads(self):
        """While this process's engine decodes on CPU: `cpu_threads` torch threads, and no CPU device layer
        (the trainer's CUDA-to-CPU hook on every torch op made decoding 2.5x slower); the caller's afterwards."""
        from recipes.megatron.runtime import cpu_layer_suspended

        caller = torch.get_num_threads()
        switch = self.in_process and self.cpu_threads > 0 and not torch.cuda.is_available()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads; the
        # C function underneath still sets this process's thread count
        set_threads = torch._C.set_num_threads
        if switch:
            set_threads(self.cpu_threads)
        try:
            with cpu_layer_suspended():
                yield
        finally:
            if switch:
                set_threads(caller)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.in_process:
            payload = iter(weights)
        else:  # one bytes blob: vLLM's RPC encoder does not carry (name, tensor) lists intact
            buf = io.BytesIO()
            torch.save([(n, t.detach().cpu()) for n, t in weights], buf)
            payload = buf.getvalue()
        self.llm.collective_rpc(reload_in_worker, args=(payload,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def load_folder(self, model_dir: str | Path) -> None:
        """Replace the weights with an HF folder's safetensors (same architecture)."""
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors")
        self.load_weights([item for f in files for item in load_file(str(f)).items()])

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams as VLLMParams

        params = VLLMParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with self._decode_threads():
            outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]

    def close(self) -> None:
        del self.llm


def reload_in_worker(worker, weights) -> None:
    """Runs inside vLLM's worker: in-place reload, then re-tie the output layer to the embedding.

    vLLM's layer-wise reload restores the old tensor of a layer that received no weights; with tied
    embeddings that is the LM head (HF checkpoints carry no lm_head.weight), and on CPU its GEMM kernel
    was built from the old tensor. Re-tie it and rebuild its kernel, or sampling uses stale weights.
    """
    if isinstance(weights, bytes):
        weights = torch.load(io.BytesIO(weights), weights_only=True)
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
