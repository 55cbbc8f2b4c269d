"""Evaluation: the win rate of one model of a run against another on the held-out instructions.

Consumes a run directory: `recipe.yaml` (policy, thought template, sampling settings, judge),
`held_out.jsonl` (instructions never trained on) and `iter-N/adapter/` for each model named "iter-N";
"seed" is the base model with no adapter (a fresh LoRA has B = 0, so it equals the base).
Produces `eval/{model}-vs-{against}.json` (the win rate with a 95% bootstrap interval, the mean judge
probability, parse rates and response lengths, all per category too; `minitpo report` plots it) and
`eval/{model}-vs-{against}.jsonl` (one row per instruction: both responses and the judge's p).

As at inference (docs/method.md), the judge sees responses only, never thoughts. Each model writes ONE output
per instruction, sampled with the recipe's temperature and top-p, from the same seed. A GGUF judge
compares the two responses pairwise (minitpo/judges/pairwise.py), reading both orders to cancel position
bias, and returns p = P(model's response is better); a pointwise judge (python, reward_model) scores
each response, and p is 1 when the model's scores higher, 0.5 on a tie, 0 below. An output that
breaks the thought format (or hits max_new_tokens) has no response to show a user, so it loses to a
parsed one without a judge call; two failures tie, and so do two identical responses.
"""

import statistics
from pathlib import Path

from minitpo import io, rundir
from minitpo.config import Recipe
from minitpo.recipe import load_recipe
from minitpo.data import Instruction
from minitpo.device import free_memory
from minitpo.errors import UserError
from minitpo.judges import compare
from minitpo.prompts import load_template
from minitpo.sample import thinks, wrote_marker
from minitpo.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, bootstrap_interval, length_controlled_rate,
                           verdict)

MIN_CI_ITEMS = 10  # an interval over fewer items means nothing (one item: "1.000-1.000"), and says so


# ---------------------------------------------------------------- the arithmetic (pure functions)

def ci_text(r: dict, label: str = "95% CI ") -> str:
    """The interval of a result with n, ci_low and ci_high, flagged when it rests on too few items."""
    text = f"{label}{r['ci_low']:.3f}-{r['ci_high']:.3f}"
    return text if r["n"] >= MIN_CI_ITEMS else f"{text}, n {r['n']}: too few items for an interval"


def held_out_warning(held_out: int) -> str | None:
    """What `evaluate: true` over `held_out` instructions can show, when that is too little to tell models
    apart: the half-width of a 95% interval around a win rate of 0.5 (normal approximation)."""
    if held_out >= 32:
        return None
    return (f"evaluate: data.held_out {held_out} gives a win rate whose 95% interval is about "
            f"+-{1.96 * 0.5 / held_out ** 0.5:.2f} wide; 32 or more held-out instructions tell two models apart")


def win_rate_summary(ps, groups=None) -> dict:
    """n, win_rate, its interval and the mean p, from each output pair's p = P(model better). With
    `groups` (the instruction of each p, when an instruction has several samples), n counts
    instructions, each instruction's verdicts are averaged first and the bootstrap resamples
    instructions, not samples: samples of one instruction are not independent evidence."""
    verdicts = [verdict(p) for p in ps]
    if groups is not None:
        by: dict = {}
        for g, v in zip(groups, verdicts):
            by.setdefault(g, []).append(v)
        verdicts = [statistics.fmean(vs) for vs in by.values()]
    low, high = bootstrap_interval(verdicts)
    return {"n": len(verdicts), "win_rate": statistics.fmean(verdicts), "ci_low": low, "ci_high": high,
            "mean_p": statistics.fmean(ps)}


def length_controlled(rows: list[dict], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = CI_LEVEL) -> dict | None:
    """The length-controlled win rate (stats.length_controlled_rate) of evaluation rows, over the rows
    where both responses parsed (a format failure has no length to compare); None below 2 of them. The
    interval bootstraps the instructions (with all of their samples), as for the raw rate."""
    both = [r for r in rows if r["model_parsed"] and r["against_parsed"]]
    if len(both) < 2:
        return None
    diff = [len(r["model_response"]) - len(r["against_response"]) for r in both]  # characters
    groups = [r["instruction_id"] for r in both]
    rate, low, high = length_controlled_rate(diff, [verdict(r["p"]) for r in both], groups, resamples, seed, level)
    return {"n": len(set(groups)), "win_rate": rate, "ci_low": low, "ci_high": high}


def aggregate(rows: list[dict], model: str, against: str) -> dict:
    """The result of an evaluation from its per-instruction rows (see `evaluate` for their keys)."""
    def side(key_rows, who):
        parsed = [r for r in key_rows if r[f"{who}_parsed"]]
        return (statistics.fmean(r[f"{who}_parsed"] for r in key_rows),
                statistics.fmean(len(r[f"{who}_response"]) for r in parsed) if parsed else None)

    def wins(key_rows):
        return win_rate_summary([r["p"] for r in key_rows], [r["instruction_id"] for r in key_rows])

    def rate(who, key):  # None for a direct model, and for rows written before the key existed
        flags = [r[f"{who}_{key}"] for r in rows if r.get(f"{who}_{key}") is not None]
        return statistics.fmean(flags) if flags else None

    (model_parse, model_chars), (against_parse, against_chars) = side(rows, "model"), side(rows, "against")
    categories = {}
    for cat in sorted({r["category"] for r in rows}):
        in_cat = [r for r in rows if r["category"] == cat]
        categories[cat or "uncategorized"] = {**wins(in_cat), "length_controlled": length_controlled(in_cat)}
    return {
        "model": model, "against": against, **wins(rows),
        "samples": len(rows) // len({r["instruction_id"] for r in rows}),  # per instruction and model
        "length_controlled": length_controlled(rows),
        "ties": sum(r["p"] == 0.5 for r in rows),
        "judged": sum(r["judged"] for r in rows),  # the rest: format failures and identical responses
        "parse_rate": {model: model_parse, against: against_parse},
        "response_chars": {model: model_chars, against: against_chars},  # mean over parsed responses
        # the marker written by the model itself (not appended by sampling.force_marker), and that with
        # a thought of THOUGHT_MIN_WORDS or more before it and a response after it
        "marker_rate": {model: rate("model", "marker"), against: rate("against", "marker")},
        "thought_rate": {model: rate("model", "thinks"), against: rate("against", "thinks")},
        "categories": categories,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": CI_LEVEL},
    }


# ---------------------------------------------------------------- the run directory

def evaluate(run_dir: str | Path, model: str | None = None, against: str = "seed", samples: int = 1) -> dict:
    """Sample, judge and score `model` (default: the last finished iteration) against `against` (seed,
    iter-N, or another run's iteration folder); write RUN_DIR/eval/{model}-vs-{against}.json and .jsonl
    (another run's model is labelled RUNNAME-iter-N); return the result. The judge is this run's.
    `samples` outputs per instruction and model: the j-th of one model meets the j-th of the other."""
    run_dir = Path(run_dir)
    recipe = _read_recipe(run_dir)
    judge = recipe.judge  # this run's judge decides; the other run's (with --against OTHER/iter-N) is not used
    if judge.type == "llama_cpp" and not Path(judge.model).is_file():
        raise UserError(f"judge.model: {judge.model!r} does not exist; put the GGUF judge back or fix recipe.yaml")
    instructions = _held_out(run_dir)
    refs = [_model_ref(run_dir, recipe, instructions, name, flag)
            for name, flag in ((model or _last_iteration(run_dir), "--model"), (against, "--against"))]
    (model, *_), (against, *_) = refs
    if model == against:
        raise UserError(f"--model and --against are both {model!r}; compare two different models")
    io.check_writable(run_dir / rundir.EVAL, "RUN_DIR")  # before the minutes of sampling and judging

    marker_of = [load_template(r.thought).marker for *_, r in refs]
    # One policy in memory at a time: sample, then free it before the next model (and the judge) load.
    # Each model samples with its own run's recipe: its template, sampling settings and seed.
    ours, theirs = (_sample_one(ref_recipe, ref_dir, name, instructions, samples) for _, ref_dir, name, ref_recipe in refs)

    # The judge only sees pairs of two different parsed responses. A format failure decides the rest,
    # and identical responses (common at low temperature or early on: both sample from the same seed)
    # tie exactly, where the judge's two orders would give 0.5 only up to rounding.
    both = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a.parsed and b.parsed and a.response != b.response]
    judged = compare(recipe.judge, [ours[i].instruction for i in both],
                     [ours[i].response for i in both], [theirs[i].response for i in both]) if both else []
    ps = {i: float(p) for i, p in zip(both, judged)}
    category = {ins.id: ins.category for ins in instructions}
    rows = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        p = ps[i] if i in ps else 0.5 if a.parsed == b.parsed else float(a.parsed)
        rows.append({"instruction_id": a.instruction_id, "sample": a.index, "instruction": a.instruction,
                     "category": category[a.instruction_id], "model_response": a.response,
                     "against_response": b.response, "model_parsed": a.parsed, "against_parsed": b.parsed,
                     # None for a model whose template has no thought (direct)
                     "model_marker": marker_of[0] and wrote_marker(a, marker_of[0]),
                     "against_marker": marker_of[1] and wrote_marker(b, marker_of[1]),
                     "model_thinks": marker_of[0] and thinks(a, marker_of[0]),
                     "against_thinks": marker_of[1] and thinks(b, marker_of[1]),
                     "judged": i in ps, "p": p})

    result = aggregate(rows, model, against)
    io.write_jsonl(rundir.eval_path(run_dir, model, against, ".jsonl"), rows)
    io.write_json(rundir.eval_path(run_dir, model, against), result)
    return result


def summary_text(r: dict) -> str:
    """A few lines for the terminal."""
    m, a = r["model"], r["against"]

    def chars(x):
        return "-" if x is None else f"{x:.0f}"
    lines = [
        f"{m} vs {a}: win rate {r['win_rate']:.3f} ({ci_text(r)}) "
        f"over {r['n']} instructions" + (f" x {r['samples']} samples" if r.get("samples", 1) > 1 else "")
        + f", mean p {r['mean_p']:.3f}, ties {r['ties']}",
        f"  parse rate {m} {r['parse_rate'][m]:.2f} / {a} {r['parse_rate'][a]:.2f} | "
        f"response chars {m} {chars(r['response_chars'][m])} / {a} {chars(r['response_chars'][a])}",
    ]
    def rate(x):
        return "-" if x is None else f"{x:.2f}"
    marker, thought = r.get("marker_rate", {}), r.get("thought_rate", {})
    if marker.get(m) is not None or marker.get(a) is not None:
        lines.append(f"  marker written by the model {m} {rate(marker.get(m))} / {a} {rate(marker.get(a))} | "
                     f"with a thought and a response {m} {rate(thought.get(m))} / {a} {rate(thought.get(a))}")
    lc = r.get("length_controlled")
    if lc:
        lines.insert(1, f"  length-controlled win rate {lc['win_rate']:.3f} ({ci_text(lc)}) over the {lc['n']} "
                        "instructions where both responses parsed")
    for cat, c in r["categories"].items():
        lines.append(f"  {cat}: {c['win_rate']:.3f} ({ci_text(c, '')})" + (f", n {c['n']}" if c["n"] >= MIN_CI_ITEMS else ""))
    return "\n".join(lines)


def _sample_one(recipe: Recipe, run_dir: Path, name: str, instructions, samples: int = 1):
    """`samples` outputs per instruction from model `name` of `run_dir`, with the recipe's template,
    sampling and seed."""
    from minitpo.model import load_policy
    from minitpo.sample import sample_candidates

    template = load_template(recipe.thought)
    adapter = None if name == "seed" else rundir.adapter_dir(run_dir, name)
    policy, tokenizer = load_policy(recipe.policy, adapter)
    policy.eval()
    candidates = sample_candidates(policy, tokenizer, instructions, template, recipe.sampling, k=samples,
                                   seed=recipe.sampling.seed, system_prompt=recipe.thought.system_prompt)
    del policy
    free_memory()
    return candidates


def _read_recipe(run_dir: Path) -> Recipe:
    if not (run_dir / rundir.RECIPE).is_file():
        what = "does not exist" if not run_dir.exists() else "holds no recipe.yaml"
        raise UserError(f"RUN_DIR: {str(run_dir)!r} {what}; give a run directory written by `minitpo run`")
    return load_recipe(run_dir / rundir.RECIPE, check_files=False)  # the run wrote absolute paths


def _held_out(run_dir: Path) -> list[Instruction]:
    instructions = rundir.read_held_out(run_dir)
    if not instructions:
        raise UserError(f"{run_dir / rundir.HELD_OUT}: no held-out instructions; set data.held_out (e.g. 100) in the "
                        "recipe and start a new run with it")
    return instructions


def _last_iteration(run_dir: Path) -> str:
    done = rundir.finished_iterations(run_dir)
    if not done:
        raise UserError(f"RUN_DIR: {str(run_dir)!r} has no finished iteration; run `minitpo run` until one finishes")
    return rundir.iteration_name(done[-1])


def _model_ref(run_dir: Path, recipe: Recipe, instructions, name: str, flag: str):
    """(label, its run directory, "seed" or "iter-N", its run's recipe) for a model named on the command
    line: seed, iter-N of this run, or the iteration folder of another run (e.g. ../demo-direct/iter-2),
    which must have been held out the same instructions: a model trained on them would be tested on its
    training data."""
    if name == "seed" or rundir.iteration_number(name):
        _check_model(run_dir, name, flag)
        return name, run_dir, name, recipe
    folder = Path(name) if Path(name).is_dir() else run_dir / name
    if not folder.is_dir() or not rundir.iteration_number(folder.name):
        raise UserError(f"{flag}: {name!r} is neither seed, iter-N, nor an iteration folder of a run "
                        "(RUN_DIR/iter-N); name one of those")
    other_dir, other = folder.resolve().parent, folder.name
    other_recipe = _read_recipe(other_dir)
    _check_model(other_dir, other, flag)
    theirs = {r.text for r in _held_out(other_dir)}
    if theirs != {i.text for i in instructions}:
        raise UserError(f"{flag}: {name!r} comes from a run with other held-out instructions than {str(run_dir)!r} "
                        "(its model may have trained on these); compare runs of the same data, data.seed and "
                        "data.held_out")
    return f"{other_dir.name}-{other}", other_dir, other, other_recipe


def _check_model(run_dir: Path, name: str, flag: str) -> None:
    if name == "seed":
        return
    if not rundir.has_adapter(rundir.adapter_dir(run_dir, name)):
        done = ", ".join(map(rundir.iteration_name, rundir.finished_iterations(run_dir))) or "none yet"
        raise UserError(f"{flag}: {name!r} has no trained adapter in {run_dir}; finished iterations: {done}")
