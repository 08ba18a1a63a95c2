"""Clipped policy-gradient losses: GRPO, Dr.GRPO and DAPO differ only in how token losses are averaged.

Every variant computes the same per-token term

    l_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A) + kl_coef * k3_t,
    r_t = exp(logp_t - old_logp_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

and returns `(loss_sum, denominator)` so the trainer can add micro-batches (and data-parallel
ranks) before dividing once:

- grpo:    sum over sequences of the per-sequence token mean      / number of sequences
- dr_grpo: sum over tokens divided by a constant max length        / number of sequences
- dapo:    sum over tokens                                         / number of tokens (token-level mean)

Truncated importance sampling (`tis_cap`): the rollouts come from the inference engine's distribution, not the
trainer's, so the policy-gradient term of each token is weighted by w_t = min(exp(old_logp_t - engine_logp_t),
tis_cap), detached (the KL term is not). `mismatch_stats` measures that train/inference gap per step.
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
    # truncated importance sampling: weight each token's PG term by min(pi_train_old / pi_engine, tis_cap); None: off
    tis_cap: float | None = None


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
    engine_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, T] and a bool [B, T] of tokens where the clip was active.

    `advantages` is [B] (one per sequence) or [B, T]; `engine_logp` (the rollout engine's log-probs of the sampled
    tokens) is read only with `cfg.tis_cap`.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    clip_active = ((ratio < 1.0 - cfg.eps_low) & (adv < 0)) | ((ratio > 1.0 + cfg.eps_high) & (adv > 0))
    if cfg.tis_cap is not None:
        loss = tis_weights(old_logp, engine_logp, cfg.tis_cap) * loss
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs (ref_logp)")
        loss = loss + cfg.kl_coef * k3_kl(logp, ref_logp)
    return loss, clip_active


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor | None, cap: float) -> torch.Tensor:
    """min(exp(old_logp - engine_logp), cap), detached: the importance weight of a token the engine sampled,
    truncated so a token the engine under-rated cannot dominate the update (NeMo-RL's "tis" type of
    truncated_importance_sampling_ratio, nemo_rl/algorithms/loss_functions.py ClippedPGLossFn)."""
    if engine_logp is None:
        raise ValueError("loss.tis_cap needs the rollout engine's log-probs of the sampled tokens; "
                         "rollout.backend=vllm returns them (hf does not): use vllm or set loss.tis_cap=null")
    if cap <= 0:
        raise ValueError(f"loss.tis_cap must be > 0 (or null), got {cap}")
    return torch.clamp(torch.exp(old_logp - engine_logp), max=cap).detach()


@torch.no_grad()
def mismatch_stats(train_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over the masked tokens of the train/inference mismatch, for the trainer's and the engine's log-probs
    of the same sampled tokens (divide by "mismatch_tokens"; the max is a max):

    - mult_prob_error: exp(|engine - train|), NeMo-RL's token_mult_prob_error (nemo_rl/algorithms/loss_functions.py,
      ClippedPGLossFn: masked mean of exp(|generation_logprobs - prev_logprobs|); docs/guides/grpo.md#metrics):
      1.0 when the two agree, 1.01 is a ~1 % probability gap per token.
    - kl: engine - train, the k1 estimator of KL(engine || trainer) (tokens are sampled from the engine); unbiased,
      can be negative on a batch.
    - kl_k3: r - 1 - log r with r = exp(train - engine), Schulman's k3 for the same KL: >= 0, lower variance.
    - max_abs_diff: the largest |engine - train| of a token.
    """
    m = mask > 0
    diff = (engine_logp - train_logp)[m].double()
    if diff.numel() == 0:
        return {"mismatch_tokens": 0.0, "mismatch_mult_prob_error_sum": 0.0, "mismatch_kl_sum": 0.0,
                "mismatch_kl_k3_sum": 0.0, "mismatch_max_abs_diff": 0.0}
    return {"mismatch_tokens": float(diff.numel()),
            "mismatch_mult_prob_error_sum": float(torch.exp(diff.abs()).sum()),
            "mismatch_kl_sum": float(diff.sum()),
            "mismatch_kl_k3_sum": float((torch.exp(-diff) - 1 + diff).sum()),
            "mismatch_max_abs_diff": float(diff.abs().max())}


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
    engine_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss_sum, denominator, stats) with stats summed over tokens: clipped, kl, ratio (for logging); with
    `engine_logp` also the train/inference mismatch of `old_logp` (`mismatch_stats`) and, with tis_cap, the sum
    of the TIS weights."""
    per_token, clip_active = token_losses(logp, old_logp, advantages, cfg, ref_logp, engine_logp)
    loss_sum, denom = reduce_loss(per_token, mask, cfg)
    m = mask.to(logp.dtype)
    with torch.no_grad():
        stats = {
            "tokens": float(m.sum()),
            "clipped_tokens": float((clip_active.to(m.dtype) * m).sum()),
            "kl_sum": float((k3_kl(logp, ref_logp) * m).sum()) if ref_logp is not None else 0.0,
        }
        if engine_logp is not None:
            stats.update(mismatch_stats(old_logp, engine_logp, mask))
            if cfg.tis_cap is not None:
                stats["tis_weight_sum"] = float((tis_weights(old_logp, engine_logp, cfg.tis_cap) * m).sum())
    return loss_sum, denom, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at every position, [.., V] -> [..]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
