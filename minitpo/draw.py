"""The draw both samplers share: temperature, then top-p, then one token by inverse CDF from a uniform
that belongs to the sequence. The fast sampler (minitpo/engine.py) runs it inside its decode step, the
`generate` sampler (minitpo/sample.py) as a logits processor, so both draw the same tokens.

Consumes fp32 logits (N, V) and one uniform per row; produces the next token ids (N,). Produces too the
uniforms themselves (`uniform_table`): the n-th token of a sequence is drawn with the n-th uniform of
its own seed's stream, so which slot, batch or process draws a sequence never changes its tokens.

The distribution is HF's: scores / temperature, then top-p exactly as TopPLogitsWarper (no top-k:
pass top_k=0 to `generate` to compare), checked against HF's own warpers by a chi-square test
(tests/test_draw.py)."""

import torch


# CPU: the top-p nucleus is looked for among the top 1024 tokens first, then the top 8192, then the full
# sort. The second level takes SmolLM2's decode step at batch 128 on random prompts from 641 to 539 ms
# (benchmarks/RESULTS.md); on a row too wide for 1024 it draws another token from the same seed than the
# sort would (the same distribution, traversed in another order: chi-square test, tests/test_draw.py).
NUCLEUS_CANDIDATES = (1024, 8192)


def sample_next(logits, temperature, top_p, u, candidates=NUCLEUS_CANDIDATES):
    """Next tokens (N,) from fp32 logits (N, V), as HF samples: scores / temperature, then top-p
    keeps the smallest set of likeliest tokens whose mass reaches top_p (always the top one), then
    one draw from the renormalised kept mass by inverse CDF with u (N,) in [0, 1). temperature == 0
    is greedy (argmax; first index on ties, like HF).

    On CPU a full sort of the vocabulary is most of the cost (64 x 49,152 logits: 160 ms of a 184 ms
    draw, a third of SmolLM2's decode step), so the nucleus is first looked for among the top
    `candidates[0]` tokens (topk, 21 ms): when their mass, under the full softmax, reaches top_p, no
    token below them can be in the nucleus, and the kept set and its probabilities are the full sort's.
    Rows whose nucleus is wider try the next size if there is one (a flat distribution's nucleus runs
    to thousands of tokens: topk 8192 of 100 rows, 48 ms, against 199 ms for their sort), the rest
    the full sort.
    On CUDA the sort is cheap and the step runs in a CUDA graph, where a data-dependent fallback
    cannot, so it always sorts."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if logits.device.type != "cpu" or top_p >= 1.0:
        return _sample_sorted(scores, top_p, u)
    return _sample_nucleus(scores, top_p, u, (candidates,) if isinstance(candidates, int) else tuple(candidates))


def _sample_nucleus(scores, top_p, u, candidates: tuple[int, ...]):
    """sample_next's CPU path on scores (N, V): the rows whose nucleus lies within the top candidates[0]
    tokens draw from them; the others from the next size, and past the last one from the full sort."""
    if not candidates or candidates[0] >= scores.shape[-1]:
        return _sample_sorted(scores, top_p, u)
    n = candidates[0]
    top, order = scores.topk(n, dim=-1)  # (N, n), descending
    probs = (top - scores.logsumexp(-1, keepdim=True)).exp()  # true probabilities, full softmax
    cum = probs.cumsum(-1)
    # HF drops a token when the mass of it and every less likely token is <= 1 - top_p, i.e. when
    # the mass of the likelier tokens (cum - probs, in descending order) is >= top_p
    probs = probs.masked_fill(cum - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=n - 1)
    out = order.gather(-1, pick).squeeze(-1)
    wide = cum[:, -1] < top_p  # the nucleus reaches past the candidates
    if wide.any():
        out[wide] = _sample_nucleus(scores[wide], top_p, u[wide], candidates[1:])
    return out


def _sample_sorted(scores, top_p, u):
    scores, order = torch.sort(scores, dim=-1)  # ascending, as TopPLogitsWarper sorts
    probs = scores.softmax(-1)  # (N, V)
    if top_p < 1.0:  # HF drops tokens whose ascending cumulative mass is <= 1 - top_p
        drop = probs.cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)  # dropped tokens come first with mass 0, so they can never be picked
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)


def uniform_table(seeds: list[int], n: int) -> torch.Tensor:
    """(len(seeds), n) fp32 uniforms in [0, 1): row i is the first n draws of seed i's own generator,
    so a sequence's draws depend on its seed alone."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds]) \
        if seeds else torch.zeros(0, n)
