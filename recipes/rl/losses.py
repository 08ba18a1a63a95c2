"""Clipped policy-gradient losses: GRPO, Dr.GRPO and DAPO differ only in how token losses are averaged.

Every variant computes the same per-token term

    l_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A) + kl_coef * k3_t,
    r_t = exp(logp_t - old_logp_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

and returns `(loss_sum, denominator)` so the trainer can add micro-batches (and data-parallel
ranks) before dividing once:

- grpo:    sum over sequences of the per-sequence token mean      / number of sequences
- dr_grpo: sum over tokens divided by a constant max length        / number of sequences
- dapo:    sum over tokens                                         / number of tokens (token-level mean)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

Variant = Literal["grpo", "dr_grpo", "dapo"]


@dataclasses.dataclass
class LossConfig:
    variant: Variant = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO "clip-higher" raises this (0.28) to keep exploration alive
    kl_coef: float = 0.0  # 0 skips the reference model entirely
    max_response_tokens: int | None = None  # Dr.GRPO's constant normaliser (None: GRPO's rollout.max_tokens)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): unbiased, always >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, T] and a bool [B, T] of tokens where the clip was active.

    `advantages` is [B] (one per sequence) or [B, T].
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    clip_active = ((ratio < 1.0 - cfg.eps_low) & (adv < 0)) | ((ratio > 1.0 + cfg.eps_high) & (adv > 0))
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs (ref_logp)")
        loss = loss + cfg.kl_coef * k3_kl(logp, ref_logp)
    return loss, clip_active


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, denominator) for one micro-batch; the final loss is sum(loss_sum) / sum(denominator)."""
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    n_tokens = mask.sum(-1)
    has_tokens = n_tokens > 0
    if cfg.variant == "grpo":
        per_seq = masked.sum(-1) / n_tokens.clamp(min=1)
        return per_seq.sum(), has_tokens.sum().to(per_token.dtype)
    if cfg.variant == "dr_grpo":
        return masked.sum() / cfg.max_response_tokens, has_tokens.sum().to(per_token.dtype)
    if cfg.variant == "dapo":
        return masked.sum(), mask.sum()
    raise ValueError(f"unknown loss variant {cfg.variant!r} (grpo, dr_grpo, dapo)")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss_sum, denominator, stats) with stats summed over tokens: clipped, kl, ratio (for logging)."""
    per_token, clip_active = token_losses(logp, old_logp, advantages, cfg, ref_logp)
    loss_sum, denom = reduce_loss(per_token, mask, cfg)
    m = mask.to(logp.dtype)
    with torch.no_grad():
        stats = {
            "tokens": float(m.sum()),
            "clipped_tokens": float((clip_active.to(m.dtype) * m).sum()),
            "kl_sum": float((k3_kl(logp, ref_logp) * m).sum()) if ref_logp is not None else 0.0,
        }
    return loss_sum, denom, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at every position, [.., V] -> [..]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
