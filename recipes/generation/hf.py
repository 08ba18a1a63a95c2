"""transformers generation in this process: the fallback where vLLM is missing, and the reference in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from recipes.generation.backend import (Completion, Prompt, SamplingParams, on_cpu, resolve_dtype, stop_ids,
                                        to_completion)


class HFBackend:
    """`AutoModelForCausalLM.generate` on left-padded batches; weights replaced with `load_state_dict`.

    load_weights=False builds the architecture with random weights, for a trainer that refits them.
    """

    def __init__(self, model_dir: str | Path, dtype: str = "auto", batch_size: int | None = None,
                 load_weights: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        torch_dtype = getattr(torch, resolve_dtype(dtype))
        if load_weights:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        else:
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch_dtype)
        self.device = "cpu" if on_cpu() else "cuda"
        self.model.eval().to(self.device)
        self.batch_size = batch_size  # sequences per generate call (None: all at once)
        self.stop_ids = stop_ids(model_dir, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        ids = [self.encode(p) for p in prompts]
        per_call = max(1, (self.batch_size or len(ids) * params.n) // params.n)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
            if params.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
        out: list[list[Completion]] = []
        for start in range(0, len(ids), per_call):
            batch = ids[start : start + per_call]
            width = max(len(p) for p in batch)
            inputs = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch for _ in range(params.n)])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch for _ in range(params.n)])
            if params.temperature > 0:
                torch.manual_seed(params.seed + start)
            seqs = self.model.generate(input_ids=inputs.to(self.device), attention_mask=mask.to(self.device),
                                       max_new_tokens=params.max_tokens, eos_token_id=sorted(self.stop_ids),
                                       pad_token_id=self.pad_id, **sampling)
            rows = [to_completion(row[width:].tolist(), self.stop_ids, params.max_tokens, decode) for row in seqs]
            out += [rows[i * params.n : (i + 1) * params.n] for i in range(len(batch))]
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = {name: t for name, t in weights}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"HF refit: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for seq in sequences:
            logits = self.model(torch.tensor([seq], device=self.device)).logits[0].float().log_softmax(-1)
            out.append([logits[t - 1, seq[t]].item() for t in range(1, len(seq))])
        return out

    def close(self) -> None:
        self.model = None
