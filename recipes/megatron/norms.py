"""Norm layers for megatron-core's local layer spec that also work with sequence parallelism.

Offers:
- `RMSNorm(config, hidden_size, eps=1e-5, ...)`: a `torch.nn.RMSNorm` (the same parameter name `weight` as
  megatron's `WrappedTorchNorm`, so checkpoints and the HF mapping are unchanged) built from megatron's norm
  arguments, without `WrappedTorchNorm`'s refusal of `config.sequence_parallel`, that keeps for backward only
  what a fused norm keeps (see `rms_norm`).
- `rms_norm(x, weight, eps)`: torch's `rms_norm` (the same fused forward kernel, bit for bit) keeping for backward
  only the input and the fp32 inverse RMS per row, as Transformer Engine's and Apex's norms and torch's CUDA
  kernel do. On CPU torch runs `rms_norm` as a composite that keeps fp32 copies of the input and of the
  normalised input besides: three times the norm input's bytes in bf16, twice per layer. `RMSNorm` uses it on
  CPU and torch's own kernel on CUDA.

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


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        normed = xf * rstd
        dy_f = dy.float()
        dweight = (dy_f * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dn = dy_f * weight.float()
        dx = rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))
        return dx.to(x.dtype), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # torch's CUDA kernel already keeps only the input and the inverse RMS
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)
