"""The TPO loop: for each iteration, sample -> judge -> pair -> train -> save (docs/method.md steps 1-8).

This is the one place where the whole algorithm is visible. Each stage reads the previous stage's
files in `iter-N/` and writes its own, atomically; a stage whose output exists is skipped, so a
killed run resumes from the last finished stage. The run directory is the source of truth:

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
import time
from contextlib import ExitStack
from pathlib import Path

import click
import torch

from minitpo import dist, engine, io, rundir, suites
from minitpo.config import Recipe
from minitpo.recipe import recipe_to_dict
from minitpo.evaluate import held_out_warning
from minitpo.data import Instruction, read_instructions, split_instructions
from minitpo.judges.llama import load_prompt_template
from minitpo.live import Live
from minitpo.device import free_memory, pick_device
from minitpo.model import context_length, enable_checkpointing, load_policy, load_tokenizer, save_adapter
from minitpo.pairs import Pair, auto_rho, build_pairs, by_instruction, control_length
from minitpo.prompts import load_template
from minitpo.sample import Candidate, check_prompt_lengths, eos_token_ids, sample_candidates
from minitpo.judges import merge_caches, merge_stats, rank_cache, score_candidates
from minitpo.summary import check_summaries, summarize, summary_line, write_summary
from minitpo.train import reference_logps, tokenize_pairs, train_adapter


def run(recipe: Recipe, fresh: bool = False) -> Path:
    """Run (or resume) every iteration of `recipe` in `recipe.out`; return the run directory."""
    dist.init()
    out = Path(recipe.out)
    template = load_template(recipe.thought.template, recipe.thought.marker, recipe.thought.min_words)
    data = recipe.data
    items, notes = read_instructions(data)  # fails on a bad file, dataset, split or column
    for note in notes if dist.is_main() else ():
        click.echo(note, err=True)
    kept = None if fresh else rundir.kept_split(out)  # a run keeps its split, whatever the file became
    held_out, slices = split_instructions(items, data.per_iteration, data.held_out, recipe.iterations, data.seed,
                                          kept=kept)  # fails on a short file before anything is written
    _check_lengths(recipe, out, template, held_out, slices[:recipe.iterations], fresh)
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
            if recipe.judge.type == "llama_cpp" and recipe.judge.mode == "pointwise" and not (out / "judge_prompt.txt").exists():
                io.write_text(out / "judge_prompt.txt", load_prompt_template(recipe.judge.prompt))  # what the judge saw
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
        live = held.enter_context(Live(recipe.log.to, out, recipe_to_dict(recipe), main=dist.is_main()))

        policy = Policy(recipe, out)
        for t, instructions in enumerate(slices[:recipe.iterations], start=1):
            it = rundir.iteration_dir(out, t)
            if dist.broadcast((it / rundir.SUMMARY).exists()):
                continue
            summary = run_iteration(t, it, instructions, template, recipe, policy, live)
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
            saved = out / "eval" / f"{rundir.iteration_name(recipe.iterations)}-vs-seed.json"
            click.echo(summary_text(io.read_json(saved) if saved.exists() else evaluate(out)))
    dist.close()
    return out


def _check_lengths(recipe: Recipe, out: Path, template, held_out, slices, fresh: bool) -> None:
    """The instructions still to sample, and the held-out ones (`eval` samples them), must fit the
    policy's context: checked with its tokenizer and config alone, before any model loads."""
    pending = [i for t, s in enumerate(slices, start=1)
               if fresh or not (rundir.iteration_dir(out, t) / "candidates.jsonl").exists() for i in s]
    pending += held_out if pending else []  # a finished run is not held up by them
    if pending:
        check_prompt_lengths(load_tokenizer(recipe.policy.model), context_length(recipe.policy.model), pending,
                             template, recipe.sampling, recipe.thought.system_prompt)


def _judge_check(out: Path, recipe: Recipe) -> None:
    from minitpo.judges.check import at_chance, check_judge, sanity_items, warning

    path = out / "judge_check.json"
    if not path.exists():
        io.write_json(path, check_judge(recipe.judge, sanity_items()))
    checked = io.read_json(path)
    click.echo(f"judge-check: accuracy {checked['accuracy']:.3f} (95% CI {checked['ci_low']:.3f}-"
               f"{checked['ci_high']:.3f}) over {checked['n']} items")
    if at_chance(checked):
        click.echo(warning(checked), err=True)


def run_iteration(t: int, it: Path, instructions: list[Instruction], template, recipe: Recipe, policy,
                  live: Live) -> dict:
    times = io.read_json(it / "stages.json") if (it / "stages.json").exists() else {}
    main = dist.is_main()

    def stage(name, path, work):
        """Run `work()` unless its output file exists; record its wall time, the processes it ran on and,
        on a GPU, the most memory torch held during it (this rank's)."""
        if not dist.broadcast(Path(path).exists()):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            work()  # every rank; rank 0 writes `path`
            dist.barrier()
            times[name] = round(time.perf_counter() - t0, 2)
            times["world_size"] = dist.world_size()
            if torch.cuda.is_available():
                times.setdefault("peak_gpu_gib", {})[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        elif name not in times:  # killed between writing the output and its time: the time is lost
            times[name] = None
        else:
            return
        if main:
            io.write_json(it / "stages.json", times)

    # 1-3. Sample K thought+response candidates per fresh instruction from M_{t-1}; split them.
    def sample():
        model, tokenizer = policy.at(t - 1)
        mine = dist.shard(instructions)
        candidates = sample_candidates(model, tokenizer, mine, template, recipe.sampling, seed=recipe.sampling.seed + t,
                                       system_prompt=recipe.thought.system_prompt, progress=main)
        k = recipe.sampling.k
        groups = dist.gather([candidates[i * k:(i + 1) * k] for i in range(len(mine))])  # per instruction
        if main:
            io.write_jsonl(it / "candidates.jsonl", [dataclasses.asdict(c) for g in groups for c in g])
        engine.release()  # the sampling copy, KV cache and CUDA graph go before the judge loads
    stage("sample", it / "candidates.jsonl", sample)
    candidates = [Candidate(**row) for row in io.read_jsonl(it / "candidates.jsonl")]

    # 4-5. The judge scores responses only (never thoughts); length control normalises per instruction.
    def judge():
        policy.free_cache()
        parsed = [c for c in candidates if c.parsed]
        # a rank judges whole instructions (pairwise needs the group)
        mine = [c for group in dist.shard(by_instruction(parsed)) for c in group]
        cache = rank_cache(it / "judge_cache.jsonl", dist.rank())
        mine_scores, mine_stats = score_candidates(recipe.judge, mine, cache, progress=main)
        scored = dist.gather([list(zip(mine, mine_scores))])
        stats = merge_stats(dist.gather([mine_stats]))
        if not main:
            return
        merge_caches(it / "judge_cache.jsonl")
        io.write_json(it / "judge_stats.json", stats)
        raw = {(c.instruction_id, c.index): s for part in scored for c, s in part}
        rho = auto_rho(candidates, raw) if recipe.judge.rho == "auto" else recipe.judge.rho
        final = control_length(candidates, raw, rho)
        io.write_jsonl(it / "scores.jsonl", [
            {"instruction_id": c.instruction_id, "index": c.index, "score": raw[(c.instruction_id, c.index)],
             "response_length": len(c.response), "rho": rho, "final": final[(c.instruction_id, c.index)]}
            for c in parsed
        ])
    stage("judge", it / "scores.jsonl", judge)
    scores = io.read_jsonl(it / "scores.jsonl")
    raw = {(s["instruction_id"], s["index"]): s["score"] for s in scores}
    final = {(s["instruction_id"], s["index"]): s["final"] for s in scores}

    # 6. Best vs worst become pairs; reference log-probs come from M_{t-1}, once, before training.
    def pair():
        model, tokenizer = policy.at(t - 1)
        pairs = build_pairs(candidates, raw, final)
        examples, truncated = tokenize_pairs(tokenizer, pairs, recipe.train.max_length, policy.eos_id)
        kept = [e for e in examples if e is not None]
        refs = dist.gather(reference_logps(model, dist.shard(kept), tokenizer.pad_token_id, recipe.train, policy.device))
        if not main:
            return
        refs = iter(refs)
        rows = []
        for p, e, cut in zip(pairs, examples, truncated):
            ref = next(refs) if e is not None else (None, None)
            rows.append({**dataclasses.asdict(p), "skipped": e is None, "prompt_truncated": cut,
                         "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]})
        io.write_jsonl(it / "pairs.jsonl", rows)
    stage("pair", it / "pairs.jsonl", pair)
    pair_rows = io.read_jsonl(it / "pairs.jsonl")

    # 7. DPO on this iteration's pairs only: M_{t-1} -> M_t.
    def train():
        model, tokenizer = policy.at(t - 1)
        rows = [r for r in pair_rows if not r["skipped"]]
        pairs = [Pair.from_row(r) for r in rows]
        examples, _ = tokenize_pairs(tokenizer, pairs, recipe.train.max_length, policy.eos_id)
        refs = [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in rows]
        log_rows = []

        def log(row):  # one optimizer update: into train_log.jsonl, and onto the live curves now
            log_rows.append(row)
            live.update(t, row)
        result = train_adapter(model, examples, refs, tokenizer.pad_token_id, recipe.train, policy.device,
                               log=log) if examples else {"updates": 0, "epochs": [], "best_epoch": None}
        policy.trained = t  # on every rank: the gradients were summed, so every rank holds M_t
        if main:
            save_adapter(model, it / "adapter")
            io.write_jsonl(it / "train_log.jsonl", log_rows)
            io.write_json(it / "train_summary.json", result)
    stage("train", it / "train_summary.json", train)

    if not main:
        return {}
    stage_times = {k: v for k, v in times.items() if k not in ("world_size", "peak_gpu_gib")}
    return summarize(t, candidates, scores, pair_rows, io.read_jsonl(it / "train_log.jsonl"),
                     io.read_json(it / "train_summary.json"), io.read_json(it / "judge_stats.json"), stage_times,
                     marker=template.marker)


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
            if _checkpointing(self.recipe):
                enable_checkpointing(self.model)
            self.trained = t
        return self.model, self.tokenizer

    @property
    def eos_id(self) -> int:
        return eos_token_ids(self.model, self.tokenizer)[0]

    def free_cache(self):
        free_memory()


def _checkpointing(recipe: Recipe) -> bool:
    on = recipe.train.gradient_checkpointing
    return recipe.policy.quantization == "nf4" if on is None else on
