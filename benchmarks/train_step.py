"""Time one DPO training step with naive (full-logits) and lean (chunked) sequence log-probs, side by side.

One step = one forward of the chosen and rejected sequences concatenated into a (2B, T) batch, the sigmoid
DPO loss, backward, and an AdamW step on the LoRA weights. The reference log-probs are computed once before
timing (adapters off, no grad) and reused: they are the same for both variants. Both variants run in
this one process on the same model and batch, each starting from the same LoRA weights with a fresh
optimizer; a few warm-up steps, then timed steps. That is one round; --rounds repeats it with the order of
the variants alternating (lean first, then naive first, ...), and step times are averaged over the rounds:
on an H100 whichever variant ran first was 5-10% slower, both ways round, so a single order biases the ratio.

Reported per variant: seconds per step, tokens per second (real, non-padding tokens of the 2B sequences)
and peak memory: on CUDA torch.cuda.max_memory_allocated (weights included; reset after warm-up); on CPU the
process's peak resident set size, VmHWM from /proc/self/status, reset through /proc/self/clear_refs before
each variant (Linux). Memory is the smallest over the rounds: on CPU, memory the allocator keeps after
naive's large tensors inflates the peak RSS of whatever runs next, so lean's true peak is the round it ran first.

    # CPU, about a minute: a 2-layer model with Qwen2.5's 151,936-token vocabulary
    python benchmarks/train_step.py --shape tiny --batch 2 --seq-len 256 --steps 3
    # one H100: Qwen2.5-1.5B's shape with random weights, QLoRA
    python benchmarks/train_step.py --shape qwen1.5b --quant nf4 --batch 8 --seq-len 1024 --steps 5 --rounds 4

On CUDA the base weights are bf16 (NF4 with bf16 compute for --quant nf4) under bf16 autocast, LoRA weights
float32; on CPU everything is float32.
"""

import argparse
import contextlib
import functools
import os
import resource
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minitpo.device import reset_peak_rss, rss_bytes  # noqa: E402
from minitpo.logps import naive_sequence_logps, sequence_logps  # noqa: E402
from minitpo.loss import dpo_loss  # noqa: E402

# Random weights: RoPE base and norm epsilon don't change the cost, so only the sizes are set.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args, device, dtype):
    """Qwen2 of the chosen shape with random weights, optionally NF4-quantized, with LoRA adapters."""
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(4096, args.seq_len))
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU: 1.5B weights init slowly on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if args.quant == "nf4":
        # Round trip through disk: from_pretrained with a BitsAndBytesConfig is the tested way to get the
        # Linear4bit layers (lm_head and embeddings stay in `dtype`, as in QLoRA).
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                         device_map={"": str(device)})
    model.requires_grad_(False)
    if args.checkpointing:
        # Non-reentrant checkpointing needs no enable_input_require_grads(): that hook only exists because
        # reentrant checkpointing drops gradients when no input of a segment requires grad.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)  # LoRA weights float32 (peft's autocast_adapter_dtype)
    # peft starts B at zero (policy == reference, loss exactly log 2); small random B instead makes the
    # first loss a check that both variants compute the same thing.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1e-3)
    model.train()  # HF only checkpoints in training mode; all dropouts are 0
    return model


def make_batch(args, vocab_size, device):
    """(2B, T) chosen rows then rejected rows: a T/4-token prompt, right padding to lengths in [3T/4, T]."""
    g = torch.Generator().manual_seed(0)
    rows, seq_len = 2 * args.batch, args.seq_len
    lengths = torch.randint(3 * seq_len // 4, seq_len + 1, (rows,), generator=g)
    lengths[0] = seq_len  # at least one full row, so T is really used
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (2B, T)
    input_ids = torch.randint(1, vocab_size, (rows, seq_len), generator=g) * attention_mask  # pad id 0
    completion_mask = attention_mask.clone()
    completion_mask[:, : seq_len // 4] = 0
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()  # Linux: VmHWM back to the current RSS; nothing without /proc


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return rss_bytes("VmHWM") / 2**30
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # not resettable: whole-process peak


def current_memory_gib(device):
    """Memory held before a variant's first step (weights, optimizer-free): the base its peak adds to."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return rss_bytes("VmRSS") / 2**30


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, logps_fn, batch, ref_chosen_logps, ref_rejected_logps, autocast):
    """Forward chosen+rejected, DPO loss, backward, optimizer step; returns the loss as a float."""
    with autocast():
        logps, _ = logps_fn(model, *batch)  # (2B,)
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)
    losses, _, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1)
    loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_variant(model, logps_fn, batch, refs, lora_init, args, device, autocast):
    """Warm-up then timed steps from the same starting LoRA weights; returns the measurements."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, init in zip(trainable, lora_init):
            p.copy_(init)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    n_tokens = int(batch[1].sum())
    synchronize(device)
    start_gib = current_memory_gib(device)
    try:
        reset_peak_memory(device)  # the warm-up's peak counts on CPU, where VmHWM can't be read per step
        first_loss = train_step(model, optimizer, logps_fn, batch, *refs, autocast)
        for _ in range(args.warmup - 1):
            train_step(model, optimizer, logps_fn, batch, *refs, autocast)
        synchronize(device)
        if device.type == "cuda":
            reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, logps_fn, batch, *refs, autocast)
        synchronize(device)
        step_s = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return None
    peak_gib = peak_memory_gib(device)
    return dict(step_s=step_s, tokens_per_s=n_tokens / step_s, peak_gib=peak_gib, step_gib=peak_gib - start_gib,
                first_loss=first_loss)


def summarize(runs, n_tokens):
    """One variant's rounds -> mean step time (and the tokens/s it gives), memory the smallest (see the
    docstring)."""
    if any(run is None for run in runs):
        return None
    step_s = sum(run["step_s"] for run in runs) / len(runs)
    return dict(step_s=step_s, tokens_per_s=n_tokens / step_s,
                peak_gib=min(run["peak_gib"] for run in runs), step_gib=min(run["step_gib"] for run in runs),
                first_loss=runs[0]["first_loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step (2x sequences)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--quant", choices=["nf4", "none"], default="none")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (at least 1)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="lean variant: tokens per logits chunk")
    parser.add_argument("--profile", action="store_true", help="then profile one more step per variant and print "
                        "the operators that took the most time (torch.profiler)")
    parser.add_argument("--trace-dir", help="with --profile: also write each variant's Chrome trace here (gzipped)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat warm-up + timed steps of both variants, "
                        "alternating which runs first; times are averaged over rounds")
    args = parser.parse_args()
    assert args.warmup >= 1 and args.rounds >= 1, "--warmup and --rounds must be at least 1"

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda:0": explicit for device_map
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    model = build_model(args, device, dtype)
    batch = make_batch(args, SHAPES[args.shape]["vocab_size"], device)
    lora_init = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), model.disable_adapter(), autocast():
        ref_logps, _ = sequence_logps(model, *batch, chunk_size=args.chunk_size)
    refs = ref_logps.float().chunk(2)

    n_trainable = sum(p.numel() for p in lora_init)
    memory_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{str(dtype).removeprefix('torch.')}, shape {args.shape}, quant {args.quant}, LoRA r {args.lora_r} "
          f"({n_trainable / 1e6:.1f}M trainable), checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"batch {args.batch} pairs x {args.seq_len} tokens, {int(batch[1].sum())} real tokens/step, "
          f"{int(batch[2][:, 1:].sum())} scored; chunk {args.chunk_size}; {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.rounds} rounds; memory = {memory_kind}")

    variants = {
        "lean": functools.partial(sequence_logps, chunk_size=args.chunk_size),
        "naive": naive_sequence_logps,
    }
    order = list(variants)
    rounds = {name: [] for name in order}
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            rounds[name].append(run_variant(model, variants[name], batch, refs, lora_init, args, device, autocast))
    results = {name: summarize(runs, int(batch[1].sum())) for name, runs in rounds.items()}
    for name in order:
        if results[name]:
            print(f"{name} step_s per round: " + ", ".join(f"{run['step_s']:.3f}" for run in rounds[name]))

    # peak_GiB: the whole process (CPU) or all CUDA tensors, weights included; step_GiB: peak minus what was
    # held before the variant's first step, i.e. what the training step itself adds.
    columns = ["step_s", "tokens_per_s", "peak_gib", "step_gib"]
    print(f"\n{'variant':<12}{'step_s':>10}{'tokens/s':>12}{'peak_GiB':>11}{'step_GiB':>11}{'first_loss':>12}")
    for name in ("naive", "lean"):
        r = results[name]
        if r is None:
            print(f"{name:<12}{'out of memory':>33}")
            continue
        print(f"{name:<12}{r['step_s']:>10.3f}{r['tokens_per_s']:>12.0f}{r['peak_gib']:>11.2f}{r['step_gib']:>11.2f}"
              f"{r['first_loss']:>12.6f}")
    if results["naive"] and results["lean"]:
        ratios = [results["lean"][c] / results["naive"][c] for c in columns]
        print(f"{'lean/naive':<12}{ratios[0]:>10.2f}{ratios[1]:>12.2f}{ratios[2]:>11.2f}{ratios[3]:>11.2f}")
    if args.profile:
        for name, fn in variants.items():
            profile_step(name, model, fn, batch, refs, device, autocast, args.trace_dir)


def profile_step(name, model, logps_fn, batch, refs, device, autocast, trace_dir):
    """One more step under torch.profiler; prints the 15 operators with the most self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(model, optimizer, logps_fn, batch, *refs, autocast)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{name}: operators by self time")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=50))
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"{name}.json.gz"))


if __name__ == "__main__":
    main()
