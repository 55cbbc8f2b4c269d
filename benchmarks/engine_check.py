"""Do the engine's CUDA fast paths (CUDA graph, torch.compile) give the same greedy tokens as `generate`?

The unit tests check the engine against `generate` on CPU, where neither fast path exists. This script
runs the same comparison on a GPU: the tiny test models of tests/test_engine.py (Llama, Qwen2 with bias,
Gemma3 with a sliding window; weights init 0.2 so logits sit far apart), in bf16 on the GPU, greedy, 64
left-padded prompts of 1-40 tokens, 48 new tokens, one EOS id that some sequences emit. For each model it
prints how many sequences match `generate` exactly for: the engine eager, with CUDA graphs, and with
CUDA graphs + torch.compile. bf16 kernels differ between a batched generate and a slot cache, so an
occasional near-tie may flip; the fast paths must match as often as eager does.

    python benchmarks/engine_check.py              # on a GPU
    python benchmarks/engine_check.py --device cpu # smoke run: eager only
"""

import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from minitpo.config import SamplingConfig  # noqa: E402
from minitpo.engine import Sampler  # noqa: E402
from test_engine import PAD, tiny  # noqa: E402

MAX_NEW = 48


def hf_greedy(model, prompts, eos):
    """`generate` on a left-padded batch, cut at the first EOS: [(new tokens, stopped at EOS)]."""
    device = model.device
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=eos, pad_token_id=PAD)[:, width:].tolist()
    result = []
    for row in out:
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        result.append((row, False) if cut is None else (row[:cut], True))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 41, (64,), generator=g)]
    variants = {"eager": dict(cuda_graphs=False, compile=False)}
    if device.type == "cuda":
        variants |= {"cuda graphs": dict(cuda_graphs=True, compile=False),
                     "graphs + compile": dict(cuda_graphs=True, compile=True)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device={device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''} "
          f"dtype={dtype} torch={torch.__version__} prompts={len(prompts)} new_tokens={MAX_NEW}")
    for kind in ["llama", "qwen2", "gemma3"]:
        model = tiny(kind).to(device=device, dtype=dtype)
        rows = [r for r, _ in hf_greedy(model, prompts, [])]
        # an EOS id that some but not all greedy sequences emit, so both stop reasons are compared
        eos = [min({t for r in rows for t in r[1:]}, key=lambda t: abs(sum(t in r[1:] for r in rows) - len(rows) / 2))]
        expected = hf_greedy(model, prompts, eos)
        stops = sum(s for _, s in expected)
        line = f"{kind:<7} eos={eos[0]:<3} stopped {stops:>2}/{len(prompts)}:"
        for name, flags in variants.items():
            greedy = SamplingConfig(temperature=0.0, top_p=1.0, batch_size=len(prompts))
            with Sampler(model, greedy, eos_token_ids=eos, pad_token_id=PAD, **flags) as sampler:
                got = sampler.generate(prompts, max_new_tokens=MAX_NEW, seeds=[0] * len(prompts))
            same = sum(a == b for a, b in zip(got, expected))
            tokens = sum(len(a) for a, _ in expected)
            agree = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        for (a, _), (b, _) in zip(got, expected))
            line += f"  {name}: {same}/{len(prompts)} identical ({agree}/{tokens} tokens before a split)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
