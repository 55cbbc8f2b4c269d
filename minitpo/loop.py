"""The TPO loop: for each iteration, sample -> judge -> pair -> train -> save (docs/method.md steps 1-8).

This is the one place where the whole algorithm is visible. Each stage reads the previous stage's
files in `iter-N/` and writes its own, atomically; a stage whose output exists is skipped, so a
killed run resumes from the last finished stage (minitpo/stages.py: how a stage runs, resumes and
writes). The run directory is the source of truth (minitpo/rundir.py names every file):

  recipe.yaml          the resolved recipe          held_out.jsonl   instructions kept for eval
  split.json           each iteration's instructions, fixed when the run starts (never reshuffled)
  metrics.jsonl        one line per iteration
  iter-N/candidates.jsonl  sample   K outputs per instruction, split into thought and response
  iter-N/scores.jsonl      judge    raw judge score, response length, length-controlled score
  iter-N/judge_cache.jsonl judge    every judgement so far (a killed judge stage resumes from it)
  iter-N/pairs.jsonl       pair     chosen/rejected with the reference log-probs of M_{N-1}
  iter-N/adapter/          train    the LoRA adapter of M_N (peft format)
  iter-N/train_log.jsonl   train    one line per optimizer update
  iter-N/train_summary.json train   epochs, best epoch (written last: marks training done)
  iter-N/summary.json      the iteration's numbers (written last: marks the iteration done)
  logs/                    live metrics per update and per iteration (log.to: minitpo/live.py)

Under torchrun (minitpo/dist.py) every rank runs this same code: each samples, judges and scores
reference log-probs for its share, rank 0 writes every file above from the gathered results (so the
directory is a one-process run's), and training sums the gradients over the ranks (minitpo/train.py).
Whether a stage is done is rank 0's reading of the same files, told to every rank.
"""

import dataclasses
import gc
from contextlib import ExitStack
from pathlib import Path

import click

from minitpo import dist, io, rundir, suites
from minitpo.config import Recipe
from minitpo.recipe import recipe_to_dict
from minitpo.evaluate import held_out_warning
from minitpo.data import Instruction, read_instructions, split_instructions
from minitpo.judges.llama import load_prompt_template
from minitpo.live import Live
from minitpo.device import free_memory, pick_device
from minitpo.model import context_length, enable_checkpointing, load_policy, load_tokenizer, save_adapter
from minitpo.pairs import Pair, auto_rho, build_pairs, by_instruction, control_length, judged
from minitpo.prompts import load_template
from minitpo.sample import Candidate, check_prompt_lengths, eos_token_ids, open_sampler, sample_candidates
from minitpo.judges import merge_caches, merge_stats, rank_cache, score_candidates
from minitpo.stages import JUDGE, PAIR, SAMPLE, TRAIN, Stages
from minitpo.summary import check_summaries, summarize, summary_line, write_summary
from minitpo.train import reference_logps, tokenize_pairs, train_adapter


def run(recipe: Recipe, fresh: bool = False) -> Path:
    """Run (or resume) every iteration of `recipe` in `recipe.out`; return the run directory."""
    dist.init()
    out = Path(recipe.out)
    template = load_template(recipe.thought)
    data = recipe.data
    items, notes = read_instructions(data)  # fails on a bad file, dataset, split or column
    for note in notes if dist.is_main() else ():
        click.echo(note, err=True)
    kept = None if fresh else rundir.kept_split(out)  # a run keeps its split, whatever the file became
    held_out, slices = split_instructions(items, data.per_iteration, data.held_out, recipe.iterations, data.seed,
                                          kept=kept)  # fails on a short file before anything is written
    longest = _check_lengths(recipe, out, template, held_out, slices[:recipe.iterations], fresh)
    with ExitStack() as held:
        def setup():
            held.enter_context(rundir.lock(out))  # one writer: a second run on this directory stops here
            rundir.check_out(out, fresh)  # --fresh deletes, and a run writes into, only minitpo's folders
            if fresh:
                rundir.clear(out)
            rundir.remove_stale_temps(out)  # left by a killed run's unfinished writes
            for key in rundir.claim(out, recipe_to_dict(recipe)):  # a setting fixed before its stage ran
                click.echo(f"recipe: {key} changed; no iteration has run the stage that reads it, so the run "
                           "goes on with the new value", err=True)
            check_summaries(out)  # a finished iteration's summary that does not parse stops the run here
            if recipe.judge.type == "llama_cpp" and recipe.judge.mode == "pointwise" and not (out / rundir.JUDGE_PROMPT).exists():
                io.write_text(out / rundir.JUDGE_PROMPT, load_prompt_template(recipe.judge.prompt))  # what the judge saw
            if kept is None or len(slices) > len(kept[1]) or not (out / rundir.SPLIT).exists():
                rundir.write_split(out, held_out, slices)  # fixed before the first instruction is sampled
            overlap = suites.benchmark_overlap(ins.text for part in slices for ins in part)
            if overlap:  # a benchmark prompt must never be trained on: its bench score would be meaningless
                click.echo(suites.overlap_warning(overlap), err=True)
            if recipe.judge.check:  # is the judge worth the hours? once per run directory, before sampling
                _judge_check(out, recipe)
            if recipe.evaluate and (warning := held_out_warning(recipe.data.held_out)):  # before the hours, too
                click.echo(f"warning: {warning}", err=True)
        dist.on_main(setup)  # rank 0 alone holds the lock and writes; a refusal stops every rank
        predicted = _plan(recipe, longest)  # printed before any model loads; stages.json keeps its peaks
        live = held.enter_context(Live(recipe.log.to, out, recipe_to_dict(recipe), main=dist.is_main()))

        policy = Policy(recipe, out)
        for t, instructions in enumerate(slices[:recipe.iterations], start=1):
            it = rundir.iteration_dir(out, t)
            if dist.broadcast((it / rundir.SUMMARY).exists()):
                continue
            summary = run_iteration(t, it, instructions, template, recipe, policy, live, predicted)
            if dist.is_main():
                live.iteration(t, summary)
                write_summary(out, t, summary)
                click.echo(summary_line(summary))
                for warning in summary["warnings"]:  # an iteration that trained on nothing says so
                    click.echo(f"warning: iter {t}: {warning}", err=True)
            dist.barrier()

        if not dist.is_main():
            dist.close()
            return out
        click.echo(f"iterations done: {out}")
        if recipe.evaluate:  # the last iteration against the seed, once: a rerun reads the saved result
            from minitpo.evaluate import evaluate, summary_text

            del policy
            saved = rundir.eval_path(out, rundir.iteration_name(recipe.iterations), "seed")
            click.echo(summary_text(io.read_json(saved) if saved.exists() else evaluate(out)))
    dist.close()
    return out


def _check_lengths(recipe: Recipe, out: Path, template, held_out, slices, fresh: bool) -> int | None:
    """The instructions still to sample, and the held-out ones (`eval` samples them), must fit the
    policy's context: checked with its tokenizer and config alone, before any model loads. Returns the
    longest prompt's tokens (None when nothing is left to sample)."""
    pending = [i for t, s in enumerate(slices, start=1)
               if fresh or not (rundir.iteration_dir(out, t) / rundir.CANDIDATES).exists() for i in s]
    pending += held_out if pending else []  # a finished run is not held up by them
    if pending:
        return check_prompt_lengths(load_tokenizer(recipe.policy.model), context_length(recipe.policy.model), pending,
                                    template, recipe.sampling, recipe.thought.system_prompt)


def _plan(recipe: Recipe, longest: int | None) -> dict:
    """The plan's predicted peak of each stage (minitpo/plan.py), printed by rank 0 as one block; {} with
    a one-line note when it cannot be made (it advises, it never stops a run), and {} without a word when
    nothing is left to sample (`longest` None: a finished run, or one resumed after its last sampling)."""
    from minitpo.errors import UserError
    from minitpo.plan import detected_gpu_memory, plan_recipe, plan_text, stage_peaks

    if longest is None:
        return {}

    device = pick_device()
    try:
        plan = plan_recipe(recipe, detected_gpu_memory(), device, prompt_tokens=longest)
    except (UserError, OSError, ValueError, KeyError) as e:
        if dist.is_main():
            click.echo(f"plan: not made ({str(e).splitlines()[0][:120]})", err=True)
        return {}
    if dist.is_main():
        click.echo(plan_text(plan, Path(recipe.out).name), err=True)
    return stage_peaks(plan)


def _judge_check(out: Path, recipe: Recipe) -> None:
    from minitpo.judges.check import at_chance, check_judge, headline, sanity_items, warning

    path = out / rundir.JUDGE_CHECK
    if not path.exists():
        io.write_json(path, check_judge(recipe.judge, sanity_items()))
    checked = io.read_json(path)
    click.echo(headline(checked))
    if at_chance(checked):
        click.echo(warning(checked), err=True)


def run_iteration(t: int, it: Path, instructions: list[Instruction], template, recipe: Recipe, policy,
                  live: Live, predicted: dict | None = None) -> dict:
    """M_{t-1} -> M_t; the iteration's summary (on rank 0). Each stage runs unless its file in `it` says it
    is done (minitpo/stages.py), and the next reads that file back: a resumed run goes on from the same data."""
    stages = Stages(it, predicted)  # predicted: {stage: GiB}, recorded beside the measured peaks
    # 1-3. K thought+response candidates per instruction from M_{t-1}, split at the marker.
    # the sampler's model copy, KV cache and CUDA graphs are freed as sample_stage returns, before the judge loads
    rows = stages.run(SAMPLE, lambda: sample_stage(*policy.at(t - 1), instructions, template, recipe, seed=recipe.sampling.seed + t,
                                                   on_slots=lambda slots: stages.record("sampling_slots", slots)))
    candidates = [Candidate(**row) for row in rows]

    # 4. The judge scores responses only (never thoughts); 5. length control normalises them per instruction.
    policy.free_cache()  # the policy's cached blocks go too: a GGUF judge or reward model may share the GPU
    scores = stages.run(JUDGE, lambda: judge_stage(candidates, recipe.judge, it / rundir.JUDGE_CACHE))
    raw = {(s["instruction_id"], s["index"]): s["score"] for s in scores}
    final = {(s["instruction_id"], s["index"]): s["final"] for s in scores}

    # 6. Best vs worst become pairs; their reference log-probs come from M_{t-1}, before training changes it.
    pairs = build_pairs(judged(candidates, raw), raw, final, recipe.judge.min_chosen)  # an unjudged response is in no pair
    pair_rows = stages.run(PAIR, lambda: reference_stage(*policy.at(t - 1), pairs, recipe.train, policy))

    # 7. DPO on this iteration's pairs only: M_{t-1} -> M_t. 8. Save: train_stage writes the adapter of M_t.
    stages.run(TRAIN, lambda: train_stage(*policy.at(t - 1), pair_rows, recipe.train, policy, t,
                                          on_update=lambda row: live.update(t, row)))  # the live curves, now

    if not dist.is_main():
        return {}
    return summarize(t, candidates, scores, pair_rows, io.read_jsonl(it / rundir.TRAIN_LOG),
                     io.read_json(it / rundir.TRAIN_SUMMARY), io.read_json(it / rundir.JUDGE_STATS), stages.wall_times(),
                     marker=template.marker)


# The stages. Each takes plain data, does this rank's share under torchrun (minitpo/dist.py) and returns, on
# rank 0, its files as {name in iter-N/: rows} for Stages.run to write (None on the other ranks).

def sample_stage(model, tokenizer, instructions: list[Instruction], template, recipe: Recipe, seed: int,
                 on_slots=None) -> dict | None:
    """K candidates per instruction, in the instructions' order. on_slots(list) is told the fast sampler's
    slots per pass: what batch_size auto chose from the free memory, known only now."""
    mine = dist.shard(instructions)
    with open_sampler(model, tokenizer, recipe.sampling) as sampler:
        candidates = sample_candidates(model, tokenizer, mine, template, recipe.sampling, seed=seed,
                                       system_prompt=recipe.thought.system_prompt, sampler=sampler,
                                       progress=dist.is_main())
    if on_slots is not None and getattr(sampler, "slots_built", None):
        on_slots(sampler.slots_built)
    k = recipe.sampling.k
    groups = dist.gather([candidates[i * k:(i + 1) * k] for i in range(len(mine))])  # per instruction
    return {rundir.CANDIDATES: [dataclasses.asdict(c) for g in groups for c in g]} if dist.is_main() else None


def judge_stage(candidates: list[Candidate], cfg, cache_path: Path) -> dict | None:
    """The judge's raw score of each parsed response, its length-controlled score and the judge's stats;
    an unjudged response (judge.min_verdict_mass) has no row. A rank judges whole instructions: the
    pairwise judge needs the group."""
    parsed = [c for c in candidates if c.parsed]
    mine = [c for group in dist.shard(by_instruction(parsed)) for c in group]
    mine_scores, mine_stats = score_candidates(cfg, mine, rank_cache(cache_path, dist.rank()), progress=dist.is_main())
    scored = dist.gather([list(zip(mine, mine_scores))])
    stats = merge_stats(dist.gather([mine_stats]))
    if not dist.is_main():
        return None
    raw = {(c.instruction_id, c.index): s for part in scored for c, s in part if s is not None}
    candidates = judged(candidates, raw)
    rho = auto_rho(candidates, raw, cfg.min_chosen) if cfg.rho == "auto" else cfg.rho
    final = control_length(candidates, raw, rho)
    return {cache_path.name: merge_caches, rundir.JUDGE_STATS: stats, rundir.SCORES: [
        {"instruction_id": c.instruction_id, "index": c.index, "score": raw[(c.instruction_id, c.index)],
         "response_length": len(c.response), "rho": rho, "final": final[(c.instruction_id, c.index)]}
        for c in candidates if c.parsed]}


def reference_stage(model, tokenizer, pairs: list[Pair], cfg, policy) -> dict | None:
    """Each pair with the reference log-probs of its two sides under `model` (M_{t-1}); a pair too long
    for train.max_length is kept as skipped."""
    examples, truncated = tokenize_pairs(tokenizer, pairs, cfg.max_length, policy.eos_id)
    kept = [e for e in examples if e is not None]
    refs = dist.gather(reference_logps(model, dist.shard(kept), tokenizer.pad_token_id, cfg, policy.device))
    if not dist.is_main():
        return None
    refs = iter(refs)
    rows = []
    for p, e, cut in zip(pairs, examples, truncated):
        ref = next(refs) if e is not None else (None, None)
        rows.append({**dataclasses.asdict(p), "skipped": e is None, "prompt_truncated": cut,
                     "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]})
    return {rundir.PAIRS: rows}


def train_stage(model, tokenizer, pair_rows: list[dict], cfg, policy, t: int, on_update=None) -> dict | None:
    """DPO on the pairs not skipped, from their stored reference log-probs; the adapter of M_t, the
    per-update log (each row also to on_update(row) as it comes) and the training summary."""
    rows = [r for r in pair_rows if not r["skipped"]]
    examples, _ = tokenize_pairs(tokenizer, [Pair.from_row(r) for r in rows], cfg.max_length, policy.eos_id)
    refs = [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in rows]
    log_rows = []

    def log(row):  # one optimizer update: into train_log.jsonl, and to on_update now
        log_rows.append(row)
        if on_update is not None:
            on_update(row)
    result = train_adapter(model, examples, refs, tokenizer.pad_token_id, cfg, policy.device,
                           log=log) if examples else {"updates": 0, "epochs": [], "best_epoch": None}
    policy.trained = t  # on every rank: the gradients were summed, so every rank holds M_t
    if not dist.is_main():
        return None
    return {rundir.ADAPTER: lambda path: save_adapter(model, path), rundir.TRAIN_LOG: log_rows,
            rundir.TRAIN_SUMMARY: result}


class Policy:
    """The policy model, loaded lazily and kept across iterations. `at(t)` returns the model as M_t:
    in memory when iteration t's training just ran, else loaded with iter-t's adapter (resume)."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe, self.out, self.device = recipe, out, pick_device()
        self.model = self.tokenizer = None
        self.trained = None  # the iteration whose adapter the in-memory model holds

    def at(self, t: int):
        if self.model is None or self.trained != t:
            self.model = None
            gc.collect()
            adapter = rundir.adapter_dir(self.out, rundir.iteration_name(t)) if t > 0 else None
            self.model, self.tokenizer = load_policy(self.recipe.policy, adapter, self.device)
            if self.recipe.train.gradient_checkpointing:  # resolved in the schema (Recipe)
                enable_checkpointing(self.model)
            self.trained = t
        return self.model, self.tokenizer

    @property
    def eos_id(self) -> int:
        return eos_token_ids(self.model, self.tokenizer)[0]

    def free_cache(self):
        free_memory()
