"""Worker for tests/test_topk_distillation.py: GRPO's two on-policy distillation losses on fixed random logits
split over the vocabulary at one TP size.

Every rank builds the same [B, S, V] student and teacher logits from a fixed seed and keeps its vocab shard; the
loss goes through `recipes.grpo.make_loss_fn` as in training. Rank 0 writes a JSON report to `--out`:
  on_policy   {loss, grad}: the sampled-token advantage (log p_teacher - log p_student through the vocab-parallel
              log-prob) in the clipped policy gradient, GRPO's per-sequence mean; grad w.r.t. the full logits
  topk        {loss, grad, ids, logp, kl_sum}: the teacher's top-k per position and coef x the mixed top-k KL plus
              the reward term, DAPO's token mean
  hand        {"<variant>-<kind>": {loss, grad}}: the top-k KL alone on a 4-token vocabulary whose values are
              worked out by hand in the test (one masked position, one where student and teacher agree)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.distillation import DistillConfig, on_policy_advantages, vocab_parallel_topk  # noqa: E402
from recipes.grpo import make_loss_fn  # noqa: E402
from recipes.megatron import runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402
from recipes.rl.losses import LossConfig  # noqa: E402

B, S, V, K, TEMPERATURE = 2, 6, 16, 5, 0.7
TOPK = DistillConfig(teacher="t", mode="topk", kind="mixed", alpha=0.3, coef=1.5, reward_weight=0.5, top_k=K)
ON_POLICY = DistillConfig(teacher="t", mode="on_policy", coef=1.0, reward_weight=0.5)


def inputs() -> dict:
    """The same tensors on every rank (and in the test's reference computation)."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(B, S)
    mask[0, :2] = 0.0  # prompt positions
    mask[1, :1] = 0.0
    mask[1, -2:] = 0.0  # past the end of the response
    return {"student": 2.0 * torch.randn(B, S, V, generator=gen), "teacher": 2.0 * torch.randn(B, S, V, generator=gen),
            "labels": torch.randint(0, V, (B, S), generator=gen), "loss_mask": mask,
            "reward_adv": torch.tensor([1.0, -1.0])}


def full_grad(shard_grad: torch.Tensor, tp: int) -> torch.Tensor:
    if tp == 1:
        return shard_grad
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(shard_grad) for _ in range(tp)]
    torch.distributed.all_gather(parts, shard_grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def hand_inputs() -> dict:
    """Row 0: teacher p ~ [3, .5, .5, 1] (top-2: ids 0 and 3), student logits [0, 5, 5, 0]; then a masked position
    where they disagree wildly. Row 1: the same first position, then one where the student is the teacher."""
    t, s = torch.log(torch.tensor([3.0, 0.5, 0.5, 1.0])), torch.tensor([0.0, 5.0, 5.0, 0.0])
    teacher = torch.stack([torch.stack([t, torch.tensor([0.0, 0.0, 0.0, 9.0])]), torch.stack([t, t])])
    student = torch.stack([torch.stack([s, torch.tensor([9.0, 0.0, 0.0, -9.0])]), torch.stack([s, t])])
    return {"student": student, "teacher": teacher, "loss_mask": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}


def run_loss(student: torch.Tensor, batch: dict, loss_cfg: LossConfig, distill: DistillConfig | None, tp: int,
             temperature: float = TEMPERATURE):
    logits = student.clone().requires_grad_(True)
    stats: list = []
    loss_sum, denom = make_loss_fn(loss_cfg, stats, temperature, distill)(logits, batch)
    (loss_sum / denom).backward()
    return {"loss": float(loss_sum.detach() / denom), "grad": full_grad(logits.grad, tp).tolist(),
            "kl_sum": stats[0].get("topk_kl_sum")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runtime.init_distributed(args.tp, 1, seed=0)
    from megatron.core import parallel_state as ps

    x = inputs()
    shard = V // args.tp
    cols = slice(ps.get_tensor_model_parallel_rank() * shard, (ps.get_tensor_model_parallel_rank() + 1) * shard)
    student, teacher = x["student"][..., cols], x["teacher"][..., cols]
    labels, mask = x["labels"], x["loss_mask"]

    # on_policy: the teacher's and the student's log-probs of the sampled tokens, then the advantage
    teacher_logp = ts.vocab_parallel_log_probs(teacher / TEMPERATURE, labels)
    student_logp = ts.vocab_parallel_log_probs(student / TEMPERATURE, labels)
    adv = on_policy_advantages(teacher_logp, student_logp, mask, x["reward_adv"], ON_POLICY)
    on_policy = run_loss(student, {"labels": labels, "loss_mask": mask, "adv": adv, "old_logp": student_logp},
                         LossConfig(variant="grpo"), None, args.tp)

    # topk: the teacher's top-k of the whole vocabulary from its shards, then the KL on that support
    topk_logp, topk_ids = vocab_parallel_topk(teacher / TEMPERATURE, K)
    batch = {"labels": labels, "loss_mask": mask, "adv": TOPK.reward_weight * x["reward_adv"],
             "old_logp": student_logp, "topk_ids": topk_ids, "topk_logp": topk_logp}
    topk = run_loss(student, batch, LossConfig(variant="dapo"), TOPK, args.tp)
    topk.update(ids=topk_ids.tolist(), logp=topk_logp.tolist())

    h = hand_inputs()
    shard = 4 // args.tp
    cols = slice(ps.get_tensor_model_parallel_rank() * shard, (ps.get_tensor_model_parallel_rank() + 1) * shard)
    h_logp, h_ids = vocab_parallel_topk(h["teacher"][..., cols], 2)
    zeros = torch.zeros(2, 2)
    h_batch = {"labels": torch.zeros(2, 2, dtype=torch.long), "loss_mask": h["loss_mask"], "adv": torch.zeros(2),
               "old_logp": ts.vocab_parallel_log_probs(h["student"][..., cols], zeros.long()),
               "topk_ids": h_ids, "topk_logp": h_logp}
    hand = {f"{variant}-{kind}": run_loss(h["student"][..., cols], h_batch, LossConfig(variant=variant),
                                          DistillConfig(teacher="t", mode="topk", kind=kind, alpha=0.3, coef=1.5,
                                                        top_k=2), args.tp, temperature=1.0)
            for variant, kind in [("grpo", "forward"), ("dapo", "forward"), ("grpo", "reverse"), ("grpo", "mixed")]}
    if runtime.rank() == 0:
        Path(args.out).write_text(json.dumps({"on_policy": on_policy, "topk": topk, "hand": hand}))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
