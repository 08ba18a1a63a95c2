"""Core attention for megatron-core's local layer spec through `torch.nn.functional.scaled_dot_product_attention`.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores and runs mask, softmax and
their backward as separate passes over them; on CPU that was ~40% of a tiny model's training step. SDPA computes
the same softmax(QK^T * scale + mask) V with a fused kernel (flash attention on CPU). Configurations it does not
cover (attention dropout while training, sliding windows, softmax offsets, query-key layer scaling, a query
shorter than the keys) run megatron's own forward. With Transformer Engine (GPU) its attention is used instead.

Offers `SDPADotProductAttention` (the local spec's `core_attention`) and `sdpa(q, k, v, ...)`. Under selective
recompute megatron checkpoints this module: its forward runs once without autograd and again in backward (the same
arithmetic, so the gradients equal those of no recompute). With sequence parallelism it still sees the whole
sequence (megatron gathers it before `linear_qkv`), so masks of packed sequences apply unchanged.

Float32 matmul precision: `torch.set_float32_matmul_precision("medium")` makes CPUs with AMX run float32 matmuls in
bf16 with float32 accumulation (what TF32 is on a GPU): the linear layers get ~2x faster. The CPU flash-attention
kernel under that setting runs its small block products through the same path and gets ~3x slower, so on CPU
attention always runs (forward and backward) at full float32 precision.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


@contextlib.contextmanager
def full_fp32_matmuls():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class _FullPrecisionSDPA(torch.autograd.Function):
    """SDPA whose forward and backward both run at "highest" float32 matmul precision: the backward runs when
    autograd reaches it, outside any context the forward could set, so it differentiates its own inner graph."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale):
        with full_fp32_matmuls(), torch.enable_grad():
            inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        ctx.inner = (inputs, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        inputs, out = ctx.inner
        del ctx.inner
        wanted = [t for t in inputs if t.requires_grad]
        with full_fp32_matmuls():
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention`, kept at full float32 precision on CPU when matmuls run below it."""
    if enable_gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    if q.device.type != "cpu" or q.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _FullPrecisionSDPA.apply(q, k, v, attn_mask, is_causal, scale)
    with full_fp32_matmuls():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Megatron's boolean mask (True = masked out) as the float bias SDPA turns a boolean mask into (0 where allowed,
    -inf elsewhere: the same values, so the same attention), built once per mask rather than once per layer. It is
    kept on the mask tensor, which every layer of a forward receives, and rebuilt if the mask is changed in place."""
    key = (dtype, attention_mask._version)
    cached = getattr(attention_mask, "_sdpa_additive", None)
    if cached is None or cached[0] != key:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        cached = (key, bias.masked_fill_(attention_mask, float("-inf")))
        attention_mask._sdpa_additive = cached
    return cached[1]


class SDPADotProductAttention(DotProductAttention):
    def _sdpa_applies(self, query, key, attention_bias, packed_seq_params) -> bool:
        cfg = self.config
        dropout = self.attention_dropout.p if self.training else 0.0
        return (attention_bias is None and packed_seq_params is None and dropout == 0.0
                and self.scale_mask_softmax.window_size is None and cfg.softmax_type == "vanilla"
                and not cfg.apply_query_key_layer_scaling and query.size(0) == key.size(0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._sdpa_applies(query, key, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b = query.size(0), query.size(1)
        group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # on a GPU without a mask, the flash kernel reads the shared K/V heads itself (enable_gqa); elsewhere the
        # K/V heads are repeated, which keeps (heads - groups) more K and V heads for backward
        gqa = group > 1 and q.device.type == "cuda" and attention_mask is None
        if group > 1 and not gqa:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if attention_mask is not None:  # megatron's mask is True where attention is NOT allowed; SDPA's the opposite
            out = sdpa(q, k, v, attn_mask=additive_mask(attention_mask, q.dtype), scale=self.softmax_scale)
        else:
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1
            out = sdpa(q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
