"""The plan: each stage's peak memory, and an estimate of its time, before any weights load.

Consumes a `Recipe`, the memory of the card (or none: report only) and the models' configs alone (a
folder's config.json, a GGUF's metadata, the Hugging Face cache, or KNOWN_CONFIGS below when none of
those is here: planning works offline for the shipped recipes). Produces a dict, `plan_text` of it, and
`stage_peaks` of it for iter-N/stages.json. Sizes are GiB (2**30 bytes), as torch reports them; a
"12 GB" card is taken as 12 GiB, less CUDA_CONTEXT for what lives outside torch's allocator.

What a stage holds at its peak (e: bytes of the compute dtype, 2 (bf16) on a GPU, 4 (float32) on a CPU):
  policy     resident in every stage: NF4 linear weights at NF4_BYTES a weight and the rest (embeddings,
             norms, an untied lm_head) at e, or every weight at e; LoRA's A and B in float32.
  sample     policy + the engine's dense copy (every weight at e) + slots x engine.slot_bytes (K/V over
             prompt + max_new_tokens columns, and the sampling workspace), the slots as engine.fit_slots
             picks them for this memory + one prefill block's layer activations (engine.PREFILL_TOKENS).
  judge      policy + llama.cpp's share on this device: the GGUF file, its f16 K/V over n_ctx and the
             attention scores of one batch (llamacpp.n_batch); or a reward model's weights and one batch's forward.
  reference  policy + a forward without gradients over 2 x train.batch_size rows: one layer's activations,
             the final hidden states and one chunk of log-probs (logps.py).
  train      policy + LoRA gradients and Adam's two moments (float32) + activations: with checkpointing every
             layer's input and one layer's saved tensors, recomputed; without, every layer's + the backward
             of one layer + the chunked log-probs' buffers (logps.py: c x V x 10 bytes with a bf16 lm_head).
A row is at most the longest prompt + max_new_tokens (+ the marker), capped at train.max_length.
"""

import math
from pathlib import Path

from minitpo import engine
from minitpo.config import Recipe
from minitpo.errors import UserError
from minitpo.llamacpp import n_batch

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight, 8-bit absmax per 64, float32 absmax per 256 blocks
CUDA_CONTEXT = GIB // 2  # the CUDA context and kernels: outside torch's allocator and its peaks
CHARS_PER_TOKEN = 4  # English BPE; the CLI's prompt length when the instructions are not tokenized
MARKER_TOKENS = 8  # a forced marker, EOS: what a pair's row holds beyond the sampled tokens

# Configs of the shipped recipes' models (their config.json on the Hub), for planning offline.
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-1.5B-Instruct": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                                vocab_size=128256, tie_word_embeddings=False,
                                                max_position_embeddings=8192),
}
# GGUF judges of the shipped recipes by file name: bytes (the Hub's listed size), layers, heads, K/V heads,
# head width, vocabulary. A judge file that is here is read instead (its size and metadata).
KNOWN_JUDGES = {
    "qwen2.5-7b-instruct-q4_k_m.gguf": (4.68e9, 28, 28, 4, 128, 152064),
    "llama-3.1-8b-instruct-q4_k_m.gguf": (4.92e9, 32, 32, 8, 128, 128256),
}
# Speeds measured in benchmarks/RESULTS.md, scaled by parameter count to other models (tokens/s at params).
GPU_SAMPLE = {64: 8_800, 256: 20_299}  # H100, Qwen2.5-1.5B shape, tokens/s at 64 and 256 slots
GPU_TRAIN = 20_206  # H100, Qwen2.5-1.5B NF4 + LoRA, DPO step tokens/s (8 pairs x 1,024, checkpointing)
CPU_SAMPLE = 129  # 2 cores, SmolLM2-135M float32, batch 128, tokens/s
MEASURED_PARAMS = {"cuda": 1_543_714_304, "cpu": 134_515_008}


def load_config(model: str):
    """(the policy's transformers config, where it came from), without its weights."""
    from transformers import AutoConfig

    from minitpo.recipe import PACKAGED_MODELS, packaged_model_path

    if model in PACKAGED_MODELS:
        model = packaged_model_path(model)
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), f"{path.name}'s metadata"
    if path.is_dir():
        return AutoConfig.from_pretrained(model), f"{path.name}/config.json"
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), "the Hugging Face cache"
    except (OSError, ValueError):
        pass
    if model in KNOWN_CONFIGS:
        numbers = dict(KNOWN_CONFIGS[model])
        return AutoConfig.for_model(numbers.pop("model_type"), **numbers), "minitpo's table (not cached here)"
    try:
        return AutoConfig.from_pretrained(model), "the Hub (config.json)"
    except (OSError, ValueError) as e:
        raise UserError(f"policy.model: no config for {model!r} ({str(e).splitlines()[0][:100]}); give a local "
                        "folder or a Hub id that is cached or reachable") from None


def model_shape(config, targets=(), r: int = 0) -> dict:
    """Parameter counts of `config`'s causal LM, built on the meta device (no memory, no weights):
    all, those in the Linear layers NF4 quantizes (all but lm_head), LoRA's for `targets` at rank r,
    and per layer the inputs of the LoRA targets (dropout copies them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    head = lm.get_output_embeddings()
    linears = [(n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    lora = [m for n, m in linears if n.rsplit(".", 1)[-1] in targets]
    text = config.get_text_config()
    return {"params": sum(p.numel() for p in lm.parameters()),
            "linear": sum(m.weight.numel() for _, m in linears),
            "largest_linear": max(m.weight.numel() for _, m in linears),
            "lora": sum(r * (m.in_features + m.out_features) for m in lora),
            "lora_inputs": sum(m.in_features for m in lora) // text.num_hidden_layers}


def _dims(config) -> dict:
    from minitpo.model import attention_head_dim

    c = config.get_text_config()
    hd = attention_head_dim(c)
    return dict(H=c.hidden_size, I=c.intermediate_size, L=c.num_hidden_layers, V=c.vocab_size,
                q=c.num_attention_heads * hd, kv=c.num_key_value_heads * hd)


def layer_forward_bytes(d: dict, tokens: int, e: int) -> int:
    """One decoder layer's tensors alive at once in a forward without gradients: the residual, its
    normed copy (and the float32 upcast of the norm), q, k, v, the attention output, gate, up, act."""
    return tokens * (e * (3 * d["H"] + 2 * d["q"] + 2 * d["kv"] + 3 * d["I"]) + 4 * d["H"])


def layer_saved_bytes(d: dict, tokens: int, e: int, dropout_inputs: int) -> int:
    """What one decoder layer keeps for backward: two norms' float32 inputs and outputs, q, k, v and the
    attention output (sdpa saves them; no T x T scores), gate, up, act(gate), act*up; with LoRA dropout
    each target's dropped input and its mask."""
    return tokens * (8 * d["H"] + e * (2 * d["H"] + 2 * d["q"] + 2 * d["kv"] + 4 * d["I"]) + (e + 1) * dropout_inputs)


def _gib(n: float) -> float:
    return round(n / GIB, 3)


def judge_need(cfg, device: str, e: int, rows: int) -> tuple[float | None, dict, str]:
    """(bytes the judge adds on `device`, its parts, what they are) for the recipe's judge; None: unknown."""
    if cfg.type == "python":
        return 0, {}, "a Python function: no model"
    if cfg.type == "reward_model":
        config = load_config(cfg.model)[0]
        shape, d = model_shape(config), _dims(config)
        w = shape["linear"] * (NF4_BYTES if cfg.quantization == "nf4" else e) + (shape["params"] - shape["linear"]) * e
        act = layer_forward_bytes(d, cfg.batch_size * rows, e)
        return w + act, {"weights": _gib(w), "forward": _gib(act)}, "reward model"
    from minitpo.recipe import PACKAGED_MODELS, packaged_model_path

    model = packaged_model_path(cfg.model, "judge.model") if cfg.model in PACKAGED_MODELS else cfg.model
    name = Path(model).name.lower()
    if Path(model).is_file():
        size, L, heads, kv_heads, hd, vocab = _gguf_shape(model)
        where = "its file"
    elif name in KNOWN_JUDGES:
        size, L, heads, kv_heads, hd, vocab = KNOWN_JUDGES[name]
        where = "minitpo's table (the file is not here)"
    else:
        return None, {}, f"{cfg.model} is not here and not in minitpo's table: unknown"
    on = 1.0 if device == "cpu" or cfg.n_gpu_layers < 0 else min(cfg.n_gpu_layers, L) / L
    kv = cfg.n_ctx * L * 2 * kv_heads * hd * 2 * on  # f16 K and V
    scores = n_batch(cfg.n_ctx) * cfg.n_ctx * heads * 4 * (on > 0)  # one batch's float32 attention scores
    parts = {"gguf": _gib(size * on), "kv": _gib(kv), "scores": _gib(scores)}
    return size * on + kv + scores, parts, f"llama.cpp, {Path(model).name} from {where}"


def _gguf_shape(path: str):
    import gguf

    f = gguf.GGUFReader(path).fields
    arch = f["general.architecture"].contents()

    def get(key, default=None):
        field = f.get(f"{arch}.{key}")
        if field is None:
            return default
        v = field.contents()
        return max(v) if isinstance(v, list) else v
    heads = get("attention.head_count")
    hd = get("attention.key_length") or get("embedding_length") // heads
    return (Path(path).stat().st_size, get("block_count"), heads, get("attention.head_count_kv", heads), hd,
            len(f["tokenizer.ggml.tokens"].data))


def plan_recipe(recipe: Recipe, gpu_memory_gb: float | None, device: str = "cuda",
                prompt_tokens: int | None = None) -> dict:
    """Each stage's predicted peak for `recipe` on `device` with `gpu_memory_gb` (None: no limit known,
    report only), whether it fits, the setting to lower when not, and time estimates.
    prompt_tokens: the longest prompt (default: data.max_chars / CHARS_PER_TOKEN + the template)."""
    from minitpo.device import cpu_has_native_bf16
    from minitpo.prompts import load_template

    pol, s, tr = recipe.policy, recipe.sampling, recipe.train
    config, source = load_config(pol.model)
    shape, d = model_shape(config, pol.target_modules, pol.lora_r), _dims(config)
    e = {"float32": 4, "bfloat16": 2, "float16": 2}.get(pol.dtype, 2 if device == "cuda" else 4)
    e_act = 2 if device == "cuda" or tr.autocast == "bfloat16" or (tr.autocast == "auto" and cpu_has_native_bf16()) else e
    if prompt_tokens is None:
        template = load_template(recipe.thought)
        prompt_tokens = math.ceil((recipe.data.max_chars + len(template.text)) / CHARS_PER_TOKEN)
    nf4 = pol.quantization == "nf4"
    weights = shape["linear"] * NF4_BYTES + (shape["params"] - shape["linear"]) * e if nf4 else shape["params"] * e
    lora = shape["lora"] * 4
    resident = weights + lora
    dequant = shape["largest_linear"] * e if nf4 else 0  # NF4 matmuls dequantize one weight at a time
    limit = None if gpu_memory_gb is None else gpu_memory_gb * GIB - (CUDA_CONTEXT if device == "cuda" else 0)

    # sample: the slots engine.fit_slots would choose with what the policy leaves free
    n_cols = engine.cache_columns(prompt_tokens, s.max_new_tokens)
    per_slot = engine.slot_bytes(config, n_cols, e)
    copy = shape["params"] * e
    free = (limit - resident - engine.RESERVE_BYTES) if limit is not None else 2**62
    want = engine.wanted_slots(s.batch_size, recipe.data.per_iteration * s.k)
    budget = None if s.memory_gb is None else int(s.memory_gb * GIB)
    use_copy, slots = engine.fit_slots(int(free), copy, per_slot, want, budget)
    prefill = layer_forward_bytes(d, min(engine.PREFILL_TOKENS, recipe.data.per_iteration * prompt_tokens), e)
    sample = {"policy": resident, "copy": copy if use_copy else 0, "kv_cache": slots * per_slot,
              "prefill": prefill + (0 if use_copy else dequant)}

    judge_bytes, judge_parts, judge_what = judge_need(recipe.judge, device, e, prompt_tokens + s.max_new_tokens)

    row = min(tr.max_length, prompt_tokens + s.max_new_tokens + MARKER_TOKENS)
    tokens = 2 * tr.batch_size * row
    head_fwd = tokens * d["H"] * e_act * 2 + tr.logps_chunk * d["V"] * (e_act + 4)  # final + scored hidden, a chunk
    reference = {"policy": resident, "layer": layer_forward_bytes(d, tokens, e_act) + dequant, "log_probs": head_fwd}
    checkpointing = nf4 if tr.gradient_checkpointing is None else tr.gradient_checkpointing
    dropout_inputs = shape["lora_inputs"] if pol.lora_dropout > 0 else 0
    saved = layer_saved_bytes(d, tokens, e_act, dropout_inputs)
    activations = (d["L"] * tokens * d["H"] * e_act + saved) if checkpointing else d["L"] * saved
    backward = tokens * e_act * (2 * d["H"] + 2 * d["I"]) + dequant
    train = {"policy": resident, "lora_grad_adam": shape["lora"] * 4 * 3, "activations": activations,
             "backward": backward, "log_probs": tokens * d["H"] * e_act * 3 + tr.logps_chunk * d["V"] * (2 * e_act + 6)}

    stages = {
        "sample": _stage(sample, f"{slots} slots x {per_slot / 2**20:.1f} MiB ({n_cols} columns)"
                                 + ("" if use_copy else ", no dense copy: the policy samples in place"),
                         "sampling.batch_size (or sampling.memory_gb, sampling.max_new_tokens)"),
        "judge": _stage({"policy": resident, **{k: v * GIB for k, v in judge_parts.items()}} if judge_bytes is not None
                        else None, judge_what, "judge.n_ctx, judge.n_gpu_layers or a smaller judge.model"
                        if recipe.judge.type == "llama_cpp" else "judge.batch_size or judge.quantization=nf4"),
        "reference": _stage(reference, f"{2 * tr.batch_size} rows x {row} tokens, no gradients",
                            "train.batch_size or train.max_length"),
        "train": _stage(train, f"{2 * tr.batch_size} rows x {row} tokens, checkpointing {'on' if checkpointing else 'off'}",
                        "train.batch_size (raise train.grad_accum to keep the update) or train.max_length"),
    }
    _estimate_times(stages, recipe, device, shape["params"], slots, row)
    known = {k: v for k, v in stages.items() if v["peak_gb"] is not None}
    over = {k: v for k, v in known.items() if limit is not None and v["peak_gb"] * GIB > limit}
    largest = max(over or known, key=lambda k: known[k]["peak_gb"])  # the largest that does not fit, if any
    fits = None if limit is None else not over
    return {"fits": fits, "gpu_memory_gb": gpu_memory_gb, "device": device, "largest": largest,
            "lower": None if fits in (None, True) else stages[largest]["knob"],
            "policy": {"model": pol.model, "config": source, "params": shape["params"], "lora_params": shape["lora"],
                       "weights_gb": _gib(weights), "prompt_tokens": prompt_tokens},
            "stages": stages}


def _stage(parts: dict | None, what: str, knob: str) -> dict:
    if parts is None:
        return {"peak_gb": None, "parts": {}, "what": what, "knob": knob}
    return {"peak_gb": _gib(sum(parts.values())), "parts": {k: _gib(v) for k, v in parts.items()}, "what": what,
            "knob": knob}


def _estimate_times(stages: dict, recipe: Recipe, device: str, params: int, slots: int, row: int) -> None:
    """Seconds per iteration from the speeds measured in benchmarks/RESULTS.md, scaled by parameter count;
    an estimate, and an upper one (every candidate at its max_new_tokens, every row at its longest)."""
    scale = MEASURED_PARAMS[device] / params
    n = recipe.data.per_iteration
    sampled = n * recipe.sampling.k * recipe.sampling.max_new_tokens
    if device == "cuda":
        lo, hi = GPU_SAMPLE[64], GPU_SAMPLE[256]
        tok_s = lo * slots / 64 if slots < 64 else lo + (hi - lo) * (min(slots, 256) - 64) / 192
        speeds = {"sample": tok_s, "train": GPU_TRAIN, "reference": 4 * GPU_TRAIN}  # a forward: ~1/4 of a checkpointed step
    else:
        speeds = {"sample": CPU_SAMPLE}
    tokens = {"sample": sampled, "reference": n * 2 * row, "train": recipe.train.epochs * n * 2 * row}
    for name, stage in stages.items():
        speed = speeds.get(name)
        stage["time_s"] = round(tokens[name] / (speed * scale)) if speed else None
        stage["time_note"] = "estimate" if speed else "no measured speed"


def stage_peaks(plan: dict) -> dict:
    """{stage name in stages.json: predicted peak GiB}: the plan's reference is the pair stage."""
    return {("pair" if k == "reference" else k): v["peak_gb"] for k, v in plan["stages"].items()}


def _time(s: int | None) -> str:
    if s is None:
        return "time: no measured speed"
    return f"~{s / 3600:.1f} h (estimate)" if s >= 5400 else f"~{max(1, round(s / 60))} min (estimate)"


def _size(gib: float) -> str:
    return f"{gib:.2f}" if gib >= 0.1 else f"{gib:.3f}"


def plan_text(plan: dict, name: str = "recipe") -> str:
    """The plan as the compact block `minitpo plan` and `minitpo run` print."""
    p = plan["policy"]
    where = f"a {plan['gpu_memory_gb']:g} GiB GPU" if plan["gpu_memory_gb"] is not None else (
        "the GPU" if plan["device"] == "cuda" else "the CPU")
    params = f"{p['params'] / 1e9:.2f}B" if p["params"] >= 1e9 else f"{p['params'] / 1e6:.1f}M"
    lines = [f"plan: {name} on {where}: {p['model']} ({params} params, config from {p['config']}; "
             f"weights {_size(p['weights_gb'])} GiB)"]
    for stage, v in plan["stages"].items():
        peak = "     ?" if v["peak_gb"] is None else f"{_size(v['peak_gb']):>6}"
        parts = " + ".join(f"{k} {_size(x)}" for k, x in v["parts"].items() if x)
        lines.append(f"  {stage:<9} {peak} GiB  {parts} [{v['what']}]  {_time(v['time_s'])}")
    if plan["fits"] is None:
        lines.append("  fits: not checked (no GPU here: give --gpu-memory GB)")
    elif plan["fits"]:
        lines.append(f"  fits: yes (largest: {plan['largest']}, with {CUDA_CONTEXT / GIB} GiB for the CUDA context)")
    else:
        big = plan["stages"][plan["largest"]]
        lines.append(f"  fits: no: {plan['largest']} needs {big['peak_gb']} GiB + {CUDA_CONTEXT / GIB} for the CUDA "
                     f"context of {plan['gpu_memory_gb']:g}; lower {plan['lower']}")
    return "\n".join(lines)


def detected_gpu_memory() -> float | None:
    """This machine's GPU memory in GiB, or None without one."""
    import torch

    return round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if torch.cuda.is_available() else None
