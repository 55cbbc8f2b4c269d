"""Preference losses against hand-worked numbers (the example in minitpo/loss.py's docstring) and against
independent formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from minitpo.loss import dpo_loss, hinge_loss, ipo_loss, nll_loss, preference_loss

# The worked example of the loss.py docstring: chosen log-ratio +1, rejected log-ratio -1, so h = 2.
PC, PR, RC, RR = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
BETA = 0.1


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-50.0 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def test_dpo_worked_example():
    losses, chosen_rewards, rejected_rewards = dpo_loss(PC, PR, RC, RR, beta=BETA)
    # beta * h = 0.1 * 2 = 0.2; -logsigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.8187308) = 0.5981389
    assert losses.item() == pytest.approx(0.5981389, abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.1)  # 0.1 * (-10 - -11)
    assert rejected_rewards.item() == pytest.approx(-0.1)  # 0.1 * (-12 - -11)


def test_cdpo_worked_example():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389
    assert losses.item() == pytest.approx(0.6181389, abs=1e-6)


def test_ipo_worked_example():
    losses, chosen_rewards, _ = ipo_loss(PC, PR, RC, RR, beta=BETA)
    # (h - 1 / (2 * beta))^2 = (2 - 5)^2 = 9
    assert losses.item() == pytest.approx(9.0)
    assert chosen_rewards.item() == pytest.approx(0.1)


def test_hinge_worked_example():
    losses, _, _ = hinge_loss(PC, PR, RC, RR, beta=BETA)
    # relu(1 - 0.1 * 2) = 0.8
    assert losses.item() == pytest.approx(0.8)
    # beta * h = 0.5 * 4 = 2 > 1: past the margin, zero loss.
    losses, _, _ = hinge_loss(PC, PR - 2, RC, RR, beta=0.5)
    assert losses.item() == 0.0


def test_nll_worked_example():
    # -(-12) / 4 tokens = 3 nats per token; the empty completion is clamped to 1 token instead of nan.
    nll = nll_loss(torch.tensor([-12.0, 0.0]), torch.tensor([4, 0]))
    assert nll.tolist() == [3.0, 0.0]


def test_dpo_equal_policy_and_reference_is_log_2():
    pc, pr, _, _ = random_logps()
    for smoothing in (0.0, 0.1, 0.3):
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc, pr, beta=0.3, label_smoothing=smoothing)
        torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
        assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


def test_dpo_matches_softplus_formula():
    # Independent form: -logsigmoid(x) = softplus(-x) = log(1 + exp(-x)), written from the raw logps.
    pc, pr, rc, rr = random_logps()
    beta = 0.2
    x = beta * ((pc - rc) - (pr - rr))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(losses, F.softplus(-x).float())
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-x)).float())
    # cDPO = softplus(-x) + eps * x, because softplus(x) - softplus(-x) = x; eps = 0 given explicitly is
    # plain DPO.
    for eps in (0.0, 0.2):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        torch.testing.assert_close(losses, (F.softplus(-x) + eps * x).float())


def test_dpo_is_stable_for_large_margins():
    # beta * h = -1000: log(sigmoid(-1000)) would be log(0) = -inf; the loss must be 1000, finite.
    losses, _, _ = dpo_loss(torch.tensor([-10000.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), beta=0.1)
    assert losses.item() == pytest.approx(1000.0)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_raising_chosen_logp_lowers_loss(name):
    # Every loss must prefer a higher chosen and a lower rejected log-prob (h = 2, all inside the margins).
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    losses, _, _ = preference_loss(name, pc, pr, RC, RR, beta=BETA)
    losses.sum().backward()
    assert pc.grad.item() < 0 and pr.grad.item() > 0
    # Rewards are for logging only: no gradient may flow through them.
    _, chosen_rewards, rejected_rewards = preference_loss(name, pc, pr, RC, RR, beta=BETA)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_preference_loss_dispatch():
    # Each name reaches its own loss: the worked example's numbers (h = 2, beta = 0.1) tell them apart.
    expected = {"sigmoid": 0.5981389, "ipo": 9.0, "hinge": 0.8}
    for name, value in expected.items():
        assert preference_loss(name, PC, PR, RC, RR, beta=BETA)[0].item() == pytest.approx(value, abs=1e-6), name
    # label_smoothing reaches the sigmoid loss: the cDPO number, not the plain one
    assert preference_loss("sigmoid", PC, PR, RC, RR, beta=BETA, label_smoothing=0.1)[0].item() == pytest.approx(
        0.6181389, abs=1e-6)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", PC, PR, RC, RR, beta=BETA)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("ipo", PC, PR, RC, RR, beta=BETA, label_smoothing=0.1)
