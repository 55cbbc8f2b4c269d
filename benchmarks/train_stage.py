"""Time the pair stage's reference pass and the train stage on a finished iteration's pairs.

Loads the run's recipe (with KEY=VALUE overrides, e.g. train.autocast=none policy.lora_dropout=0),
the seed policy and ITER/pairs.jsonl, then runs `reference_logps` and `train_adapter` as the loop
does and prints their wall times, the largest reference log-prob difference from the run's own, and
the loss per update.

    python benchmarks/train_stage.py runs/demo/iter-1 train.autocast=none
    python benchmarks/train_stage.py runs/demo/iter-1 train.autocast=bfloat16 policy.lora_dropout=0
"""

import argparse
import json
import time
from pathlib import Path

from minitpo.model import load_policy
from minitpo.pairs import Pair
from minitpo.recipe import load_recipe
from minitpo.train import autocast_dtype, reference_logps, tokenize_pairs, train_adapter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("iteration", type=Path, help="a run's iter-1 folder (the seed is its reference)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides")
    args = ap.parse_args()
    recipe = load_recipe(str(args.iteration.parent / "recipe.yaml"), args.overrides)
    model, tokenizer = load_policy(recipe.policy)
    rows = [json.loads(line) for line in (args.iteration / "pairs.jsonl").read_text().splitlines()]
    pairs = [Pair.from_row(r) for r in rows]
    examples, _ = tokenize_pairs(tokenizer, pairs, recipe.train.max_length, tokenizer.eos_token_id)
    kept = [e for e in examples if e is not None]
    device = str(next(model.parameters()).device.type)
    t0 = time.perf_counter()
    refs = reference_logps(model, kept, tokenizer.pad_token_id, recipe.train, device)
    ref_s = time.perf_counter() - t0
    own = [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r, e in zip(rows, examples) if e is not None]
    drift = max(abs(a - b) for x, y in zip(refs, own) for a, b in zip(x, y))
    log = []
    t0 = time.perf_counter()
    train_adapter(model, kept, refs, tokenizer.pad_token_id, recipe.train, device, log=log.append)
    train_s = time.perf_counter() - t0
    print(f"autocast {autocast_dtype(recipe.train, device)}, lora_dropout {recipe.policy.lora_dropout}, "
          f"{len(kept)} pairs: reference {ref_s:.1f} s (max |dlogp| from the run's {drift:.3f}), "
          f"train {train_s:.1f} s over {len(log)} updates")
    print("loss per update:", " ".join(f"{r['loss']:.3f}" for r in log))


if __name__ == "__main__":
    main()
