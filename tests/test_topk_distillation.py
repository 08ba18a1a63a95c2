"""Top-k on-policy distillation (`distill.mode: topk`): the top-k KL by hand, and GRPO's two on-policy distillation
losses (the sampled-token advantage and the top-k KL) equal at TP=1 and TP=2.

The TP runs are tests/megatron_scripts/distill_losses.py outside the pytest process, sharing their launch with the
other megatron test modules' (tests/megatron_scripts/run_many.py): fixed random logits split over the vocabulary,
through `recipes.grpo.make_loss_fn` as in training.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from recipes.distillation import DistillConfig, topk_kl, vocab_parallel_topk
from recipes.kd import kd_divergence

TOL = 1e-5
# teacher p ~ [3, .5, .5, 1]: top-2 = ids {0, 3}, renormalised p = [3/4, 1/4]; student q on {0, 3} = [1/2, 1/2]
FWD = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
REV = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # 0.143841
TEACHER = torch.log(torch.tensor([3.0, 0.5, 0.5, 1.0]))
STUDENT = torch.tensor([0.0, 5.0, 5.0, 0.0])  # most of its mass on ids 1, 2: outside the support, not counted

WORKER_RUNS = [(2, "distill_losses", ["--tp", "2", "--out", "{work}/tp2.json"]),
               (1, "distill_losses", ["--tp", "1", "--out", "{work}/tp1.json"])]


def test_topk_kl_by_hand_renormalises_on_the_teachers_support():
    logp, ids = vocab_parallel_topk(TEACHER, 2)
    assert ids.tolist() == [0, 3]
    assert logp.tolist() == pytest.approx([math.log(3 / 5), math.log(1 / 5)], abs=1e-6)  # full-vocab log-probs
    student = STUDENT.gather(-1, ids)
    kl = {kind: float(topk_kl(student, logp, DistillConfig(kind=kind, alpha=0.3)))
          for kind in ("forward", "reverse", "mixed")}
    assert FWD == pytest.approx(0.130812, abs=1e-6) and REV == pytest.approx(0.143841, abs=1e-6)
    assert kl == pytest.approx({"forward": FWD, "reverse": REV, "mixed": 0.3 * FWD + 0.7 * REV}, abs=1e-6)
    # a student that matches the teacher on the support scores 0, whatever it puts elsewhere
    assert float(topk_kl(torch.tensor([math.log(3.0), 0.0]), logp, DistillConfig())) == pytest.approx(0, abs=1e-7)
    # k beyond the vocabulary is the whole vocabulary
    everything = vocab_parallel_topk(TEACHER, 9)[1].tolist()
    assert everything[:2] == [0, 3] and sorted(everything[2:]) == [1, 2]


@pytest.fixture(scope="module")
def layouts(megatron_workers) -> dict[str, dict]:
    work = megatron_workers[__name__]
    return {name: json.loads((work / f"{name}.json").read_text()) for name in ("tp1", "tp2")}


def _flat(x) -> list[float]:
    return [v for item in x for v in _flat(item)] if isinstance(x, list) else [x]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_topk_loss_through_grpo_by_hand(layouts, layout):
    """Row 0: the hand position, then a masked one where student and teacher disagree wildly; row 1: the hand
    position, then one where the student is the teacher (KL 0). coef 1.5, no reward term."""
    hand = layouts[layout]["hand"]
    # grpo: mean over each row's tokens, then over rows: (FWD / 1 + (FWD + 0) / 2) / 2 = 0.75 FWD
    assert hand["grpo-forward"]["loss"] == pytest.approx(1.5 * 0.75 * FWD, abs=1e-6)
    assert hand["dapo-forward"]["loss"] == pytest.approx(1.5 * 2 * FWD / 3, abs=1e-6)  # token mean
    assert hand["grpo-reverse"]["loss"] == pytest.approx(1.5 * 0.75 * REV, abs=1e-6)
    assert hand["grpo-mixed"]["loss"] == pytest.approx(1.5 * 0.75 * (0.3 * FWD + 0.7 * REV), abs=1e-6)
    assert hand["grpo-forward"]["kl_sum"] == pytest.approx(2 * FWD, abs=1e-6)  # the masked position is not counted
    # d forward KL / d student logits = q - p on the support, 0 elsewhere; x 1.5 / (tokens of the row) / rows
    grad = hand["grpo-forward"]["grad"]
    assert grad[0][0] == pytest.approx([1.5 * -0.25 / 2, 0, 0, 1.5 * 0.25 / 2], abs=1e-6)
    assert grad[0][1] == [0.0, 0.0, 0.0, 0.0]  # outside the response
    assert grad[1][0] == pytest.approx([1.5 * -0.25 / 4, 0, 0, 1.5 * 0.25 / 4], abs=1e-6)
    # reverse KL: d/ds_i = q_i (log q_i - log p_i - KL)
    rev = hand["grpo-reverse"]["grad"][0][0]
    assert rev == pytest.approx([1.5 * 0.5 * (math.log(0.5 / 0.75) - REV) / 2, 0, 0,
                                 1.5 * 0.5 * (math.log(0.5 / 0.25) - REV) / 2], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["on_policy", "topk"])
def test_on_policy_losses_and_gradients_equal_at_tp1_and_tp2(layouts, loss):
    tp1, tp2 = layouts["tp1"][loss], layouts["tp2"][loss]
    assert tp2["loss"] == pytest.approx(tp1["loss"], abs=TOL)
    g1, g2 = _flat(tp1["grad"]), _flat(tp2["grad"])
    assert len(g1) == len(g2) == 2 * 6 * 16 and max(abs(g) for g in g1) > 0.01
    assert max(abs(a - b) for a, b in zip(g1, g2)) < TOL
    if loss == "topk":  # the exact top-k of the whole vocabulary, from each shard's top-k
        assert tp2["ids"] == tp1["ids"]
        assert max(abs(a - b) for a, b in zip(_flat(tp1["logp"]), _flat(tp2["logp"]))) < TOL
        assert tp2["kl_sum"] == pytest.approx(tp1["kl_sum"], abs=TOL)


@pytest.mark.slow
def test_tp1_losses_match_a_full_vocabulary_reference(layouts):
    """The same losses from the unsplit logits in plain torch: log_softmax for the sampled-token path, and the
    logit-KD divergence (which gathers whole rows) for the top-k KL."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "megatron_scripts"))
    from distill_losses import K, ON_POLICY, TEMPERATURE, TOPK, inputs

    x = inputs()
    mask, labels = x["loss_mask"], x["labels"]
    s, t = x["student"] / TEMPERATURE, x["teacher"] / TEMPERATURE
    s_lp = torch.log_softmax(s, -1).gather(-1, labels[..., None])[..., 0]
    t_lp = torch.log_softmax(t, -1).gather(-1, labels[..., None])[..., 0]
    # ratio 1: the clipped term is -A per token; grpo: per-row token mean, mean over rows
    adv = (ON_POLICY.coef * (t_lp - s_lp) + ON_POLICY.reward_weight * x["reward_adv"][:, None]) * mask
    on_policy = float(((-adv * mask).sum(-1) / mask.sum(-1)).mean())
    assert layouts["tp1"]["on_policy"]["loss"] == pytest.approx(on_policy, abs=TOL)
    # dapo: token mean of coef x mixed KL - reward_weight x A
    kl = kd_divergence(s, t, "mix", alpha=TOPK.alpha, top_k=K)
    pg = -TOPK.reward_weight * x["reward_adv"][:, None].expand_as(mask)
    topk = float(((TOPK.coef * kl + pg) * mask).sum() / mask.sum())
    assert layouts["tp1"]["topk"]["loss"] == pytest.approx(topk, abs=TOL)
