"""A vLLM engine in this process: rollouts (weights replaced in memory by refit) and the evaluation worker.

Offers `VLLMEngine` (generate, with the sampled tokens' log-probs on request; prompt_logprobs; load_weights /
load_buckets / load_folder; sleep / wake for an engine that shares its GPU with the trainer) and `llm_kwargs`, the
pure mapping from our engine settings to vLLM's `LLM(...)` arguments (CPU and GPU differ; tests read it).

With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine core runs in this process, so a refit hands vLLM the
tensors by reference (`reload_weights(weights_iterator=...)` on HF-named tensors): no checkpoint is written.
Under torchrun (a trainer process group already exists) the engine core gets its own process
(in_process=False) so its distributed state cannot collide with the trainer's; a refit then sends the
tensors over vLLM's RPC channel, one bucket per call (as with tensor_parallel_size > 1, whose workers are
processes of their own). Create it under `if __name__ == "__main__"` (vLLM may spawn processes).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable

import torch

from recipes.generation.backend import Completion, Prompt, SamplingParams, on_cpu, stop_ids, to_completion
from recipes.generation.vllm_batching import generate, prompt_seed


def llm_kwargs(model_dir: str | Path, *, cpu: bool, dtype: str = "auto", max_model_len: int | None = None,
               seed: int = 0, enforce_eager: bool | None = None, kv_cache_mb: int | None = None,
               gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
               sleep_mode: bool = False, load_weights: bool = True) -> dict:
    """vLLM `LLM(...)` arguments for these settings on a CPU (`cpu=True`) or GPU machine.

    dtype "auto": bfloat16 on GPU, float32 on CPU. The KV cache: on CPU `kv_cache_mb` (vLLM's CPU default takes
    a quarter of the machine); on GPU `gpu_memory_utilization` (the share of the GPU vLLM may fill; a colocated
    trainer needs the rest), because vLLM lets an explicit KV size override it. sleep_mode: vLLM's sleep mode
    (GPU only: vLLM's CPU build raises "Sleep mode is not supported on current platform")."""
    if sleep_mode and cpu:
        raise ValueError("rollout.colocated_sleep=true needs a GPU: vLLM's CPU build has no sleep mode (it raises "
                         "'Sleep mode is not supported on current platform'); set rollout.colocated_sleep=false")
    if tensor_parallel_size < 1:
        raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    kwargs = dict(model=str(model_dir), dtype=("float32" if cpu else "bfloat16") if dtype == "auto" else dtype,
                  enforce_eager=cpu if enforce_eager is None else enforce_eager, seed=seed,
                  trust_remote_code=False, enable_prefix_caching=True,
                  load_format="auto" if load_weights else "dummy",
                  # log-probs of the distribution sampled from (after temperature / top-p), which the trainer
                  # compares with its own temperature-scaled log-probs; prompt_logprobs are the same either way
                  logprobs_mode="processed_logprobs")
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    if cpu:
        if kv_cache_mb:
            kwargs["kv_cache_memory_bytes"] = kv_cache_mb * 2**20
    elif gpu_memory_utilization:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    return kwargs


class VLLMEngine:
    def __init__(self, model_dir: str | Path, dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 enforce_eager: bool | None = None, kv_cache_mb: int | None = None,
                 gpu_memory_utilization: float | None = None, load_weights: bool = True,
                 in_process: bool | None = None, cpu_threads: int = 0, tensor_parallel_size: int = 1,
                 sleep_mode: bool = False):
        """kv_cache_mb: the KV cache's size on CPU (None: vLLM's rule); gpu_memory_utilization: vLLM's share of the
        GPU (None: vLLM's default); load_weights=False: placeholder weights, for a trainer that refits them;
        in_process: None keeps the environment's choice; cpu_threads: torch threads while this process decodes on
        CPU (0: the caller's); sleep_mode: `sleep()` frees the GPU between rollouts (GPU only)."""
        kwargs = llm_kwargs(model_dir, cpu=on_cpu(), dtype=dtype, max_model_len=max_model_len, seed=seed,
                            enforce_eager=enforce_eager, kv_cache_mb=kv_cache_mb,
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            sleep_mode=sleep_mode, load_weights=load_weights)
        if in_process is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        # tensors go by reference only to a worker in this very process (vLLM TP > 1 spawns worker processes)
        self.by_reference = self.in_process and tensor_parallel_size == 1
        if not self.by_reference:  # the refit function travels to the worker processes by pickle
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        self.llm = LLM(**kwargs)
        self.sleep_mode = sleep_mode
        self._asleep: set[str] = set()  # what sleep() released and no wake() restored yet
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
        # logprobs=0: the sampled token's log-prob alone (vLLM always adds the sampled token to the top-k)
        sampling = [VLLMParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                               max_tokens=params.max_tokens, seed=prompt_seed(params.seed, p, params.n),
                               stop_token_ids=sorted(self.stop_ids), detokenize=False,
                               logprobs=0 if params.logprobs else None) for p, _ in todo]
        self._wake()
        with self._decode_threads():
            outputs = iter(generate(self.llm, requests, sampling, [len(i) for _, i in todo], params.n))
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
        empty = [Completion([], "", "length", logprobs=[] if params.logprobs else None)] * params.n
        return [[to_completion(list(c.token_ids), self.stop_ids, params.max_tokens, decode,
                               sampled_logprobs(c) if params.logprobs else None)
                 for c in next(outputs).outputs] if ok else list(empty) for ok in fits]

    def sleep(self) -> None:
        """Free the GPU for the trainer (vLLM sleep level 1: weights to host memory, KV cache dropped). Any later
        call wakes the engine; a refit wakes only the weights first, so the KV cache is not allocated while the
        new weights stream in. A no-op for an engine started without sleep mode."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

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
        """Replace the weights with HF-named tensors (the whole model, or complete layers of it)."""
        self._wake(("weights",))
        if self.by_reference:  # consumed lazily inside vLLM: a generator is streamed, never materialised here
            payload = iter(weights)
        else:  # one bytes blob: vLLM's RPC encoder does not carry (name, tensor) lists intact
            payload = _serialize(weights)
        self.llm.collective_rpc(reload_in_worker, args=(payload,))
        del payload
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def load_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Replace the weights bucket by bucket (`recipes.rl.refit`). A bucket holds whole layers (vLLM processes a
        fused layer, q/k/v or gate/up, once all of it arrived), so each may be loaded on its own.

        One reload call per bucket (by reference in this process, serialized across processes), and the bucket is
        dropped before the next one is asked for. One call per bucket rather than one reload pulling every bucket:
        vLLM's loader keeps the last tensors it saw referenced until its reload returns."""
        self._wake(("weights",))
        for bucket in buckets:
            payload = bucket if self.by_reference else _serialize(bucket)
            if not self.by_reference:
                bucket.clear()
            self.llm.collective_rpc(reload_in_worker, args=(payload, True))
            bucket.clear()
            del payload
        self.llm.reset_prefix_cache()

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
        self._wake()
        with self._decode_threads():
            outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[entry[t].logprob for entry, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, sequences)]

    def close(self) -> None:
        del self.llm


def sampled_logprobs(output) -> list[float]:
    """The log-prob of each sampled token of a vLLM CompletionOutput (requested with logprobs=0)."""
    return [step[t].logprob for step, t in zip(output.logprobs, output.token_ids)]


def _serialize(weights: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    buf = io.BytesIO()
    torch.save([(n, t.detach().cpu()) for n, t in weights], buf)
    return buf.getvalue()


def reload_in_worker(worker, weights, partial: bool = False) -> None:
    """Runs inside vLLM's worker: in-place reload, then re-tie the output layer to the embedding.

    vLLM's layer-wise reload restores the old tensor of a layer that received no weights; with tied
    embeddings that is the LM head (HF checkpoints carry no lm_head.weight), and on CPU its GEMM kernel
    was built from the old tensor. Re-tie it and rebuild its kernel, or sampling uses stale weights.
    `partial`: a bucket of a refit; the layers it does not carry keep their weights, which vLLM would report
    as a failed load for every one of them.
    """
    import logging

    if isinstance(weights, bytes):
        weights = torch.load(io.BytesIO(weights), weights_only=True)
    quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    levels = [log.level for log in quiet]
    if partial:
        for log in quiet:
            log.setLevel(logging.ERROR)
    try:
        worker.reload_weights(weights_iterator=iter(weights))
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    model = worker.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
