"""The demo over several seed draws: does its result hold, or did one draw happen to win?

For each draw N, runs `minitpo run RECIPE --out OUT/seed-N data.seed=N sampling.seed=N` (other training
and held-out instructions, other samples; the recipe must have `evaluate: true`), then, with
--gguf-check M, exports the last iteration with `minitpo export --gguf` and has llama-cpp-python answer
M held-out instructions with the run's template and nothing forced (no marker appended, no stop text,
no thought budget, 512 tokens at most): does the model write a thought of 5+ words, the marker and then
a response by itself? (And how often with no second marker after it, as minitpo's parser requires.)

Prints per draw and pooled: the win rate against the seed with its 95% interval (pooled: the
bootstrap resamples instructions of every draw), the marker written by the model itself and with a
thought of 5+ words and a response (sample.thinks), both models, on the held-out instructions; the
constraint pass rate (verifiable instructions) and mean response length of both; the GGUF check;
the wall time of the run; with --unforced-check, both models on every held-out instruction sampled by
minitpo with nothing forced. Writes OUT/draws.json.

    python benchmarks/demo_draws.py [--recipe recipes/demo.yaml] [--draws 0 1 2 3 4] [--out runs/draws]
                                     [--gguf-check 10] [--unforced-check] [KEY=VALUE ...]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minitpo import io
from minitpo.evaluate import win_rate_summary
from minitpo.sample import THOUGHT_MIN_WORDS
from minitpo.verifiable import pass_counts


def run_draw(recipe: str, out: Path, seed: int, overrides: list[str]) -> float:
    """Wall seconds of one `minitpo run` (nothing is redone when OUT holds a finished run)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "minitpo", "run", recipe, "--out", str(out), f"data.seed={seed}",
           f"sampling.seed={seed}", *overrides]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def gguf_check(run_dir: Path, n: int) -> dict:
    """Export the last iteration to GGUF and let llama-cpp-python answer n held-out instructions, the
    run's template in a user turn, sampled at the recipe's temperature and top-p, nothing forced."""
    from llama_cpp import Llama

    from minitpo import rundir
    from minitpo.llamacpp import quiet_stderr
    from minitpo.recipe import load_recipe

    if (run_dir / "gguf_check.jsonl").exists():  # checked by an earlier call: read, not redone
        return gguf_counts(io.read_jsonl(run_dir / "gguf_check.jsonl"))
    recipe = load_recipe(run_dir / "recipe.yaml", check_files=False)
    last = rundir.iteration_name(rundir.finished_iterations(run_dir)[-1])
    path = run_dir / f"{last}.gguf"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "minitpo", "export", str(run_dir / last), str(path), "--gguf"],
                       check=True)
    with quiet_stderr():
        llm = Llama(str(path), n_ctx=2048, n_threads=2, seed=0, verbose=False)
    template, marker = llm.metadata["minitpo.thought_template"], llm.metadata["minitpo.thought_marker"]
    held_out = io.read_jsonl(run_dir / "held_out.jsonl")[:n]
    outputs = []
    for row in held_out:
        text = llm.create_chat_completion(
            [{"role": "user", "content": template.replace("{instruction}", row["text"])}],
            temperature=recipe.sampling.temperature, top_p=recipe.sampling.top_p, max_tokens=512,
        )["choices"][0]["message"]["content"]
        thought, found, response = text.partition(marker)
        thinks = bool(found) and len(thought.replace("<think>", "").split()) >= THOUGHT_MIN_WORDS and bool(response.strip())
        outputs.append({"instruction": row["text"], "text": text, "thinks": thinks,
                        "one_marker": thinks and marker not in response})  # the split minitpo's parser accepts
    io.write_jsonl(run_dir / "gguf_check.jsonl", outputs)
    return gguf_counts(outputs)


def unforced_check(run_dir: Path) -> dict:
    """The trained model and the seed on every held-out instruction, sampled by minitpo with nothing forced
    (sampling.force_marker off: the recipe's budget, stop texts, temperature and seed): the share of
    outputs with a thought of 5+ words, the marker and a response (sample.thinks). The eval's marker
    rate counts only markers written within the thought budget; this one lets a longer thought finish."""
    import dataclasses

    from minitpo import rundir
    from minitpo.device import free_memory
    from minitpo.model import load_policy
    from minitpo.prompts import load_template
    from minitpo.recipe import load_recipe
    from minitpo.sample import sample_candidates, thinks

    if (run_dir / "unforced_check.json").exists():
        return io.read_json(run_dir / "unforced_check.json")
    recipe = load_recipe(run_dir / "recipe.yaml", check_files=False)
    template = load_template(recipe.thought)
    held_out = rundir.read_held_out(run_dir)
    cfg = dataclasses.replace(recipe.sampling, force_marker=False)
    out = {}
    for name in ("seed", rundir_last(run_dir)):
        policy, tokenizer = load_policy(recipe.policy, None if name == "seed" else rundir.adapter_dir(run_dir, name))
        policy.eval()
        cands = sample_candidates(policy, tokenizer, held_out, template, cfg, k=1, seed=recipe.sampling.seed,
                                  system_prompt=recipe.thought.system_prompt)
        out["seed" if name == "seed" else "trained"] = sum(thinks(c, template.marker) for c in cands) / len(cands)
        del policy
        free_memory()
    io.write_json(run_dir / "unforced_check.json", out)
    return out


def gguf_counts(outputs: list[dict]) -> dict:
    return {"n": len(outputs), "thinks": sum(o["thinks"] for o in outputs),
            "one_marker": sum(o["one_marker"] for o in outputs)}


def constraint_rate(rows: list[dict], who: str) -> float | None:
    """The share of the held-out instructions' constraints met by `who`'s parsed responses (a format
    failure meets none of its instruction's)."""
    met = total = 0
    for r in rows:
        m, t = pass_counts(r["instruction"], r[f"{who}_response"])
        met, total = met + (m if r[f"{who}_parsed"] else 0), total + t
    return met / total if total else None


def draw_row(run_dir: Path, seed: int, wall_s: float, gguf: dict | None, unforced: dict | None = None) -> dict:
    name = f"{rundir_last(run_dir)}-vs-seed"
    result = io.read_json(run_dir / "eval" / f"{name}.json")
    rows = io.read_jsonl(run_dir / "eval" / f"{name}.jsonl")
    m, a = result["model"], result["against"]
    summaries = io.read_jsonl(run_dir / "metrics.jsonl")
    return {
        "seed": seed, "n": result["n"], "win_rate": result["win_rate"], "ci_low": result["ci_low"],
        "ci_high": result["ci_high"],
        "length_controlled": (result.get("length_controlled") or {}).get("win_rate"),
        "marker_rate": result["marker_rate"][m], "seed_marker_rate": result["marker_rate"][a],
        "thought_rate": result["thought_rate"][m], "seed_thought_rate": result["thought_rate"][a],
        "parse_rate": result["parse_rate"][m], "seed_parse_rate": result["parse_rate"][a],
        "constraints": constraint_rate(rows, "model"), "seed_constraints": constraint_rate(rows, "against"),
        "response_chars": result["response_chars"][m], "seed_response_chars": result["response_chars"][a],
        "train_marker_rate": [s.get("marker_rate") for s in summaries],
        "gguf_thinks": None if gguf is None else f"{gguf['thinks']}/{gguf['n']} ({gguf['one_marker']} with one marker)",
        "unforced_thinks": unforced, "wall_s": round(wall_s, 1), "rows": rows,
    }


def rundir_last(run_dir: Path) -> str:
    from minitpo import rundir

    return rundir.iteration_name(rundir.finished_iterations(run_dir)[-1])


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds, one run each")
    ap.add_argument("--out", default="runs/draws")
    ap.add_argument("--gguf-check", type=int, default=10, help="held-out instructions for llama.cpp (0: skip)")
    ap.add_argument("--unforced-check", action="store_true",
                    help="also sample every held-out instruction with nothing forced (both models)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides for every draw")
    args = ap.parse_args()

    table = []
    for seed in args.draws:
        run_dir = Path(args.out) / f"seed-{seed}"
        done = (run_dir / "draw.json").exists()
        wall = io.read_json(run_dir / "draw.json")["wall_s"] if done else run_draw(args.recipe, run_dir, seed, args.overrides)
        gguf = gguf_check(run_dir, args.gguf_check) if args.gguf_check else None
        unforced = unforced_check(run_dir) if args.unforced_check else None
        row = draw_row(run_dir, seed, wall, gguf, unforced)
        io.write_json(run_dir / "draw.json", {k: v for k, v in row.items() if k != "rows"})
        table.append(row)

    print("\n| seed | win rate vs seed (95% CI) | LC | marker: trained / seed | thought+response: trained / seed "
          "| constraints met: trained / seed | chars: trained / seed | iterations' marker rate | GGUF thinks | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['seed']} | {r['win_rate']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f}) | {fmt(r['length_controlled'], '.3f')} "
              f"| {fmt(r['marker_rate'])} / {fmt(r['seed_marker_rate'])} | {fmt(r['thought_rate'])} / {fmt(r['seed_thought_rate'])} "
              f"| {fmt(r['constraints'], '.3f')} / {fmt(r['seed_constraints'], '.3f')} "
              f"| {fmt(r['response_chars'], '.0f')} / {fmt(r['seed_response_chars'], '.0f')} "
              f"| {' / '.join(fmt(x) for x in r['train_marker_rate'])} | {r['gguf_thinks'] or '-'} "
              f"| {round(r['wall_s']) // 60} min {round(r['wall_s']) % 60} s |")
    rows = [{**x, "instruction_id": (r["seed"], x["instruction_id"])} for r in table for x in r["rows"]]
    pooled = win_rate_summary([x["p"] for x in rows], [x["instruction_id"] for x in rows])
    wins = [r["win_rate"] for r in table]
    spread = f"mean {statistics.fmean(wins):.3f}, min {min(wins):.3f}, max {max(wins):.3f}" + (
        f", sd {statistics.stdev(wins):.3f}" if len(wins) > 1 else "")
    above = sum(r["win_rate"] > 0.5 for r in table)
    print(f"\npooled over {len(table)} draws ({pooled['n']} held-out instructions): win rate {pooled['win_rate']:.3f} "
          f"(95% CI {pooled['ci_low']:.3f}-{pooled['ci_high']:.3f}); per draw {spread}; above 0.5 in {above} of "
          f"{len(table)}")
    checked = [r["unforced_thinks"] for r in table if r["unforced_thinks"]]
    if checked:
        print("nothing forced, thought + marker + response, trained / seed: " + ", ".join(
            f"{r['seed']}: {r['unforced_thinks']['trained']:.2f} / {r['unforced_thinks']['seed']:.2f}"
            for r in table if r["unforced_thinks"]) + f"; mean {statistics.fmean(c['trained'] for c in checked):.2f}")
    print(f"marker written by the trained model: {statistics.fmean(r['marker_rate'] for r in table):.2f} "
          f"(min {min(r['marker_rate'] for r in table):.2f}); with a thought and a response: "
          f"{statistics.fmean(r['thought_rate'] for r in table):.2f} (min {min(r['thought_rate'] for r in table):.2f})")
    io.write_json(Path(args.out) / "draws.json", {"draws": [{k: v for k, v in r.items() if k != "rows"} for r in table],
                                                 "pooled": pooled, "above_half": above})


if __name__ == "__main__":
    main()
