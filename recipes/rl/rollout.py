"""Rollout backends: sample G responses per prompt, take new weights in memory, score fixed completions.

Both backends share one interface (`generate`, `load_weights`, `prompt_logprobs`):
- `VLLMGenerator`: a vLLM engine kept resident across steps. The engine core runs in this process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a refit is a worker `reload_weights(weights_iterator=...)`
  call on HF-named tensors: no checkpoint is written. Create it under `if __name__ == "__main__"`.
- `HFGenerator`: transformers' `generate`, the fallback where vLLM is not available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path
from typing import Iterable, Literal, Protocol

import torch

from recipes import chat_template as ct
from recipes import tokenizer as tok


def prompt_ids(problem) -> list[int]:
    """The token ids of a task problem's prompt (`recipes.task.Problem`), rendered with the chat template."""
    return tok.encode(ct.render_prompt(problem.question))


@dataclasses.dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128  # response budget (the overlong penalty and Dr.GRPO use the same number)
    kv_cache_mb: int = 256  # vLLM on CPU reserves this much for the KV cache
    enforce_eager: bool = True  # skip torch.compile: a minutes-long run does not earn back the compile time
    # torch threads while the in-process engine decodes on CPU (training keeps its own); 0 keeps the trainer's
    cpu_threads: int = 0


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # response tokens, EOS included when the model stopped by itself
    text: str
    finish_reason: str  # "stop" or "length"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seed: int, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[list[Completion]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]: ...

    def close(self) -> None: ...


def _completion(ids: list[int], max_tokens: int) -> Completion:
    eos = tok.eos_id()
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
        reason = "stop"
    else:
        ids = ids[:max_tokens]
        reason = "length"
    # keep <think>/</think> in the text (rewards and rejection sampling read them); drop only the EOS
    return Completion(ids, tok.decode([t for t in ids if t != eos]), reason)


class HFGenerator:
    """transformers generation on one process; weights replaced with `load_state_dict`."""

    def __init__(self, hf_dir: str | Path, cfg: RolloutConfig, load_weights: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.cfg = cfg
        if load_weights:
            self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        else:  # weights arrive by refit
            config = AutoConfig.from_pretrained(str(hf_dir))
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = {name: t for name, t in weights}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"HF refit: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def generate(self, prompts, n, seed, max_tokens=None, temperature=None):
        max_tokens = max_tokens or self.cfg.max_tokens
        temperature = self.cfg.temperature if temperature is None else temperature
        torch.manual_seed(seed)
        width = max(len(p) for p in prompts)
        pad = tok.pad_id()
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(n)])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(n)])
        sampling = dict(do_sample=True, temperature=temperature, top_p=self.cfg.top_p, top_k=0) if temperature > 0 \
            else dict(do_sample=False)
        out = self.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_tokens,
                                  eos_token_id=tok.eos_id(), pad_token_id=pad, **sampling)
        rows = [_completion(row[width:].tolist(), max_tokens) for row in out]
        return [rows[i * n:(i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def prompt_logprobs(self, sequences):
        out = []
        for seq in sequences:
            logits = self.model(torch.tensor([seq])).logits[0].float().log_softmax(-1)
            out.append([logits[t - 1, seq[t]].item() for t in range(1, len(seq))])
        return out

    def close(self) -> None:
        pass


class VLLMGenerator:
    """A resident vLLM engine whose weights are replaced in memory.

    in_process=True runs the engine core in this process, so a refit hands vLLM the tensors by reference.
    Under torchrun (a trainer process group already exists) the engine core gets its own process
    (in_process=False) so its distributed state cannot collide with the trainer's; a refit then
    sends the tensors over vLLM's RPC channel.
    """

    def __init__(self, hf_dir: str | Path, cfg: RolloutConfig, max_model_len: int = 512, seed: int = 0,
                 in_process: bool = True, load_weights: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if not in_process:  # the refit function travels to our own engine process by pickle
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM

        self.cfg = cfg
        self.in_process = in_process
        self.llm = LLM(model=str(hf_dir), dtype="float32", enforce_eager=cfg.enforce_eager, seed=seed,
                       max_model_len=max_model_len, kv_cache_memory_bytes=cfg.kv_cache_mb * 2**20,
                       enable_prefix_caching=True, load_format="auto" if load_weights else "dummy")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.in_process:
            payload = iter(weights)
        else:  # one bytes blob: vLLM's RPC encoder does not carry (name, tensor) lists intact
            buf = io.BytesIO()
            torch.save([(n, t.detach().cpu()) for n, t in weights], buf)
            payload = buf.getvalue()
        self.llm.collective_rpc(reload_in_worker, args=(payload,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def generate(self, prompts, n, seed, max_tokens=None, temperature=None):
        from vllm import SamplingParams

        max_tokens = max_tokens or self.cfg.max_tokens
        temperature = self.cfg.temperature if temperature is None else temperature
        from recipes.vllm_batching import generate, prompt_seed

        params = [SamplingParams(n=n, temperature=temperature, top_p=self.cfg.top_p, max_tokens=max_tokens,
                                 seed=prompt_seed(seed, p, n), stop_token_ids=[tok.eos_id()], skip_special_tokens=True)
                  for p in prompts]
        with self._decode_threads():
            outs = generate(self.llm, [{"prompt_token_ids": p} for p in prompts], params, [len(p) for p in prompts], n)
        return [[_completion(list(c.token_ids), max_tokens) for c in o.outputs] for o in outs]

    @contextlib.contextmanager
    def _decode_threads(self):
        """While this process's engine decodes on CPU: `cfg.cpu_threads` torch threads, and no CPU device layer
        (the trainer's CUDA-to-CPU hook on every torch op made decoding 2.5x slower); the trainer's afterwards."""
        from recipes.megatron.runtime import cpu_layer_suspended

        trainer = torch.get_num_threads()
        switch = self.in_process and self.cfg.cpu_threads > 0 and not torch.cuda.is_available()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads; the
        # C function underneath still sets this process's thread count
        set_threads = torch._C.set_num_threads
        if switch:
            set_threads(self.cfg.cpu_threads)
        try:
            with cpu_layer_suspended():
                yield
        finally:
            if switch:
                set_threads(trainer)

    def prompt_logprobs(self, sequences):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
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


def make_backend(cfg: RolloutConfig, hf_dir: str | Path, max_model_len: int = 512, seed: int = 0,
                 in_process: bool = True) -> RolloutBackend:
    """An engine with the architecture of `hf_dir` and placeholder weights: refit before generating."""
    if cfg.backend == "vllm":
        return VLLMGenerator(hf_dir, cfg, max_model_len=max_model_len, seed=seed, in_process=in_process)
    if cfg.backend == "hf":
        return HFGenerator(hf_dir, cfg)
    raise ValueError(f"rollout.backend must be 'vllm' or 'hf', got {cfg.backend!r}")
