"""Logit-KD losses against values computed by hand on two- and three-token vocabularies."""

import math

import pytest
import torch

from recipes.kd import KDLoss, KDLossConfig, kd_divergence

LN3 = math.log(3.0)
# teacher p = [1/4, 3/4], student q = [1/2, 1/2]
FWD = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
REV = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841


def _pair(t_scale=1.0):
    teacher = torch.tensor([[[0.0, LN3 * t_scale]]])
    student = torch.zeros(1, 1, 2)
    return student, teacher


def test_forward_and_reverse_kl_by_hand():
    s, t = _pair()
    assert FWD == pytest.approx(0.1308120, abs=1e-6) and REV == pytest.approx(0.1438410, abs=1e-6)
    assert kd_divergence(s, t, "forward").item() == pytest.approx(FWD, abs=1e-6)
    assert kd_divergence(s, t, "reverse").item() == pytest.approx(REV, abs=1e-6)
    assert kd_divergence(s, t, "mix", alpha=0.25).item() == pytest.approx(0.25 * FWD + 0.75 * REV, abs=1e-6)


def test_temperature_scales_logits_and_multiplies_by_t_squared():
    # teacher logits [0, 2 ln 3] at T=2 give the same p = [1/4, 3/4]; the loss is T^2 * KL
    s, t = _pair(t_scale=2.0)
    assert kd_divergence(s, t, "forward", temperature=2.0).item() == pytest.approx(4 * FWD, abs=1e-6)
    # gradient of T^2 KL(p || softmax(s/T)) w.r.t. s is T * (q - p)
    s.requires_grad_(True)
    kd_divergence(s, t, "forward", temperature=2.0).sum().backward()
    assert s.grad[0, 0].tolist() == pytest.approx([2 * (0.5 - 0.25), 2 * (0.5 - 0.75)], abs=1e-6)


def test_top_k_restricts_to_teacher_support_and_renormalises():
    # teacher probabilities proportional to [3, 1, 0.5]: top-2 = tokens 0 and 1 -> p = [3/4, 1/4];
    # the student's large logit on token 2 is outside the support, q over {0,1} = [1/2, 1/2]
    teacher = torch.tensor([[[LN3, 0.0, math.log(0.5)]]])
    student = torch.tensor([[[0.0, 0.0, 5.0]]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_divergence(student, teacher, "forward", top_k=2).item() == pytest.approx(expected, abs=1e-6)
    # without top-k the full 3-token distributions count
    p = torch.tensor([3.0, 1.0, 0.5]) / 4.5
    q = torch.softmax(torch.tensor([0.0, 0.0, 5.0]), 0)
    full = float((p * (p.log() - q.log())).sum())
    assert kd_divergence(student, teacher, "forward").item() == pytest.approx(full, abs=1e-6)


def test_kd_loss_mixes_ce_and_kd_over_loss_tokens_only():
    s, t = _pair()
    student = torch.cat([s, s], dim=1)  # two positions, the second is not a loss token
    teacher = torch.cat([t, t * 0], dim=1)
    batch = {"labels": torch.tensor([[1, 0]]), "loss_mask": torch.tensor([[1.0, 0.0]]), "teacher_logits": teacher}
    loss = KDLoss(KDLossConfig(kind="forward", kd_weight=0.25, temperature=1.0))
    loss_sum, n = loss(student, batch)
    ce = math.log(2.0)  # the student is uniform over 2 tokens
    assert float(n) == 1.0
    assert loss_sum.item() == pytest.approx(0.75 * ce + 0.25 * FWD, abs=1e-6)
    assert loss.step_metrics() == pytest.approx({"ce": ce, "kd": FWD}, abs=1e-6)
