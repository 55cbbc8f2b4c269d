"""The `minitpo` command line. Each command is a thin shell over one module; user mistakes
(`UserError`) print as one line and exit with status 2, without a traceback."""

import os
import signal
import sys

import click

from minitpo.errors import Terminated, UserError, check_terminated, quiet_dropped_terminate, terminate
from minitpo.prompts import TEMPLATES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="minitpo")
def cli():
    """minitpo: teach a small instruct LLM to think before it answers, by Thought Preference
    Optimization (Wu et al., 2024)."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--out", help="Run directory (default: recipe's `out`, else runs/<recipe name>).")
@click.option("--fresh", is_flag=True, help="Delete the run directory first and start over.")
def run(recipe, overrides, out, fresh):
    """Run the TPO iterations of RECIPE (a YAML file), resuming a run that was stopped.

    OVERRIDES are dotted KEY=VALUE pairs applied on top of the recipe, e.g. sampling.k=4 train.lr=1e-5."""
    from minitpo.recipe import load_recipe

    if out is not None:  # --out "" (an unset variable) is refused by load_recipe, never the working directory
        overrides = (*overrides, f"out={out}")
    recipe = load_recipe(recipe, list(overrides))  # every check that needs no model, before torch imports
    from minitpo.rundir import check_out

    check_out(recipe.out, fresh)  # --fresh deletes only a folder minitpo made
    from minitpo.loop import run as run_loop

    run_loop(recipe, fresh=fresh)  # prints a line per iteration, then the evaluation when the recipe asks


@cli.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True),
              help="The card's memory in GB (GiB); default: this machine's GPU, else the plan is only reported.")
@click.option("--json", "json_path", help="Also write the plan here: fits, gpu_memory_gb, stages.*.peak_gb, ...")
def plan(recipe, overrides, gpu_memory, json_path):
    """Predict each stage's peak memory and time for RECIPE from its models' configs alone (no weights
    load), say whether it fits --gpu-memory, and which setting to lower when it does not.

    OVERRIDES are dotted KEY=VALUE pairs, as for `run`."""
    from minitpo import io
    from minitpo.plan import detected_gpu_memory, plan_recipe, plan_text
    from minitpo.recipe import load_recipe

    cfg = load_recipe(recipe, list(overrides), check_files=False)  # a plan comes before the downloads
    if json_path:
        if os.path.isdir(json_path):
            raise UserError(f"--json: {json_path!r} is a folder; give the path of a .json file to write")
        io.check_writable(os.path.dirname(os.path.abspath(json_path)), "--json")
    gpu_memory = gpu_memory or detected_gpu_memory()
    result = plan_recipe(cfg, gpu_memory, device="cuda" if gpu_memory else "cpu")
    if json_path:
        io.write_json(json_path, result)
    click.echo(plan_text(result, recipe))


@cli.command(name="judge-check")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--set", "set_path", help="Your own JSONL of prompt, chosen, rejected (TRL's preference format) "
              "instead of the sanity set shipped with minitpo.")
@click.option("--json", "json_path", help="Write the result here: n, accuracy, ci_low, ci_high, and per kind.")
def judge_check(recipe, overrides, set_path, json_path):
    """Check RECIPE's judge before a run: how often it prefers a good response to an answer to another
    instruction, the same answer cut mid-sentence, a refusal, and one with a factual error (64 items
    each), with 95% intervals; verdict mass for GGUF judges, position consistency for pairwise.

    OVERRIDES are dotted KEY=VALUE pairs, as for `run`."""
    from minitpo import io
    from minitpo.judges.check import check_judge, load_preference_set, sanity_items, summary_text
    from minitpo.recipe import load_recipe

    cfg = load_recipe(recipe, list(overrides)).judge
    items = load_preference_set(set_path) if set_path else sanity_items()
    if json_path:  # before the judging, not after it
        if os.path.isdir(json_path):
            raise UserError(f"--json: {json_path!r} is a folder; give the path of a .json file to write")
        io.check_writable(os.path.dirname(os.path.abspath(json_path)), "--json")
    result = check_judge(cfg, items)
    if json_path:
        io.write_json(json_path, result)
    click.echo(summary_text(result))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """Write RUN_DIR/report.md and its plots (RUN_DIR/report/*.png) from the finished iterations:
    judge scores, lengths, parse rate, DPO training curves, and win rates when RUN_DIR/eval/ has them."""
    from minitpo.report import write_report

    click.echo(f"wrote {write_report(run_dir)}")


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--model", help="The model to score: iter-N (default: the last finished iteration).")
@click.option("--against", default="seed", show_default=True,
              help="The model to compare with: seed (the base model, no adapter), iter-N, or another run's "
                   "iteration folder (e.g. runs/demo-direct/iter-2: TPO against the direct baseline).")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Outputs per held-out instruction and model; the interval resamples instructions.")
def eval_(run_dir, model, against, samples):
    """Win rate of --model against --against on RUN_DIR/held_out.jsonl.

    Each model writes --samples outputs per held-out instruction (its own run's thought template,
    temperature and sampling seed), and reports how often it wrote the thought marker itself (not
    appended by sampling.force_marker); RUN_DIR's judge sees the responses only: a GGUF judge compares them in both
    orders, a pointwise judge scores each and the higher wins. A format failure loses to a parsed
    response; ties count half. Also a length-controlled win rate (the verdict regressed on the length
    difference, read at zero difference). Writes RUN_DIR/eval/MODEL-vs-AGAINST.json
    (win rates, 95% bootstrap intervals, parse rates, lengths, per category) and a .jsonl of the rows."""
    from minitpo.evaluate import evaluate, summary_text

    click.echo(summary_text(evaluate(run_dir, model, against, samples)))


@cli.command()
@click.argument("args", nargs=-1)
@click.option("--suite", required=True, type=click.Choice(["ifeval", "alpaca_eval", "arena_hard"]),
              help="ifeval: Google's checkers; alpaca_eval, arena_hard: the run's judge against the suite's baseline.")
@click.option("--model", "models", multiple=True,
              help="seed, iter-N or OTHER_RUN/iter-N; repeat for several (default: seed and the last iteration).")
@click.option("--limit", type=click.IntRange(min=1), help="Bench a fixed seeded subset of N prompts.")
@click.option("--responses", type=click.Path(dir_okay=False),
              help="ifeval without a run: score this JSONL of key (or prompt) and response.")
@click.option("--data", type=click.Path(), help="The suite's data in its own format, instead of the installed copy.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the result here.")
def bench(args, suite, models, limit, responses, data, json_path):
    """Bench the models of a run on AlpacaEval, Arena-Hard or IFEval, offline.

    ARGS: RUN_DIR, then judge.* overrides (judge.model=big.gguf) to bench with another judge. Each model
    answers with its own run's template and sampling, its thought hidden. Answers and judgements are
    cached in RUN_DIR/bench/SUITE/ (a killed bench continues); RUN_DIR/bench/SUITE.json keeps the table.
    With --responses FILE.jsonl and no RUN_DIR, scores given IFEval responses without a model."""
    from minitpo import io
    from minitpo.bench import bench as run_bench, bench_responses, categories_text, table

    run_dir, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    if responses:
        if run_dir or models or overrides:
            raise UserError("bench: --responses scores a file without a model; drop RUN_DIR, --model and overrides")
        result = bench_responses(suite, responses, data)
        s = result["summary"]
        click.echo(f"ifeval, {s['n']} prompts: prompt strict {s['prompt_strict']:.3f}, loose {s['prompt_loose']:.3f}; "
                   f"instruction strict {s['instruction_strict']:.3f}, loose {s['instruction_loose']:.3f}")
    else:
        if run_dir is None:
            raise UserError("bench: give RUN_DIR (a run directory) or --responses FILE.jsonl (ifeval)")
        result = run_bench(run_dir, list(models), suite, limit, list(overrides), data)
        click.echo(f"{suite}, {result['n']} prompts" + (" (the baseline: the suite's reference answers)"
                                                          if suite != "ifeval" else ""))
        click.echo(table(result))
        if suite != "ifeval":
            click.echo(categories_text(result))
    if json_path:
        io.write_json(json_path, result)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--prompt", help="One message to answer; without it, read messages from stdin, one per line.")
@click.option("--show-thought", is_flag=True, help="Print the thought before the response.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Thought + response budget (default: the recipe's).")
@click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature, 0 = greedy (default: the recipe's).")
@click.option("--template", type=click.Choice(list(TEMPLATES)),
              help="Thought template (default: the recipe's; generic for a bare adapter).")
def chat(path, prompt, show_thought, max_new_tokens, temperature, template):
    """Talk to a trained model. PATH is an iteration folder (RUN_DIR/iter-N) or a LoRA adapter folder.

    Each message is wrapped in the thought template and answered with one sampled output; only the
    response is printed unless --show-thought."""
    from minitpo.chat import format_reply, open_chat, read_messages, reply

    session = open_chat(path, template, max_new_tokens, temperature)
    messages = [prompt] if prompt is not None else read_messages(sys.stdin)
    for turn, message in enumerate(messages):
        click.echo(format_reply(reply(session, message, seed=session.sampling.seed + turn), session, show_thought))
        if prompt is None:
            click.echo()


@cli.command()
@click.argument("path", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--gguf", "gguf", is_flag=True, help="Write OUT as one GGUF file of the merged model, for llama.cpp.")
@click.option("--gguf-lora", "gguf_lora", is_flag=True,
              help="Write OUT as a GGUF of the adapter alone (llama.cpp: -m BASE.gguf --lora OUT).")
@click.option("--type", "qtype", type=click.Choice(["f16", "q8_0", "f32"]), default=None,
              help="Tensor type of the --gguf file (default f16).")
def export(path, out, gguf, gguf_lora, qtype):
    """Merge the adapter of PATH (RUN_DIR/iter-N or an adapter folder) into its full-precision base
    model and save it with its tokenizer into OUT, a new folder that transformers loads without peft.
    With --gguf, OUT is one GGUF file for llama.cpp instead; with --gguf-lora, the adapter alone."""
    from minitpo import io
    from minitpo.export import export_gguf, export_merged

    if gguf and gguf_lora:
        raise UserError("export: --gguf and --gguf-lora write different files; pass one of them")
    if qtype is not None and not gguf:
        raise UserError(f"export: --type {qtype} is the tensor type of a --gguf file; add --gguf or drop --type")
    io.check_writable(os.path.dirname(os.path.abspath(out)), "OUT")  # before the model loads and merges
    if gguf or gguf_lora:
        written = export_gguf(path, out, qtype or "f16", lora=gguf_lora)
        size = written.stat().st_size / 2**20
        click.echo(f"exported: {written} ({size:.1f} MiB)")
    else:
        click.echo(f"exported: {export_merged(path, out)}")


def _exit_now(status: int):
    """Exit with `status`, skipping the interpreter's shutdown. Needed after Ctrl-C: when the
    KeyboardInterrupt passed through code that C ran with PyRun_String (as a library's import can),
    CPython 3.11 under `python -m` ends the process by SIGINT at shutdown, whatever status was asked
    for. What finished is on disk already (atomic writes); only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main():
    first = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone speaks for the run
    if not first:
        os.environ["TQDM_DISABLE"] = "1"  # before tqdm is imported: bars given no `disable` stay quiet
    signal.signal(signal.SIGTERM, terminate)
    sys.unraisablehook = quiet_dropped_terminate
    try:
        cli.main(prog_name="minitpo", standalone_mode=False)
        check_terminated()  # a SIGTERM whose exception was dropped (see errors.terminate) still ends as one
    except UserError as e:
        if first:
            click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Terminated:  # as Ctrl-C, with the status of a process ended by SIGTERM (128 + 15)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one while exiting changes nothing
        if first:
            click.echo("terminated; run the same command again to resume from the last finished stage", err=True)
        _exit_now(143)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C: what finished is on disk
        if first:
            click.echo("interrupted; run the same command again to resume from the last finished stage", err=True)
        _exit_now(130)
    except click.UsageError as e:  # a bad option or argument: one line, as for UserError
        command = e.ctx.command_path if e.ctx else "minitpo"
        click.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
