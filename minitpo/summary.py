"""The iteration summary: what `iter-N/summary.json` and each line of `metrics.jsonl` hold.

loop.py writes it (`summarize`, `write_summary`) when an iteration finishes; report.py reads it
(`read_metrics`); tests/test_summary.py checks that every key the report draws or tabulates is one
this module writes. Consumes an iteration's stage files as plain rows; produces a flat dict of numbers.
"""

import statistics
from pathlib import Path

from minitpo import io, rundir
from minitpo.errors import UserError
from minitpo.sample import thinks, wrote_marker
from minitpo.verifiable import pass_counts


def write_summary(out: Path, t: int, summary: dict) -> None:
    """iter-t/summary.json (marks the iteration finished), then metrics.jsonl with every finished one."""
    io.write_json(rundir.iteration_dir(out, t) / rundir.SUMMARY, summary)
    io.write_jsonl(Path(out) / rundir.METRICS,
                   [io.read_json(rundir.iteration_dir(out, s) / rundir.SUMMARY) for s in rundir.finished_iterations(out)])


def check_summaries(out: Path) -> None:
    """Read every finished iteration's summary.json, so that one that does not parse stops a resumed run
    at its start, named, rather than after the next iteration; rewrite metrics.jsonl from them when it
    is missing, cut or behind."""
    rows = [io.read_json(rundir.iteration_dir(out, t) / rundir.SUMMARY) for t in rundir.finished_iterations(out)]
    try:
        current = io.read_jsonl(Path(out) / rundir.METRICS, missing_ok=True)
    except UserError:
        current = None  # recomputed just below, from the summaries
    if rows and current != rows:
        io.write_jsonl(Path(out) / rundir.METRICS, rows)


def read_metrics(out: Path) -> list[dict]:
    """The finished iterations' summaries, in order (none when metrics.jsonl is missing)."""
    rows = io.read_jsonl(Path(out) / rundir.METRICS, missing_ok=True,
                         fix="delete it and run `minitpo run` on this run directory again: it rebuilds it")
    for t, row in enumerate(rows, start=1):
        row.setdefault("iteration", t)
    return rows


def summarize(t, candidates, scores, pair_rows, log_rows, train_summary, judge_stats, times,
              marker: str | None = None) -> dict:
    """The iteration's numbers from its stages' files (candidates, scores, pairs, the train log and
    summary, the judge's stats, the stage times). None where there is nothing to average."""
    parsed = [c for c in candidates if c.parsed]
    met, total = map(sum, zip(*(pass_counts(c.instruction, c.response) for c in parsed))) if parsed else (0, 0)
    by_key = {(c.instruction_id, c.index): c for c in candidates}
    raw = {(s["instruction_id"], s["index"]): s["score"] for s in scores}
    trained = [r for r in pair_rows if not r["skipped"]]
    last_epoch = [r for r in log_rows if r["epoch"] == (train_summary.get("epochs") or [{}])[-1].get("epoch")]

    def mean(xs):
        xs = list(xs)
        return round(statistics.fmean(xs), 4) if xs else None

    return {
        "iteration": t,
        "instructions": len({c.instruction_id for c in candidates}),
        "candidates": len(candidates),
        "parse_rate": mean(c.parsed for c in candidates),
        "truncated_rate": mean(c.truncated for c in candidates),
        # sampling.force_marker: how often the model wrote the marker itself, and how often it was appended
        "marker_rate": mean(wrote_marker(c, marker) for c in candidates) if marker else None,
        # ... with a thought of a sentence or more and a response after it (sample.thinks)
        "thought_rate": mean(thinks(c, marker) for c in candidates) if marker else None,
        "forced_rate": mean(c.forced for c in candidates),
        # verifiable instructions (minitpo/verifiable.py): the share of their constraints met, strictly
        "constraint_pass_rate": round(met / total, 4) if total else None,
        "judge_score": mean(s["score"] for s in scores),
        "thought_chars": mean(len(c.thought) for c in parsed),
        "response_chars": mean(len(c.response) for c in parsed),
        "rho": scores[0]["rho"] if scores else None,
        "pairs": len(pair_rows),
        "pairs_trained": len(trained),
        "pairs_skipped_too_long": len(pair_rows) - len(trained),
        "pairs_prompt_truncated": sum(r["prompt_truncated"] for r in pair_rows),
        "rejected_parse_failures": sum(not r["rejected_parsed"] for r in pair_rows),
        "chosen_score": mean(raw[(r["instruction_id"], r["chosen_index"])] for r in pair_rows),
        "rejected_score": mean(raw[(r["instruction_id"], r["rejected_index"])] for r in pair_rows if r["rejected_parsed"]),
        # over pairs whose rejected side parsed (a failure has no response): what rho: auto compares
        "chosen_response_chars": mean(len(by_key[(r["instruction_id"], r["chosen_index"])].response)
                                      for r in pair_rows if r["rejected_parsed"]),
        "rejected_response_chars": mean(len(by_key[(r["instruction_id"], r["rejected_index"])].response)
                                        for r in pair_rows if r["rejected_parsed"]),
        "train_loss": mean(r["loss"] for r in last_epoch),
        "reward_accuracy": mean(r["reward_accuracy"] for r in last_epoch),
        "reward_margin": mean(r["margin"] for r in last_epoch),
        "best_epoch": train_summary.get("best_epoch"),
        "position_consistency": judge_stats.get("position_consistency"),
        "judge_verdict_mass": judge_stats.get("verdict_mass"),
        # parsed responses left out of pairs: the judge put under judge.min_verdict_mass on its verdict
        "judge_unjudged": judge_stats.get("unjudged"),
        # judge prompts over judge.n_ctx, whose response was cut to fit (pairwise: pairs of responses)
        "judge_prompts_cut": judge_stats.get("responses_cut", judge_stats.get("pairs_cut")),
        "stage_wall_s": times,
        # pairs set aside by train.val_fraction to pick the best epoch: not trained on
        "pairs_val": train_summary.get("n_val_pairs", 0),
        "updates": train_summary.get("updates"),
        # what made the iteration train on little or nothing (the console and the report show them)
        "warnings": judge_warnings(judge_stats, len(parsed)) + training_warnings(len(pair_rows), len(trained), train_summary),
    }


def judge_warnings(judge_stats: dict, n_parsed: int) -> list[str]:
    """Responses the judge left unjudged (under judge.min_verdict_mass); [] when it judged them all."""
    n = judge_stats.get("unjudged") or 0
    if not n:
        return []
    return [f"the judge put under judge.min_verdict_mass of its probability on a verdict for {n} of {n_parsed} "
            "parsed responses, which were left out of pairs; use a judge that follows the rating format, or "
            "lower judge.min_verdict_mass (judge_verdict_mass in the summary is its mean)"]


def training_warnings(pairs: int, trained: int, train_summary: dict) -> list[str]:
    """Why the iteration trained on nothing or on few of its pairs; [] when it trained normally."""
    if pairs == 0:
        return ["no pairs: no instruction had a better and a worse candidate (every output the same, a judge "
                "that ties, or every output a format failure), so nothing was trained"]
    if trained == 0:
        return [f"all {pairs} pairs are longer than train.max_length and were skipped, so nothing was trained; "
                "raise train.max_length"]
    found = []
    if trained < pairs / 2:
        found.append(f"{pairs - trained} of {pairs} pairs are longer than train.max_length and were skipped; "
                     "raise train.max_length")
    n_val, n_train = train_summary.get("n_val_pairs", 0), train_summary.get("n_train_pairs", trained)
    if n_val > n_train:
        found.append(f"train.val_fraction set {n_val} of {n_val + n_train} pairs aside to pick an epoch and "
                     f"{n_train} were trained on; lower train.val_fraction")
    if train_summary.get("updates") == 0:
        found.append("no optimizer update ran, so nothing was trained")
    return found


def summary_line(s: dict) -> str:
    """The iteration's line on the console."""
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    return (f"iter {s['iteration']}: parse {f(s['parse_rate'], '.2f')} | marker {f(s.get('marker_rate'), '.2f')} "
            f"| score {f(s['judge_score'], '.2f')} | "
            f"pairs {s['pairs_trained'] - s.get('pairs_val', 0)}/{s['instructions']}"
            f"{' (+%d val)' % s['pairs_val'] if s.get('pairs_val') else ''} | thought {f(s['thought_chars'], '.0f')} "
            f"resp {f(s['response_chars'], '.0f')} chars | loss {f(s['train_loss'], '.3f')} "
            f"acc {f(s['reward_accuracy'], '.2f')} | {sum(v for v in s['stage_wall_s'].values() if v):.1f} s")
