"""Loss variants and advantages against values worked out by hand on small tensors."""

import math

import pytest
import torch

from recipes.rl.advantages import group_advantages, informative_groups
from recipes.rl.losses import LossConfig, entropy_from_logits, k3_kl, mismatch_stats, policy_loss, token_losses

# two sequences, three token slots; the last slot of sequence 0 is padding (ratio 5 must not count)
RATIOS = torch.tensor([[1.5, 0.9, 5.0], [0.5, 1.1, 1.3]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], dtype=torch.float64)


def _logp():
    return (OLD + RATIOS.log()).clone().requires_grad_(True)


# token losses with eps 0.2 / 0.2:
#  seq 0 (A=+1): r=1.5 -> clipped at 1.2 -> -1.2 ; r=0.9 -> -0.9
#  seq 1 (A=-1): r=0.5 -> clipped at 0.8 -> +0.8 ; r=1.1 -> +1.1 ; r=1.3 -> +1.3 (pessimistic side, unclipped)
@pytest.mark.parametrize(
    "variant, expected_sum, expected_den",
    [
        ("grpo", (-1.2 - 0.9) / 2 + (0.8 + 1.1 + 1.3) / 3, 2.0),  # mean of per-sequence means
        ("dr_grpo", (-1.2 - 0.9 + 0.8 + 1.1 + 1.3) / 4, 2.0),  # token sum / constant 4, per sequence
        ("dapo", -1.2 - 0.9 + 0.8 + 1.1 + 1.3, 5.0),  # token-level mean over the batch
    ],
)
def test_loss_variants_by_hand(variant, expected_sum, expected_den):
    cfg = LossConfig(variant=variant, eps_low=0.2, eps_high=0.2, max_response_tokens=4)
    loss_sum, den, stats = policy_loss(_logp(), OLD, ADV, MASK, cfg)
    assert loss_sum.item() == pytest.approx(expected_sum, abs=1e-9)
    assert den.item() == expected_den
    assert stats["tokens"] == 5
    assert stats["clipped_tokens"] == 2  # seq0 tok0 (r>1.2, A>0) and seq1 tok0 (r<0.8, A<0)


def test_clipped_tokens_get_no_gradient_and_padding_none():
    logp = _logp()
    loss_sum, den, _ = policy_loss(logp, OLD, ADV, MASK, LossConfig(variant="dapo"))
    (loss_sum / den).backward()
    g = logp.grad
    assert g[0, 0] == 0 and g[1, 0] == 0  # clipped
    assert g[0, 2] == 0  # padding
    # unclipped token: d/dlogp of -r*A / 5 = -r*A/5
    assert g[0, 1].item() == pytest.approx(-0.9 * 1.0 / 5)
    assert g[1, 2].item() == pytest.approx(-1.3 * -1.0 / 5)


def test_clip_higher_lets_positive_tokens_grow_further():
    cfg = LossConfig(variant="dapo", eps_low=0.2, eps_high=0.6)
    loss_sum, den, stats = policy_loss(_logp(), OLD, ADV, MASK, cfg)
    # r=1.5 is now inside [0.8, 1.6]: -1.5 instead of -1.2
    assert (loss_sum / den).item() == pytest.approx((-1.5 - 0.9 + 0.8 + 1.1 + 1.3) / 5)
    assert stats["clipped_tokens"] == 1


def test_all_equal_group_contributes_nothing():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(rewards).flatten()
    logp = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss_sum, den, _ = policy_loss(logp, logp.detach(), adv, torch.ones(4, 3), LossConfig())
    loss_sum.backward()
    assert loss_sum.item() == 0 and torch.all(logp.grad == 0)


def test_kl_k3_term():
    logp = torch.zeros(1, 2, dtype=torch.float64)
    ref = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    assert k3_kl(logp, ref)[0, 0].item() == pytest.approx(1 - math.log(2.0))  # 2 - ln2 - 1
    assert k3_kl(logp, ref)[0, 1].item() == 0.0
    cfg = LossConfig(variant="dapo", kl_coef=0.5)
    loss_sum, den, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), cfg, ref_logp=ref)
    assert loss_sum.item() == pytest.approx(0.5 * (1 - math.log(2.0)))
    assert stats["kl_sum"] == pytest.approx(1 - math.log(2.0))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), cfg)


def test_micro_batches_add_up_to_the_full_batch():
    # the (sum, denominator) split must give the same loss however the batch is cut
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    adv, mask = torch.randn(6, dtype=torch.float64), (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    for variant in ("grpo", "dr_grpo", "dapo"):
        cfg = LossConfig(variant=variant, max_response_tokens=5)
        s, d, _ = policy_loss(logp, old, adv, mask, cfg)
        parts = [policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], cfg)[:2] for i in (0, 2, 4)]
        assert (s / d).item() == pytest.approx((sum(p[0] for p in parts) / sum(p[1] for p in parts)).item())


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    std_norm = group_advantages(rewards, std_normalize=True)
    s = math.sqrt(1 / 3)  # unbiased std of [1,0,0,1]
    assert std_norm[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert std_norm[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert std_norm[2].tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5], rel=1e-5)  # std of [0,0,0,2] = 1
    dr = group_advantages(rewards, std_normalize=False)
    assert dr[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert dr[2].tolist() == [-0.5, -0.5, -0.5, 1.5]
    assert informative_groups(rewards).tolist() == [True, False, True]


def test_entropy():
    uniform = torch.zeros(1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


# truncated importance sampling: raw weights pi_old / pi_engine per token, cap 2.5 -> [[2, 0.5, 2.5], [1, 2.5, 0.25]]
RAW_W = torch.tensor([[2.0, 0.5, 9.0], [1.0, 3.0, 0.25]], dtype=torch.float64)
ENGINE = OLD - RAW_W.log()


def test_tis_weights_each_policy_gradient_term_by_hand():
    cfg = LossConfig(variant="dapo", tis_cap=2.5)
    logp = _logp()
    loss_sum, den, stats = policy_loss(logp, OLD, ADV, MASK, cfg, engine_logp=ENGINE)
    # token terms (above) -1.2, -0.9 | 0.8, 1.1, 1.3 times weights 2, 0.5 | 1, 2.5 (capped 3), 0.25
    assert loss_sum.item() == pytest.approx(2 * -1.2 + 0.5 * -0.9 + 1 * 0.8 + 2.5 * 1.1 + 0.25 * 1.3, abs=1e-9)
    assert den.item() == 5.0
    assert stats["tis_weight_sum"] == pytest.approx(2 + 0.5 + 1 + 2.5 + 0.25)
    (loss_sum / den).backward()
    # the weight is a constant: d/dlogp of -w*r*A / 5 on the unclipped tokens
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 * 0.9 * 1.0 / 5)
    assert logp.grad[1, 2].item() == pytest.approx(-0.25 * 1.3 * -1.0 / 5)
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped, padding
    # the KL term is not reweighted
    ref = OLD.clone()
    with_kl, _ = token_losses(_logp(), OLD, ADV, LossConfig(tis_cap=2.5, kl_coef=0.1), ref, ENGINE)
    pg, _ = token_losses(_logp(), OLD, ADV, LossConfig(tis_cap=2.5), None, ENGINE)
    assert torch.allclose(with_kl - pg, 0.1 * k3_kl(_logp(), ref))
    with pytest.raises(ValueError, match="engine's log-probs"):
        policy_loss(_logp(), OLD, ADV, MASK, cfg)


def test_without_tis_cap_the_loss_is_unchanged():
    assert LossConfig().tis_cap is None
    for variant in ("grpo", "dr_grpo", "dapo"):
        cfg = LossConfig(variant=variant, max_response_tokens=4)
        a, b = _logp(), _logp()
        plain = policy_loss(a, OLD, ADV, MASK, cfg)
        told = policy_loss(b, OLD, ADV, MASK, cfg, engine_logp=ENGINE)  # telemetry only
        assert torch.equal(plain[0], told[0]) and torch.equal(plain[1], told[1])
        (plain[0] / plain[1]).backward()
        (told[0] / told[1]).backward()
        assert torch.equal(a.grad, b.grad)
        assert "tis_weight_sum" not in told[2] and told[2]["mismatch_tokens"] == 5


def test_mismatch_stats_by_hand():
    train = torch.tensor([[-1.0, -2.0, -3.0]])
    engine = torch.tensor([[-1.1, -1.5, -9.0]])
    s = mismatch_stats(train, engine, torch.tensor([[1, 1, 0]]))  # the third token is masked out
    d = [-0.1, 0.5]  # engine - train
    assert s["mismatch_tokens"] == 2
    assert s["mismatch_mult_prob_error_sum"] / 2 == pytest.approx((math.exp(0.1) + math.exp(0.5)) / 2)
    assert s["mismatch_kl_sum"] / 2 == pytest.approx(0.2)
    assert s["mismatch_kl_k3_sum"] == pytest.approx(sum(math.exp(-x) - 1 + x for x in d))
    assert s["mismatch_max_abs_diff"] == pytest.approx(0.5)
    same = mismatch_stats(train, train, torch.ones(1, 3))
    assert same["mismatch_mult_prob_error_sum"] == 3 and same["mismatch_kl_sum"] == 0
