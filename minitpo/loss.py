"""Preference losses for TPO training: pure functions of per-pair sequence log-probs.

Consumes four (B,) tensors of summed completion log-probs (see `logps.sequence_logps`): the policy's and the
frozen reference's, on the chosen and the rejected side of each pair. Produces per-pair losses (B,) and the
implicit rewards (B,) for logging; the caller takes `.mean()` and, for IRPO, adds `alpha * nll_loss(...)`.

All losses are functions of one number per pair, the log-ratio difference

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

and differ only in what they do with it:

    sigmoid (DPO, Rafailov et al. 2023, eq. 7)    -logsigmoid(beta * h)
    sigmoid + label_smoothing eps (cDPO,           -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
        Mitchell 2023, "A note on DPO with noisy preferences")
    ipo (Azar et al. 2023, eq. 17)                 (h - 1 / (2 * beta))^2
    hinge (SLiC-HF, Zhao et al. 2023)              relu(1 - beta * h)

The implicit reward of a response is beta * (policy - ref) (DPO section 5); it is detached, for logging only.

Worked example (tests/test_loss.py checks every number here), beta = 0.1:
    policy_chosen = -10, ref_chosen = -11        chosen log-ratio   = +1
    policy_rejected = -12, ref_rejected = -11    rejected log-ratio = -1
    h = 1 - (-1) = 2,  beta * h = 0.2
    sigmoid:  -logsigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    cDPO eps = 0.1: softplus(-x) - softplus(x) = -x, so the loss is log(1 + e^-0.2) + 0.1 * 0.2 = 0.6181389
    ipo:      (2 - 1 / 0.2)^2 = (2 - 5)^2 = 9
    hinge:    relu(1 - 0.2) = 0.8
    rewards:  chosen 0.1 * 1 = 0.1, rejected 0.1 * -1 = -0.1
With policy == reference, h = 0 and the sigmoid loss is -logsigmoid(0) = log 2 = 0.6931 for every pair.

IPO normalisation, a deliberate choice: every loss here takes the same SUMMED sequence log-probs, as in
the IPO paper, where h is the log-ratio of whole sequences. TRL instead averages log-probs per token for IPO,
which makes h about |y| times smaller, so the same beta means a much stronger pull towards the margin
1 / (2 * beta). A caller who wants TRL's behaviour divides all four log-probs by the token counts first.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = (pc - rc) - (pr - rr), computed in float32 whatever the input dtype (all (B,))."""
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    return chosen - rejected


def _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Implicit DPO rewards beta * (policy - ref) per side, detached: they are logged, never trained on."""
    chosen = beta * (policy_chosen_logps.float() - ref_chosen_logps.float()).detach()
    rejected = beta * (policy_rejected_logps.float() - ref_rejected_logps.float()).detach()
    return chosen, rejected


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss (Rafailov et al. 2023, eq. 7), optionally conservative (cDPO, Mitchell 2023).

        losses = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
        h      = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)

    eps = label_smoothing is the assumed probability that a preference label is flipped; eps = 0 is plain
    DPO. All inputs are (B,) summed log-probs; returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    assert 0.0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}"
    logits = beta * _log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )  # (B,)
    # logsigmoid, not log(sigmoid(x)): sigmoid underflows to 0 for x below about -100 and log(0) = -inf.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO loss (Azar et al. 2023, eq. 17): losses = (h - 1 / (2 * beta))^2, beta is the paper's tau.

    Unlike DPO, the loss has a finite target: it stops pushing once h reaches 1 / (2 * beta), which is what
    keeps IPO from overfitting deterministic preferences. h is built from summed log-probs, as in the paper
    (see the module docstring for TRL's per-token average). Returns (losses, chosen_rewards,
    rejected_rewards), each (B,).
    """
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss of SLiC-HF (Zhao et al. 2023), max(0, delta - log-ratio), applied to the
    reference-normalised h as TRL and Tang et al. 2024 (GPO) do: losses = relu(1 - beta * h), so beta plays
    the role of 1 / delta. The gradient is zero once beta * h >= 1. Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)
    return (losses, *_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def nll_loss(policy_chosen_logps: Tensor, chosen_n_tokens: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen completion, per pair (B,).

    IRPO (Pang et al. 2024) adds alpha * NLL(chosen) / |chosen| to the DPO loss so that the chosen
    responses' likelihood does not drift down while the margin grows. The caller adds `alpha * nll`.
    chosen_n_tokens (B,) is the count of scored tokens returned by `sequence_logps`; clamped to 1 so that
    an (invalid) empty completion gives 0 instead of NaN.
    """
    return -policy_chosen_logps.float() / chosen_n_tokens.clamp(min=1).float()


_PAIR_LOSSES = {"sigmoid": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss named by the recipe's `loss` key: "sigmoid" (DPO / cDPO), "ipo" or "hinge".

    label_smoothing only exists for "sigmoid"; asking for it with another loss is an error rather than a
    silent no-op. Returns (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    if name not in _PAIR_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; choose one of {sorted(_PAIR_LOSSES)}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if name == "sigmoid":
        return dpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing={label_smoothing} only applies to the 'sigmoid' loss, not {name!r}")
    return _PAIR_LOSSES[name](*logps, beta=beta)
