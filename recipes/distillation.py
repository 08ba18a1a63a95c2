"""Teacher -> student distillation pieces that logit KD (`recipes.kd`, fixed data) and on-policy distillation
(`recipes.grpo` with a `distill` section, the student's own samples) share: the frozen teacher model, and the
per-token signals.

On-policy distillation: the student samples responses; the teacher scores the student's sampled tokens; each
token's advantage is the sampled-token estimate of the negative reverse KL,

    A_t = log pi_teacher(y_t | y_<t) - log pi_student(y_t | y_<t)          (y ~ pi_student)

so that the clipped policy gradient minimises KL(pi_student || pi_teacher) on the student's own distribution,
without full-vocabulary logits (`distill.mode: on_policy`; `distill.reward_weight` adds the group-relative reward
advantage). KDRL (`distill.mode: kdrl`) keeps GRPO's reward advantage and adds beta_t * k3(student, teacher) to
every response token's loss, beta_t moving linearly from `kl_coef` to `kl_coef_end` over the run; with
`reward_guided`, responses that earned a reward carry no KL term (RL alone keeps what already works).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from recipes.config import ConfigError, resolve_path


@dataclasses.dataclass
class DistillConfig:
    teacher: str | None = None  # the teacher's Megatron checkpoint or HF folder; None: no teacher (plain GRPO)
    teacher_hf_config: str | None = None  # the teacher's architecture (config.json); None: the student's
    mode: Literal["on_policy", "kdrl"] = "on_policy"
    coef: float = 1.0  # on_policy: weight of the per-token teacher advantage
    reward_weight: float = 0.0  # on_policy: weight of the group-relative reward advantage beside it
    kl_coef: float = 0.1  # kdrl: beta at the first step, in [0, 1]
    kl_coef_end: float | None = None  # kdrl: beta at the last step (linear in between); None: constant
    reward_guided: bool = True  # kdrl: no KL term on responses whose reward is > 0


def check_distill(cfg: DistillConfig) -> None:
    if cfg.teacher is None:
        return
    for key in ("kl_coef", "kl_coef_end"):
        value = getattr(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"distill.{key}={value}: the KL weight schedule must stay in [0, 1]")
    if cfg.mode == "on_policy" and cfg.coef <= 0:
        raise ConfigError(f"distill.coef={cfg.coef}: on-policy distillation needs a positive teacher weight")
    if cfg.reward_weight < 0:
        raise ConfigError(f"distill.reward_weight={cfg.reward_weight} must be >= 0")


def kl_coef_at(cfg: DistillConfig, step: int, steps: int) -> float:
    """KDRL's beta for `step` (0-based) of `steps`: linear from kl_coef to kl_coef_end."""
    end = cfg.kl_coef if cfg.kl_coef_end is None else cfg.kl_coef_end
    frac = step / (steps - 1) if steps > 1 else 0.0
    return cfg.kl_coef + (end - cfg.kl_coef) * frac


def on_policy_advantages(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor,
                         reward_adv: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """[B, S] per-token advantages: coef * (teacher - student) log-probs of the sampled tokens (0 outside the
    responses) + reward_weight * the row's group-relative reward advantage."""
    inside = mask > 0
    gap = torch.where(inside, teacher_logp - student_logp, torch.zeros_like(student_logp))
    return cfg.coef * gap + cfg.reward_weight * reward_adv[:, None] * inside


def kl_rows(rewards: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """[B] bool: the responses KDRL's KL term applies to (with reward_guided, those that earned no reward)."""
    return rewards <= 0 if cfg.reward_guided else torch.ones_like(rewards, dtype=torch.bool)


def build_frozen_teacher(teacher_checkpoint: str, teacher_hf_config: str | None, student, parallel, seed: int,
                         dtype) -> list:
    """The teacher as frozen megatron chunks in the student's TP/PP layout. A teacher whose tokenizer or padded
    vocabulary differs from the student's is an error: both score the same token ids."""
    from recipes.megatron import providers
    from recipes.megatron.hf_checkpoint import load_pretrained
    from recipes.trainer import ModelConfig, architecture, model_tokenizer

    teacher = ModelConfig(hf_config=teacher_hf_config or student.hf_config, init_checkpoint=teacher_checkpoint)
    t_hf = providers.load_hf_config(architecture(teacher))
    s_hf = providers.load_hf_config(architecture(student))
    if providers.padded_vocab_size(t_hf, parallel.tp) != providers.padded_vocab_size(s_hf, parallel.tp):
        raise ConfigError(f"teacher: vocab_size {t_hf['vocab_size']} differs from the student's {s_hf['vocab_size']}: "
                          "distillation needs one tokenizer and vocabulary")
    t_tok, s_tok = model_tokenizer(teacher), model_tokenizer(student)
    if t_tok.hf.get_vocab() != s_tok.hf.get_vocab():
        raise ConfigError(f"teacher {teacher_checkpoint}: its tokenizer ({t_tok.folder}) is not the student's "
                          f"({s_tok.folder}): teacher and student must score the same token ids")
    chunks = providers.build_model(t_hf, parallel.tp, parallel.pp, seed=seed, ddp=False, dtype=dtype,
                                   config_overrides=providers.memory_overrides(parallel.sequence_parallel))
    load_pretrained(chunks, resolve_path(teacher_checkpoint))
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return chunks
