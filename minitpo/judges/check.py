"""`minitpo judge-check`: can the recipe's judge tell a good response from a worse one, before a run
spends hours optimizing whatever it prefers?

Consumes a `JudgeConfig` (any type and mode) and preference items (instruction, chosen, rejected,
kind): by default the sanity set shipped with minitpo (sanity.jsonl: 64 instructions written
for this project, each with a good answer and a copy with one or two factual errors), from which four
kinds of worse response are built:

  off_topic      the good answer to another instruction (of another category)
  truncated      the good answer cut mid-sentence, at about half its words
  refusal        a refusal or "I don't know."
  factual_error  the good answer with a wrong number, date, place or cause (written by hand)

or the user's own JSONL in TRL's preference format (`prompt`, `chosen`, `rejected`; strings, or
lists of chat messages whose last one is taken). Produces how often the chosen response wins, overall
and per kind, with a 95% bootstrap interval (ties count half); for GGUF judges the verdict mass (the
probability on valid verdict tokens), for the pairwise judge its position consistency; and judged
responses per second, the model load included.

A pointwise judge scores each distinct response once and the higher score wins. As in a run, a GGUF
judge's response with a verdict mass under judge.min_verdict_mass is unjudged: it gets no score, the
items it belongs to are left out of the accuracy, and the result counts it (`unjudged`). The pairwise
judge reads both orders of each item: p = (p(chosen first) + 1 - p(chosen second)) / 2, as in evaluation.
"""

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from minitpo.errors import UserError
from minitpo.evaluate import MIN_CI_ITEMS, ci_text
from minitpo.judges import pointwise_scorer, preference, unjudged
from minitpo.stats import bootstrap_interval, same_winner, two_order_p, verdict

SANITY_SET = Path(__file__).with_name("sanity.jsonl")
KINDS = ("off_topic", "truncated", "refusal", "factual_error")
REFUSALS = ("I'm sorry, but I can't help with that request.", "I don't know.",
            "As an AI language model, I am unable to answer this question.",
            "I would rather not answer that. Please ask someone else.")


@dataclass(frozen=True)
class Item:
    prompt: str
    chosen: str
    rejected: str
    kind: str


def sanity_items(path: Path = SANITY_SET) -> list[Item]:
    """Every row of the sanity set against each of the four kinds of worse response."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    n = len(rows)
    items = []
    for i, row in enumerate(rows):
        other = rows[(i + n // 2) % n]  # the rows come in category blocks: half-way round is another category
        words = row["good"].split()
        cut = " ".join(words[: len(words) // 2]).rstrip(".,;:!?")  # stops mid-sentence, no final stop
        for kind, rejected in zip(KINDS, (other["good"], cut, REFUSALS[i % len(REFUSALS)], row["factual_error"])):
            items.append(Item(row["instruction"], row["good"], rejected, kind))
    return items


def load_preference_set(path: str | Path) -> list[Item]:
    """A user's JSONL of prompt / chosen / rejected (TRL's preference format); optional `kind`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--set: {str(path)!r} {'is a folder' if path.is_dir() else 'does not exist'}; "
                        "give a JSONL file of prompt, chosen, rejected")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts = [_text(row[key]) for key in ("prompt", "chosen", "rejected")]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError):
            raise UserError(f"--set: {path} line {n} is not a JSON object with prompt, chosen and rejected "
                            "(strings or lists of chat messages); fix that line") from None
        items.append(Item(*texts, kind=str(row.get("kind", "all"))))
    if not items:
        raise UserError(f"--set: {path} holds no items; add one JSON object per line")
    return items


def _text(value) -> str:
    """A string, or the content of the last message of a chat-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1]["content"], str):
        return value[-1]["content"]
    raise TypeError(value)


def check_judge(cfg, items: list[Item], progress: bool = True) -> dict:
    """How often the judge prefers `chosen` to `rejected`, overall and per kind; see the module docstring."""
    t0 = time.perf_counter()
    stats, kept = {}, items
    if cfg.type == "llama_cpp" and cfg.mode == "pairwise":
        ps, stats = _pairwise(cfg, items, progress)
        judged = 2 * len(items)
    else:
        texts = list(dict.fromkeys((it.prompt, r) for it in items for r in (it.chosen, it.rejected)))
        results = pointwise_scorer(cfg)(cfg, [p for p, _ in texts], [r for _, r in texts], progress)
        score = {t: None if unjudged(r, cfg) else r["score"] for t, r in zip(texts, results)}  # as the judge stage
        kept = [it for it in items if score[(it.prompt, it.chosen)] is not None and score[(it.prompt, it.rejected)] is not None]
        ps = [preference(score[(it.prompt, it.chosen)], score[(it.prompt, it.rejected)]) for it in kept]
        masses = [r["score_mass"] for r in results if r.get("score_mass") is not None]
        stats["verdict_mass"] = statistics.fmean(masses) if masses else None
        stats["unjudged"] = sum(s is None for s in score.values())  # of `responses` distinct responses
        stats["responses"] = judged = len(texts)
    wall = time.perf_counter() - t0
    kinds = {kind: _accuracy([p for p, it in zip(ps, kept) if it.kind == kind])
             for kind in dict.fromkeys(it.kind for it in items)}
    return {**_accuracy(ps), "kinds": kinds, **stats, "responses_per_s": judged / wall,
            "judge": {"type": cfg.type, "mode": cfg.mode, "model": cfg.model, "function": cfg.function,
                      "min_verdict_mass": cfg.min_verdict_mass}}


def _pairwise(cfg, items, progress):
    from minitpo.judges.pairwise import both_orders

    masses = []
    p = both_orders(cfg, [it.prompt for it in items], [it.chosen for it in items], [it.rejected for it in items],
                    progress, desc="judge-check", masses=masses)
    consistent = [same_winner(p_ab, p_ba) for p_ab, p_ba in p]
    ps = [two_order_p(p_ab, p_ba) for p_ab, p_ba in p]  # as pairwise.compare
    return ps, {"verdict_mass": statistics.fmean(masses), "position_consistency": statistics.fmean(consistent)}


def _accuracy(ps: list[float]) -> dict:
    """n, accuracy and its interval; None for the three without an item (every one unjudged)."""
    if not ps:
        return {"n": 0, "accuracy": None, "ci_low": None, "ci_high": None}
    verdicts = [verdict(p) for p in ps]
    low, high = bootstrap_interval(verdicts)
    return {"n": len(verdicts), "accuracy": statistics.fmean(verdicts), "ci_low": low, "ci_high": high}


def at_chance(result: dict) -> bool:
    """The judge cannot be told from a coin: its interval reaches 0.5, or it judged no item at all."""
    return result["n"] == 0 or result["ci_low"] <= 0.5


def headline(result: dict) -> str:
    """The one line `minitpo run` prints for judge.check."""
    if result["n"] == 0:
        return "judge-check: no item judged"
    return (f"judge-check: accuracy {result['accuracy']:.3f} (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}) "
            f"over {result['n']} items")


def summary_text(result: dict) -> str:
    if result["n"] == 0:
        lines = [f"judge-check: no item judged, {result['responses_per_s']:.1f} responses/s"]
    else:
        lines = [f"judge-check: chosen preferred {result['accuracy']:.3f} ({ci_text(result)}) over {result['n']} items, "
                 f"{result['responses_per_s']:.1f} responses/s"]
    for kind, r in result["kinds"].items():
        if r["n"] == 0:
            lines.append(f"  {kind}: no item judged")
            continue
        lines.append(f"  {kind}: {r['accuracy']:.3f} ({ci_text(r, '')})" + (f", n {r['n']}" if r["n"] >= MIN_CI_ITEMS else ""))
    for key in ("verdict_mass", "position_consistency"):
        if result.get(key) is not None:
            lines.append(f"  {key.replace('_', ' ')}: {result[key]:.3f}")
    if result.get("unjudged"):
        lines.append(f"  unjudged: {result['unjudged']} of {result['responses']} responses (verdict mass under "
                     f"judge.min_verdict_mass {result['judge']['min_verdict_mass']}), their items left out")
    if at_chance(result):
        lines.append(warning(result))
    if result.get("position_consistency") is not None and result["position_consistency"] < 0.5:
        lines.append(f"warning: the pairwise judge picks the same winner in both orders only "
                     f"{result['position_consistency']:.2f} of the time: it judges by position, not by content")
    return "\n".join(lines)


def warning(result: dict) -> str:
    if result["n"] == 0:
        return ("warning: the judge put under judge.min_verdict_mass of its probability on a verdict for every "
                "response, so a run would pair nothing: pick a stronger judge or lower judge.min_verdict_mass")
    return (f"warning: the judge cannot be told from chance (accuracy {result['accuracy']:.2f}, 95% CI reaches "
            f"{result['ci_low']:.2f}); a run would optimize noise: pick a stronger judge")
