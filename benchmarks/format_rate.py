"""How often a policy writes the thought format by itself, and with sampling.force_marker.

Samples K outputs for N instructions of a recipe's instruction file with each named template, through
minitpo's own sample_candidates (the recipe's engine, temperature, top-p, budget), once with
force_marker off and once on, and prints per template: the natural marker rate (outputs in which
the model wrote the marker itself), the parse rate without forcing, the parse rate with it, the
truncation rate and the mean output tokens.

    python benchmarks/format_rate.py recipes/demo.yaml [KEY=VALUE ...] --n 16 --k 4 --templates generic specific
"""

import argparse
import dataclasses
import statistics
import time

from minitpo.data import load_instructions
from minitpo.model import load_policy
from minitpo.prompts import load_template
from minitpo.recipe import load_recipe
from minitpo.sample import sample_candidates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--n", type=int, default=16, help="instructions")
    ap.add_argument("--k", type=int, default=4, help="samples per instruction")
    ap.add_argument("--templates", nargs="+", default=["generic", "specific"])
    ap.add_argument("--system-prompt", action="store_true", help="thought instructions in the system turn")
    ap.add_argument("--show", type=int, default=2, help="outputs printed per template")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    instructions = load_instructions(recipe.data.instructions)[:args.n]
    model, tokenizer = load_policy(recipe.policy)
    print(f"{'template':<10} {'force':<6} {'marker (natural)':>16} {'parsed':>7} {'truncated':>9} {'tokens':>7} {'s':>6}")
    for name in args.templates:
        template = load_template(dataclasses.replace(recipe.thought, template=name))
        for force in (False, True):
            cfg = dataclasses.replace(recipe.sampling, force_marker=force, k=args.k)
            t0 = time.perf_counter()
            cands = sample_candidates(model, tokenizer, instructions, template, cfg, seed=cfg.seed,
                                      system_prompt=args.system_prompt, progress=False)
            wall = time.perf_counter() - t0
            natural = statistics.fmean(not c.forced and template.marker in c.text for c in cands)
            print(f"{name:<10} {str(force):<6} {natural:>16.2f} {statistics.fmean(c.parsed for c in cands):>7.2f} "
                  f"{statistics.fmean(c.truncated for c in cands):>9.2f} "
                  f"{statistics.fmean(c.n_tokens for c in cands):>7.0f} {wall:>6.1f}")
            for c in cands[:args.show] if force else []:
                print("   ---", repr(c.text[:400]))


if __name__ == "__main__":
    main()
