"""Norm layers for megatron-core's local layer spec that also work with sequence parallelism.

Offers:
- `RMSNorm(config, hidden_size, eps=1e-5, ...)`: `torch.nn.RMSNorm` (the same kernel and parameter name `weight` as
  megatron's `WrappedTorchNorm`, so checkpoints and the HF mapping are unchanged) built from megatron's norm
  arguments, without `WrappedTorchNorm`'s refusal of `config.sequence_parallel`.

Why the refusal exists and how it is lifted: with sequence parallelism each TP rank normalises only its S/TP slice
of the tokens, so each rank's weight gradient is a partial sum over the sequence. Megatron's `finalize_model_grads`
all-reduces (sums) across TP the gradients of parameters carrying `sequence_parallel = True`, the attribute
Transformer Engine's and Apex's norms set; this module sets it too. The qk-norm of Qwen3 runs after the attention
input is gathered back to the full sequence, on this rank's heads only; megatron sums its gradient across TP
through the `q_layernorm`/`k_layernorm` names whether or not sequence parallelism is on (a parameter is summed
once either way).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm with megatron's norm constructor; its weight is marked for megatron's TP gradient sum under
    sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm":
            raise ValueError(f"recipes.megatron.norms.RMSNorm built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("RMSNorm: zero-centred gamma, persist_layer_norm and memory_efficient_layer_norm need "
                             "Transformer Engine or Apex norms")
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
