"""The judges: every way minitpo scores responses, behind one dispatch. The judge sees responses only.

  llama.py         pointwise GGUF judge via llama.cpp (its plumbing, shared with pairwise.py: minitpo/llamacpp.py)
  pairwise.py      pairwise GGUF judge: every ordered pair, fit with Bradley-Terry
  reward_model.py  a transformers sequence-classification reward model
  python.py        the user's own function, f(instruction, response) -> float
  check.py         `minitpo judge-check`: is the judge better than chance? (sanity.jsonl)

This module is the dispatch (`pointwise_scorer`, `compare`), pointwise scores as a preference, and
the judge stage's on-disk cache (`score_candidates`): it consumes the `JudgeConfig` and an iteration's
parsed `Candidate`s and produces one raw score per candidate and the judge's statistics. Every
judgement lands in `iter-N/judge_cache.jsonl` as soon as its chunk is done, so a run killed while
judging resumes without judging the same response (or, pairwise, the same ordered pair) twice.
Identical responses to one instruction are judged once and score the same.

Submodules are imported where they are used: llama.cpp, transformers and the user's module load only
for the judge a recipe names.
"""

from pathlib import Path

from minitpo import io
from minitpo.judges.python import PartialScores
from minitpo.pairs import by_instruction

CHUNK = 256  # judgements between cache writes: a kill loses at most this much judge work


def score_candidates(cfg, parsed, cache_path: Path, progress: bool = True) -> tuple[list[float | None], dict]:
    """One raw score per parsed candidate (None: unjudged, see `unjudged`) and the judge's statistics."""
    if cfg.mode == "pairwise":
        return _score_pairwise(cfg, parsed, cache_path, progress)
    cache = {(r["instruction"], r["response"]): r for r in io.read_jsonl(cache_path, missing_ok=True)}
    todo = list(dict.fromkeys((c.instruction, c.response) for c in parsed if (c.instruction, c.response) not in cache))
    scorer = pointwise_scorer(cfg)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        failed = None
        try:
            results = scorer(cfg, [i for i, _ in chunk], [r for _, r in chunk], progress=progress)
        except PartialScores as e:  # a python judge raised: keep what it judged before, then stop
            results, failed = e.results, e.__cause__
        cache.update({(i, r): {"instruction": i, "response": r, **res} for (i, r), res in zip(chunk, results)})
        io.write_jsonl(cache_path, list(cache.values()))
        if failed is not None:
            raise failed
    rows = [cache[(c.instruction, c.response)] for c in parsed]
    # score_mass: the probability the GGUF judge put on any valid verdict token. The score is renormalised
    # over those tokens, so a judge that ignores the format still gives numbers: under judge.min_verdict_mass
    # that number is no verdict, and the response gets None, as a verdict that does not parse would.
    masses = [r["score_mass"] for r in rows if r.get("score_mass") is not None]
    scores = [None if unjudged(r, cfg) else r["score"] for r in rows]
    # cut: the judge prompt was over judge.n_ctx, so the response was cut to fit (judge.fit_prompt)
    return scores, {"judged": len(todo), "cached": len(parsed) - len(todo),
                    "verdict_mass": sum(masses) / len(masses) if masses else None,
                    "responses_cut": sum(bool(r.get("cut")) for r in rows),
                    "unjudged": scores.count(None)}


def unjudged(result: dict, cfg) -> bool:
    """A pointwise result whose verdict mass is under judge.min_verdict_mass (GGUF judges only have one)."""
    return result.get("score_mass") is not None and result["score_mass"] < cfg.min_verdict_mass


def merge_stats(parts: list[dict]) -> dict:
    """The judge stats of several processes' shares (score_candidates) as one process's: counts add,
    the two means are weighted by what they average over."""
    weights = {"verdict_mass": lambda s: s["judged"] + s["cached"], "position_consistency": lambda s: s["pairs_judged"]}
    out = {}
    for key in parts[0]:
        if key in weights:
            pairs = [(s[key], weights[key](s)) for s in parts if s[key] is not None]
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total else None
        else:
            out[key] = sum(s[key] for s in parts)
    return out


def rank_cache(cache_path: Path, rank: int) -> Path:
    """Where rank `rank` keeps its judgements during the stage: rank 0 in the run's judge cache."""
    return cache_path if rank == 0 else cache_path.with_name(f"{cache_path.stem}.rank{rank}{cache_path.suffix}")


def merge_caches(cache_path: Path) -> None:
    """Fold the ranks' judge caches (left by this stage or by a killed run with more processes) into
    the run's one judge cache, as one process would have written it."""
    extra = sorted(cache_path.parent.glob(f"{cache_path.stem}.rank*{cache_path.suffix}"))
    if extra:
        rows = [r for p in [cache_path, *extra] for r in io.read_jsonl(p, missing_ok=True)]
        io.write_jsonl(cache_path, rows)
        for p in extra:
            p.unlink()


def preference(score_a: float, score_b: float) -> float:
    """p = P(a better) from two pointwise scores: 1 when a scores higher, 0.5 on a tie, 0 below."""
    return 0.5 + 0.5 * ((score_a > score_b) - (score_a < score_b))


def pointwise_scorer(cfg):
    """f(cfg, instructions, responses, progress=True) -> [{"score": float, "score_mass": float or None}]
    for every judge that scores one response at a time (all but the pairwise GGUF judge)."""
    assert cfg.mode == "pointwise" or cfg.type != "llama_cpp", "the pairwise judge scores groups: see score_candidates"
    if cfg.type == "reward_model":
        from minitpo.judges.reward_model import score_responses
    elif cfg.type == "python":
        from minitpo.judges.python import score_responses
    else:
        from minitpo.judges.llama import score_responses
    return score_responses


def compare(cfg, instructions: list[str], ours: list[str], theirs: list[str]) -> list[float]:
    """p = P(our response is better) per item, with whatever judge `cfg` names: a GGUF judge reads
    both orders of each pair (pairwise.compare); a pointwise judge scores each response, and p is 1
    when ours scores higher, 0.5 on a tie, 0 below."""
    if cfg.type == "llama_cpp":
        from minitpo.judges.pairwise import compare as compare_pairwise

        return compare_pairwise(cfg, instructions, ours, theirs)
    scored = pointwise_scorer(cfg)(cfg, instructions * 2, ours + theirs)
    n = len(instructions)
    return [preference(a["score"], b["score"]) for a, b in zip(scored[:n], scored[n:])]


def _score_pairwise(cfg, parsed, cache_path: Path, progress: bool = True) -> tuple[list[float], dict]:
    """Bradley-Terry scores within each instruction's group of parsed responses."""
    from minitpo.judges.pairwise import judge_pairwise

    cache = {(r["instruction"], r["first"], r["second"]): r["verdict"] for r in io.read_jsonl(cache_path, missing_ok=True)}
    groups = by_instruction(parsed)
    scores, consistent, n_pairs, n_cut = {}, 0.0, 0, 0
    per_chunk = max(1, CHUNK // 16)  # groups per chunk (a group of K responses is K(K-1) judgements)
    for start in range(0, len(groups), per_chunk):
        chunk = groups[start:start + per_chunk]
        group_scores, stats = judge_pairwise(cfg, [(cs[0].instruction, [c.response for c in cs]) for cs in chunk],
                                             progress=progress, cache=cache)
        for cs, s in zip(chunk, group_scores):
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
