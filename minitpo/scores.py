"""Raw judge scores for an iteration's parsed candidates, whatever the judge, through an on-disk cache.

Consumes the `JudgeConfig` and the parsed `Candidate`s; produces one raw score per candidate and the
judge's statistics. Every judgement lands in `iter-N/judge_cache.jsonl` as soon as its chunk is done,
so a run killed while judging resumes without judging the same response (or, pairwise, the same
ordered pair) twice. Identical responses to one instruction are judged once and score the same.
"""

from pathlib import Path

from minitpo import io

CHUNK = 256  # judgements between cache writes: a kill loses at most this much judge work


def score_candidates(cfg, parsed, cache_path: Path) -> tuple[list[float], dict]:
    if cfg.mode == "pairwise":
        return _score_pairwise(cfg, parsed, cache_path)
    cache = {(r["instruction"], r["response"]): r for r in io.read_jsonl(cache_path, missing_ok=True)}
    todo = list(dict.fromkeys((c.instruction, c.response) for c in parsed if (c.instruction, c.response) not in cache))
    scorer = pointwise_scorer(cfg)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        results = scorer(cfg, [i for i, _ in chunk], [r for _, r in chunk])
        cache.update({(i, r): {"instruction": i, "response": r, **res} for (i, r), res in zip(chunk, results)})
        io.write_jsonl(cache_path, list(cache.values()))
    rows = [cache[(c.instruction, c.response)] for c in parsed]
    # score_mass: the probability the GGUF judge put on any valid verdict token. The score is renormalised
    # over those tokens, so a judge that ignores the format still gives numbers: this number shows it.
    masses = [r["score_mass"] for r in rows if r.get("score_mass") is not None]
    # cut: the judge prompt was over judge.n_ctx, so the response was cut to fit (judge.fit_prompt)
    return [r["score"] for r in rows], {"judged": len(todo), "cached": len(parsed) - len(todo),
                                        "verdict_mass": sum(masses) / len(masses) if masses else None,
                                        "responses_cut": sum(bool(r.get("cut")) for r in rows)}


def pointwise_scorer(cfg):
    """f(cfg, instructions, responses) -> [{"score": float, "score_mass": float or None}]."""
    if cfg.type == "reward_model":
        from minitpo.reward_model import judge_reward_model

        return lambda *args: [{"score": s, "score_mass": None} for s in judge_reward_model(*args)]
    from minitpo.judge import judge_responses_detailed

    return judge_responses_detailed


def _score_pairwise(cfg, parsed, cache_path: Path) -> tuple[list[float], dict]:
    """Bradley-Terry scores within each instruction's group of parsed responses."""
    from minitpo.pairwise import judge_pairwise

    cache = {(r["instruction"], r["first"], r["second"]): r["verdict"] for r in io.read_jsonl(cache_path, missing_ok=True)}
    groups: dict[int, list] = {}
    for c in parsed:
        groups.setdefault(c.instruction_id, []).append(c)
    scores, consistent, n_pairs, n_cut = {}, 0.0, 0, 0
    items = list(groups.items())
    per_chunk = max(1, CHUNK // 16)  # groups per chunk (a group of K responses is K(K-1) judgements)
    for start in range(0, len(items), per_chunk):
        chunk = items[start:start + per_chunk]
        group_scores, stats = judge_pairwise(cfg, [(cs[0].instruction, [c.response for c in cs]) for _, cs in chunk],
                                             cache=cache)
        for (_, cs), s in zip(chunk, group_scores):
            scores.update({(c.instruction_id, c.index): v for c, v in zip(cs, s)})
        pairs = stats.get("pairs_judged", 0)
        consistent += stats.get("position_consistency", 0.0) * pairs
        n_pairs += pairs
        n_cut += stats.get("pairs_cut", 0)
        io.write_jsonl(cache_path, [{"instruction": i, "first": a, "second": b, "verdict": v}
                                    for (i, a, b), v in cache.items()])
    return ([scores[(c.instruction_id, c.index)] for c in parsed],
            {"pairs_judged": n_pairs, "position_consistency": consistent / n_pairs if n_pairs else None,
             "pairs_cut": n_cut})
