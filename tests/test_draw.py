"""minitpo.draw against transformers' own warpers: tokens drawn by `sample_next` follow HF's temperature +
top-p distribution (TemperatureLogitsWarper, TopPLogitsWarper, then softmax), by a chi-square test, on
every path of the CPU draw (the top-k shortcut, its cascade, the full sort)."""

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from minitpo.draw import sample_next


def hf_probs(logits, temperature, top_p):
    """Reference: HF's own warpers, then softmax. logits (1, V) -> (V,)."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)[0].double()


def chi2_ok(counts, probs):
    """Pearson chi-square of counts against probs at the 0.1% level. Bins with an expected count
    under 5 are pooled (the usual validity rule); the 99.9% quantile comes from the
    Wilson-Hilferty approximation, z = 3.09. The seeds are fixed, so the test is deterministic."""
    n = counts.sum().item()
    big = probs * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([probs[big], probs[~big].sum()[None]]) * n
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    df = keep.sum().item() - 1
    return stat < df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


def test_sample_next_follows_temperature_and_top_p():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -4.0]])
    probs = hf_probs(logits, 0.7, 0.9)  # top-p keeps 3 tokens here
    assert (probs > 0).sum() == 3
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    toks = sample_next(logits.expand(n, -1), 0.7, 0.9, torch.rand(n, generator=gen))
    counts = torch.bincount(toks, minlength=8)
    assert counts[probs == 0].sum() == 0, "tokens outside the nucleus must never be drawn"
    assert chi2_ok(counts, probs)
    assert not chi2_ok(counts, hf_probs(logits, 1.0, 0.9)), "the test must tell temperature 0.7 from 1.0"


@pytest.mark.parametrize("spread, wide", [(3.0, False), (0.05, True)])
def test_sample_next_candidate_shortcut_gives_hf_distribution(spread, wide):
    """The CPU shortcut (the nucleus looked for among the top `candidates` tokens) against HF's
    warpers: a peaked row whose nucleus fits in 8 candidates, and a flat one whose nucleus does not
    (it must take the full sort). Both draw exactly from HF's nucleus with HF's probabilities."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 64, generator=gen) * spread
    probs = hf_probs(logits, 0.8, 0.9)
    assert ((probs > 0).sum() > 8) == wide  # the case is the one named
    scaled = logits / 0.8
    top_mass = (scaled.topk(8).values - scaled.logsumexp(-1)).exp().sum()
    assert (top_mass < 0.9) == wide
    n = 40_000
    toks = sample_next(logits.expand(n, -1), 0.8, 0.9, torch.rand(n, generator=gen), candidates=8)
    counts = torch.bincount(toks, minlength=64)
    assert counts[probs == 0].sum() == 0, "tokens outside the nucleus must never be drawn"
    assert chi2_ok(counts, probs)
    assert not chi2_ok(counts, hf_probs(logits, 1.0, 0.9)), "the test must tell temperature 0.8 from 1.0"


def test_sample_next_mixed_rows_take_each_path():
    """One batch with a peaked and a flat row: each row's draws stay inside its own nucleus."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.cat([torch.randn(1, 64, generator=gen) * 3.0, torch.randn(1, 64, generator=gen) * 0.05])
    n = 5_000
    toks = sample_next(logits.repeat_interleave(n, 0), 0.8, 0.9, torch.rand(2 * n, generator=gen), candidates=8)
    for row in range(2):
        probs = hf_probs(logits[row:row + 1], 0.8, 0.9)
        counts = torch.bincount(toks[row * n:(row + 1) * n], minlength=64)
        assert counts[probs == 0].sum() == 0 and chi2_ok(counts, probs)


def test_sample_next_cascade_takes_the_next_size_before_the_full_sort():
    """candidates=(4, 16): a peaked row (nucleus within 4), a middling one (within 16, not 4) and a flat
    one (wider than 16): each draws exactly from HF's nucleus with HF's probabilities."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, generator=gen)
    rows = [base * 4.0, base * 2.0, base * 0.05]
    sizes = [int((hf_probs(r, 0.8, 0.9) > 0).sum()) for r in rows]
    assert sizes[0] <= 4 < sizes[1] <= 16 < sizes[2], sizes  # each level of the cascade is exercised
    n = 20_000
    toks = sample_next(torch.cat(rows).repeat_interleave(n, 0), 0.8, 0.9, torch.rand(3 * n, generator=gen),
                       candidates=(4, 16))
    for i, row in enumerate(rows):
        probs = hf_probs(row, 0.8, 0.9)
        counts = torch.bincount(toks[i * n:(i + 1) * n], minlength=64)
        assert counts[probs == 0].sum() == 0, "tokens outside the nucleus must never be drawn"
        assert chi2_ok(counts, probs)
