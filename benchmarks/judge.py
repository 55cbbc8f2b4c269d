"""Judge throughput, pointwise (with and without KV-cache prefix reuse) and pairwise, and the memory
llama.cpp gives back on close.

Scores N synthetic instructions x K responses each (the responses to one instruction are consecutive, as
the loop passes them), once evaluating every prompt from scratch and once reusing the shared prefix
(judge preamble + instruction). Prints responses scored per second, the speedup, the largest score
difference between the two runs, and the process RSS (and, on a GPU, the device memory in use) before
load, while loaded and after close. Then
the pairwise mode on the first --pairwise-n instructions: K(K-1) ordered pairs per instruction.

    python benchmarks/judge.py --gguf recipes/tiny/judge.gguf --n 64 --k 8
"""

import argparse
import os
import random
import time

from minitpo import llamacpp
from minitpo.judges import llama as judge
from minitpo.config import JudgeConfig

WORDS = ("model data answer question simple clear detail because result example explain reason method "
         "value change first second final small large useful careful step note").split()


def synthetic_groups(n: int, k: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n instructions of ~40 words, each followed by k responses of ~30-120 words."""
    rng = random.Random(seed)
    instructions, responses = [], []
    for i in range(n):
        instruction = f"Instruction {i}: " + " ".join(rng.choices(WORDS, k=40)) + "?"
        for _ in range(k):
            instructions.append(instruction)
            responses.append(" ".join(rng.choices(WORDS, k=rng.randint(30, 120))) + ".")
    return instructions, responses


def rss_mib() -> float:
    with open("/proc/self/statm") as f:  # Linux: sizes in pages; the second field is the resident set
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_used_mib() -> float | None:
    """Memory in use on the GPU, every process and library (llama.cpp's CUDA buffers are not torch's)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, help="judge model file")
    ap.add_argument("--n", type=int, default=64, help="instructions")
    ap.add_argument("--k", type=int, default=8, help="responses per instruction")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-gpu-layers", type=int, default=-1, help="-1 = all layers on the GPU")
    ap.add_argument("--pairwise-n", type=int, default=8, help="instructions judged in pairwise mode")
    args = ap.parse_args()

    cfg = JudgeConfig(model=args.gguf, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers)
    instructions, responses = synthetic_groups(args.n, args.k)
    template = judge.load_prompt_template(None)
    import llama_cpp  # noqa: F401  (import first: its shared libraries are not what close() frees)

    gpu_before = gpu_used_mib()  # first: it imports torch, which the RSS numbers then all include
    rss_before = rss_mib()
    with llamacpp.open_llama_judge(cfg) as llm:
        rss_loaded, gpu_loaded = rss_mib(), gpu_used_mib()
        judge.score_with_llama(llm, template, instructions[:2], responses[:2])  # warm-up
        runs = {}
        for reuse in (False, True):
            t0 = time.perf_counter()
            runs[reuse] = judge.score_with_llama(llm, template, instructions, responses, reuse_prefix=reuse)
            runs[reuse, "s"] = time.perf_counter() - t0
        turn = llamacpp.model_chat_turn(llm)
        n_tokens = [len(llamacpp.tokenize_prompt(llm, judge.judge_prompt_parts(template, i, r, turn)))
                    for i, r in zip(instructions[: args.k], responses[: args.k])]
    rss_closed = rss_mib()

    n = len(responses)
    max_diff = max(abs(a["score"] - b["score"]) for a, b in zip(runs[False], runs[True]))
    mass = sum(r["score_mass"] for r in runs[True]) / n
    print(f"judge {args.gguf}: {args.n} instructions x {args.k} responses = {n}, "
          f"~{sum(n_tokens) / len(n_tokens):.0f} prompt tokens each")
    print(f"  no prefix reuse: {n / runs[False, 's']:8.1f} responses/s ({runs[False, 's']:.2f} s)")
    print(f"  prefix reuse:    {n / runs[True, 's']:8.1f} responses/s ({runs[True, 's']:.2f} s), "
          f"speedup x{runs[False, 's'] / runs[True, 's']:.2f}")
    print(f"  max |score difference| {max_diff:.2e}; mean score_mass {mass:.3f}")
    print(f"  RSS MiB: before load {rss_before:.0f}, loaded {rss_loaded:.0f}, after close {rss_closed:.0f}")
    if gpu_before is not None:
        print(f"  GPU MiB in use: before load {gpu_before:.0f}, loaded {gpu_loaded:.0f} (llama.cpp: "
              f"{gpu_loaded - gpu_before:.0f}, weights, KV cache and compute buffers), after close {gpu_used_mib():.0f}")

    from minitpo.judges.pairwise import judge_pairwise

    k = args.k
    groups = [(instructions[g * k], responses[g * k:(g + 1) * k]) for g in range(min(args.pairwise_n, args.n))]
    t0 = time.perf_counter()
    _, stats = judge_pairwise(cfg, groups, progress=False)
    seconds = time.perf_counter() - t0
    print(f"  pairwise mode:   {len(groups) * k / seconds:8.1f} responses/s ({stats['pairs_judged'] / seconds:.1f} "
          f"ordered pairs/s, {k * (k - 1)} per instruction; model load included); "
          f"position consistency {stats['position_consistency']:.2f}")


if __name__ == "__main__":
    main()
