"""The whole TPO loop at a model's shape, random weights: two iterations of sample -> judge -> pair
(reference log-probs) -> train, the second sampling from the adapter the first trained. Prints each
stage's wall time and, on a GPU, the most memory torch held during it (from iter-N/stages.json), and
the sampling throughput.

    python benchmarks/loop.py --shape qwen1.5b                       # one GPU: recipes/qwen1.5b.yaml's settings
    python benchmarks/loop.py --shape tiny --per-iteration 4 --max-new-tokens 64   # anywhere, a smoke run

Random weights write no thought format and never end, so the marker is forced (sampling.force_marker,
half the budget for the thought) and a stop text ends each part: the tokenizer is a word-level one
with one entry per row of the model's vocabulary (" w" and letters), so any sampled id decodes, and one entry
in --stop-every has a "q" (the stop text), so parts run ~--stop-every tokens, as real ones run a
few hundred. A python judge (`judge` below: a hash of the response, so scores differ and every
instruction pairs) stands in for the GGUF judge, whose own speed benchmarks/judge.py measures. The
instructions are recipes/data/verifiable.jsonl.
Everything else is recipes/qwen1.5b.yaml as it stands: NF4 policy, LoRA r 16, k 8, 1,024 new tokens,
batch_size auto, train.max_length 2048, batch 4 x 2 accumulation.
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # Qwen2.5-1.5B, and a 2-layer model of its width for CPU smoke runs
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=20480),  # room for the tokenizer's 16,954 word prefixes
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def judge(instruction: str, response: str) -> float:
    """A stand-in judge for random weights: a deterministic score in [0, 10) from a hash of the response."""
    return int(hashlib.sha256(response.encode()).hexdigest()[:8], 16) % 1000 / 100


LETTERS = "abcdefghijklmnoprstuvwxyz"  # no "q": only the stop words have one


def word_tokenizer(vocab_size: int, stop_every: int):
    """A byte-level BPE tokenizer of exactly vocab_size ids whose tokens beyond the 256 bytes are words
    " w" + 1-4 letters, each built by merges from its prefix, so any id decodes to a word and
    re-encodes to itself; every stop_every-th word has a "q" (the stop text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(sorted(alphabet))}
    space = "\u0120"  # byte-level's space
    words = [space + "w"] + [space + "w" + c for c in LETTERS + "q"]
    words += [space + "w" + a + b for a in LETTERS + "q" for b in LETTERS]
    words += [space + "w" + a + b + c for a in LETTERS + "q" for b in LETTERS for c in LETTERS]
    n_full = vocab_size - len(vocab) - len(specials) - len(words)
    plain = (space + "w" + a + b + c + d for a in LETTERS for b in LETTERS for c in LETTERS for d in LETTERS)
    stops = (space + "wq" + b + c + d for b in LETTERS for c in LETTERS for d in LETTERS)
    for i in range(n_full):
        words.append(next(stops) if i % stop_every == 0 else next(plain))
    for w in words:
        vocab[w] = len(vocab)
    merges = [(w[:-1], w[-1]) for w in sorted(words, key=len)]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.add_special_tokens({})  # specials take the last ids
    for t in specials:
        if t not in hf.get_vocab():
            hf.add_tokens([t], special_tokens=True)
    hf.chat_template = CHAT_TEMPLATE
    assert len(hf) == vocab_size, (len(hf), vocab_size)
    return hf


def build_policy(shape: str, folder: Path, stop_every: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = word_tokenizer(SHAPES[shape]["vocab_size"], stop_every)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5b")
    ap.add_argument("--per-iteration", type=int, default=32, help="instructions per iteration (x k candidates)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--memory-gb", type=float, default=None, help="sampling.memory_gb (default: free memory)")
    ap.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    ap.add_argument("--stop-every", type=int, default=300, help="one token in this many ends a thought or response")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    from minitpo import loop
    from minitpo.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="minitpo-loop-"))
    t0 = time.perf_counter()
    build_policy(args.shape, work / "policy", args.stop_every)
    print(f"policy: {args.shape} random weights, written in {time.perf_counter() - t0:.1f} s")
    recipe = {
        "policy": {"model": str(work / "policy"), "quantization": args.quant, "lora_r": 16, "lora_alpha": 32},
        "thought": {"template": "generic"},
        "data": {"instructions": str(ROOT / "recipes" / "data" / "verifiable.jsonl"),
                 "per_iteration": args.per_iteration, "held_out": 0},
        "sampling": {"k": args.k, "max_new_tokens": args.max_new_tokens, "batch_size": "auto",
                     "memory_gb": args.memory_gb, "force_marker": True, "stop": ["q"]},
        "judge": {"type": "python", "function": f"{Path(__file__).resolve()}:judge", "rho": 0.0},
        "train": {"lr": 5e-6, "epochs": 1, "batch_size": 4, "grad_accum": 2, "max_length": 2048},
        "iterations": 2,
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = Path(args.out) if args.out else work / "run"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loop.run(load_recipe(work / "recipe.yaml", [f"out={out}"]))
    total = time.perf_counter() - t0

    results = {"shape": args.shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "total_s": round(total, 1), "iterations": []}
    print(f"\n{'':8}{'sample':>10}{'judge':>10}{'pair':>10}{'train':>10}   new tokens/s (sample)   peak GiB per stage")
    for t in (1, 2):
        it = out / f"iter-{t}"
        stages = json.loads((it / "stages.json").read_text())
        cands = [json.loads(line) for line in (it / "candidates.jsonl").read_text().splitlines()]
        new_tokens = sum(c["n_tokens"] for c in cands)
        peaks = stages.get("peak_gpu_gib", {})
        row = {"stages_s": {k: stages[k] for k in ("sample", "judge", "pair", "train")}, "peak_gpu_gib": peaks,
               "candidates": len(cands), "parsed": sum(c["parsed"] for c in cands), "new_tokens": new_tokens,
               "sample_tok_s": round(new_tokens / stages["sample"]),
               "pairs": sum(1 for _ in (it / "pairs.jsonl").read_text().splitlines())}
        results["iterations"].append(row)
        print(f"iter {t}: " + "".join(f"{stages[k]:>9.1f}s" for k in ("sample", "judge", "pair", "train"))
              + f"   {row['sample_tok_s']:>10,} ({new_tokens:,} tokens)   "
              + (" ".join(f"{k} {v:.2f}" for k, v in peaks.items()) or "-"))
    print(f"total {total:.1f} s; candidates parsed {results['iterations'][0]['parsed']}/{results['iterations'][0]['candidates']}, "
          f"pairs {results['iterations'][0]['pairs']} and {results['iterations'][1]['pairs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
