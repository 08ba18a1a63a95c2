"""Logit knowledge distillation on megatron-core: a frozen teacher's token distributions guide the student.

    nrr kd --config nemo_configs/kd/tiny_cpu.yaml kd.kind=reverse kd.top_k=16

Same data, optimizer, schedule, checkpoints and export as SFT (the shared `recipes.trainer`); only
the loss differs. Per loss token, with temperature T, p = softmax(teacher / T), q = softmax(student / T):

    forward KL  = sum_v p_v (log p_v - log q_v)      (mode covering: the student spreads over the teacher's support)
    reverse KL  = sum_v q_v (log q_v - log p_v)      (mode seeking)
    mix         = alpha * forward + (1 - alpha) * reverse
    top_k = k   : both distributions restricted to the teacher's k most likely tokens and renormalised there

The KD term is scaled by T^2 (so its gradients keep their size as T changes) and mixed with the SFT
cross-entropy: loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL, a token mean over the global batch.
Teacher and student share the tokenizer and (padded) vocabulary; with TP the full-vocab sums run on
vocab shards (no gather) unless top_k needs the whole row.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

import torch

from recipes.config import ConfigError
from recipes.stages import STAGES
from recipes.trainer import SFTConfig, check_config, run_stage, train

HELP = STAGES["kd"].help
DEFAULT_CONFIG = STAGES["kd"].default_config


@dataclasses.dataclass
class TeacherModelConfig:
    hf_config: str = "recipes/assets/models/tiny-qwen2/config.json"
    checkpoint: str | None = None  # the teacher's Megatron checkpoint or HF folder (required)


@dataclasses.dataclass
class KDLossConfig:
    kind: Literal["forward", "reverse", "mix"] = "forward"
    alpha: float = 0.5  # weight of the forward KL in "mix"
    temperature: float = 1.0
    top_k: int | None = None  # restrict both distributions to the teacher's top-k tokens
    kd_weight: float = 0.5  # loss = (1 - kd_weight) * CE + kd_weight * T^2 * KL


@dataclasses.dataclass
class KDConfig(SFTConfig):
    output_dir: str = "runs/kd"
    teacher: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    kd: KDLossConfig = dataclasses.field(default_factory=KDLossConfig)


# ------------------------------------------------------------------------------ the loss


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward",
                  alpha: float = 0.5, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Per-token divergence [..] (already times T^2) between teacher and student logits [.., V] (or vocab
    shards [.., V/TP] under tensor parallelism)."""
    from recipes.megatron import train_step

    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    tp = _tp_size()
    if top_k is not None:
        if tp > 1:
            s, t = train_step.gather_logits(s), train_step.gather_logits(t)
        idx = t.topk(top_k, dim=-1).indices
        log_q = torch.log_softmax(s.gather(-1, idx), dim=-1)
        log_p = torch.log_softmax(t.gather(-1, idx), dim=-1)
        reduce = lambda x: x  # noqa: E731  (the k entries are whole on every rank)
    elif tp > 1:
        log_q, log_p = train_step.vocab_parallel_log_softmax(s), train_step.vocab_parallel_log_softmax(t)
        reduce = train_step.tp_sum
    else:
        log_q, log_p = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
        reduce = lambda x: x  # noqa: E731
    if kind == "forward":
        kl = reduce((log_p.exp() * (log_p - log_q)).sum(-1))
    elif kind == "reverse":
        kl = reduce((log_q.exp() * (log_q - log_p)).sum(-1))
    elif kind == "mix":
        fwd = reduce((log_p.exp() * (log_p - log_q)).sum(-1))
        rev = reduce((log_q.exp() * (log_q - log_p)).sum(-1))
        kl = alpha * fwd + (1.0 - alpha) * rev
    else:
        raise ValueError(f"kd.kind must be forward, reverse or mix, got {kind!r}")
    return kl * temperature**2


class KDLoss:
    """`loss_fn(logits, batch)` for `train_step`: CE and KD mixed, summed over loss tokens; keeps step stats."""

    def __init__(self, cfg: KDLossConfig):
        self.cfg = cfg
        self._sums = torch.zeros(3, dtype=torch.float64)  # ce, kd, tokens

    def __call__(self, logits: torch.Tensor, batch: dict):
        from recipes.megatron import train_step

        mask = batch["loss_mask"].float()
        labels = batch["labels"]
        if _tp_size() > 1:
            ce = -train_step.vocab_parallel_log_probs(logits, labels)
        else:
            ce = -torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
        kd = kd_divergence(logits, batch["teacher_logits"], self.cfg.kind, self.cfg.alpha, self.cfg.temperature,
                           self.cfg.top_k)
        w = self.cfg.kd_weight
        loss_sum = ((1.0 - w) * ce * mask + w * kd * mask).sum()
        self._sums += torch.stack([(ce * mask).sum(), (kd * mask).sum(), mask.sum()]).detach().double().cpu()
        return loss_sum, mask.sum()

    def step_metrics(self) -> dict:
        """Mean CE and KD per loss token on this rank since the last call (the last PP stage logs them)."""
        ce, kd, n = (float(x) for x in self._sums)
        self._sums.zero_()
        return {"ce": ce / n, "kd": kd / n} if n else {}


# ------------------------------------------------------------------------------ the teacher


class Teacher:
    """A frozen Megatron model with the student's parallel layout; adds `teacher_logits` to micro batches."""

    def __init__(self, cfg: KDConfig):
        self.cfg = cfg
        self.chunks = None

    def build(self) -> None:
        from recipes.distillation import build_frozen_teacher
        from recipes.trainer import model_dtype

        if not self.cfg.teacher.checkpoint:
            raise ConfigError("teacher.checkpoint: set the teacher's Megatron checkpoint dir")
        self.chunks = build_frozen_teacher(self.cfg.teacher.checkpoint, self.cfg.teacher.hf_config, self.cfg.model,
                                           self.cfg.parallel, self.cfg.training.seed, model_dtype(self.cfg))

    def attach_logits(self, micro_batches: list[dict]) -> list[dict]:
        """The micro batches with the teacher's logits. Without pipeline parallelism they are computed one micro
        batch at a time as the student's schedule reaches it (one micro batch of teacher logits alive, not the
        whole step's); with it, by a forward-only pass of the teacher's own pipeline first (logits on the last
        stage), since its stages cannot interleave with the student's."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return _OnDemandTeacherBatches(micro_batches, self)
        return self._attach_all(micro_batches)

    def _attach_all(self, micro_batches: list[dict]) -> list[dict]:
        """Forward-only pass of the teacher through the pipeline; logits land on the last stage."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from recipes.megatron import train_step

        def loss_func(output):
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": output.detach()}

        def step(data_iterator, model):
            batch = train_step.to_device(next(data_iterator))
            extra = train_step.model_inputs(batch, train_step.bare_model(model))
            out = model(batch["tokens"], batch["position_ids"], extra["attention_mask"],
                        packed_seq_params=extra["packed_seq_params"])
            return out, loss_func

        with torch.no_grad():
            store = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(micro_batches), model=self.chunks,
                num_microbatches=len(micro_batches), seq_length=self.cfg.data.seq_length,
                micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=True)
        if not ps.is_pipeline_last_stage():
            return micro_batches
        return [{**mb, "teacher_logits": item["logits"]} for mb, item in zip(micro_batches, store)]


class _OnDemandTeacherBatches(list):
    """The student's micro batches (indexing gives them as they are, for shape checks); iterating attaches each
    one's teacher logits just before the student's schedule takes it."""

    def __init__(self, micro_batches: list[dict], teacher: Teacher):
        super().__init__(micro_batches)
        self.teacher = teacher

    def __iter__(self):
        for mb in list.__iter__(self):
            yield self.teacher._attach_all([mb])[0]


def distill(cfg: KDConfig) -> dict:
    teacher = Teacher(cfg)
    loss = KDLoss(cfg.kd)
    return train(cfg, loss_fn=loss, prepare_batches=teacher.attach_logits, extra_metrics=loss.step_metrics,
                 on_init=teacher.build, stage="kd")


def check_kd_config(cfg: KDConfig) -> None:
    check_config(cfg)
    k = cfg.kd
    if k.temperature <= 0:
        raise ConfigError(f"kd.temperature must be > 0, got {k.temperature}")
    if not 0.0 <= k.kd_weight <= 1.0 or not 0.0 <= k.alpha <= 1.0:
        raise ConfigError("kd.kd_weight and kd.alpha must be in [0, 1]")
    if k.top_k is not None and k.top_k < 1:
        raise ConfigError(f"kd.top_k must be >= 1 or null, got {k.top_k}")


# ------------------------------------------------------------------------------ entry points


def add_arguments(parser) -> None:
    from recipes.config import add_config_arguments

    add_config_arguments(parser, DEFAULT_CONFIG)


def cli(args) -> int:
    return run_stage("recipes.kd", KDConfig, args.config, args.overrides, check_kd_config, distill)


def _main() -> int:
    from recipes.megatron import runtime

    return runtime.torchrun_main("recipes.kd", HELP, add_arguments, cli)


if __name__ == "__main__":
    sys.exit(_main())

