"""Group-relative advantages: each response is scored against the other responses to the same prompt."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [n_groups, G] -> advantages [n_groups, G].

    A = r - mean(group); GRPO and DAPO also divide by the group's std (unbiased, as in GRPO);
    Dr.GRPO does not (the std division over-weights groups that are almost all right or all wrong).
    An all-equal group gets advantage 0 either way, so it adds no gradient.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_groups, G], got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centered
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centered / (std + eps)


def informative_groups(rewards: torch.Tensor, atol: float = 1e-8) -> torch.Tensor:
    """bool [n_groups]: groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > atol
