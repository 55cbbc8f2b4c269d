"""The sampling copy: a dense copy of the policy for the fast sampler (minitpo/engine.py).

Consumes the policy as the loop holds it (a transformers causal LM, optionally a peft LoRA model,
optionally on an NF4 bitsandbytes base). Produces the same architecture with plain weights: NF4
dequantized, the active LoRA merged (W + B @ A * scale, in fp32, rounded once), in the dtype asked
for. Dequantizing NF4 at every decode step and running the LoRA matmuls unmerged is what made plain
`generate` on a QLoRA policy slow (engine.py's docstring has the numbers). `decode_attention` is the
attention the copy runs: sdpa with query heads folded into their K/V groups for one-token decode.
"""

import copy

import torch

from minitpo.model import hf_model


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention interface: sdpa, but for one query token the query heads are folded into their
    K/V-head groups, (B, H, 1, D) -> (B, H_kv, H / H_kv, D), so K and V are read as they are instead
    of being copied H / H_kv times (HF's repeat_kv, which it also uses under torch.compile)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, n_heads, n_query, head_dim = query.shape
    if n_query != 1 or key.shape[1] == n_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.view(batch, key.shape[1], n_heads // key.shape[1], head_dim)  # head h uses K/V head h // group
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, n_heads, 1, head_dim).transpose(1, 2), None  # (B, 1, H, D) like HF


def build_sampling_model(model, dtype, device):
    """A dense copy of the policy for sampling: NF4 weights dequantized, active LoRA adapters merged,
    everything in `dtype` on `device`. The policy itself is not touched."""
    base = hf_model(model)
    from transformers import AttentionInterface

    AttentionInterface.register("minitpo_decode", decode_attention)  # idempotent
    config = copy.deepcopy(base.config)
    config._attn_implementation = "minitpo_decode"  # takes our boolean masks, like sdpa
    with torch.device("meta"):
        dense = type(base)(config)
    load_dense_weights(dense, base, dtype, device)
    return dense.eval().requires_grad_(False)


def load_dense_weights(dense, model, dtype, device):
    """Fill `dense` from the policy (tied parameters share one tensor), in place once filled, so a
    CUDA graph recorded on `dense` stays valid when the LoRA weights change between iterations."""
    base = hf_model(model)
    tied = {}
    for name, p in dense.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():
        w = _dense_tensor(base, names[0]).to(device=device, dtype=dtype)  # one matrix at a time
        old = dense.get_parameter(names[0])
        if old.is_meta:
            new = torch.nn.Parameter(w, requires_grad=False)
            for name in names:
                mod, _, attr = name.rpartition(".")
                setattr(dense.get_submodule(mod), attr, new)
        else:
            old.data.copy_(w)
    for name, b in dense.named_buffers():  # RoPE inv_freq, embedding scales: kept in their dtype
        if b.is_meta:
            mod, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(mod), attr, base.get_buffer(name).to(device).clone())


def _dense_tensor(base, name):
    """The plain tensor behind parameter `name` of the policy: LoRA merged, NF4 dequantized."""
    mod_name, _, attr = name.rpartition(".")
    mod = base.get_submodule(mod_name)
    if hasattr(mod, "modules_to_save") and hasattr(mod, "original_module"):  # peft full-trained copy
        act = [a for a in mod.active_adapters if a in mod.modules_to_save]
        mod = mod.modules_to_save[act[0]] if act and not mod.disable_adapters else mod.original_module
    lora = hasattr(mod, "lora_A")
    if hasattr(mod, "base_layer") and not lora:
        raise NotImplementedError(f"{mod_name}: only LoRA adapters can be merged, not {type(mod).__name__}")
    layer = mod.get_base_layer() if lora else mod
    t = getattr(layer, attr)
    if hasattr(t, "quant_state"):  # bitsandbytes Params4bit: packed uint8 -> (out, in) compute dtype
        import bitsandbytes as bnb

        if getattr(t.quant_state, "packing_format_for_cpu", False):
            # bnb repacked it for its AVX512-BF16 CPU kernel (tests only): read W back through that
            # kernel, I @ W.T, exact since each output is a single product with 1.0
            eye = torch.eye(layer.in_features, dtype=layer.compute_dtype or torch.float32)
            t = bnb.matmul_4bit(eye, t, quant_state=t.quant_state).T
        else:
            t = bnb.functional.dequantize_4bit(t.data, t.quant_state)
    if lora and attr == "weight" and not mod.merged and not mod.disable_adapters:
        t = t.float()  # merge in fp32, round once
        for a in mod.active_adapters:
            if a in mod.lora_A:
                if mod.use_dora.get(a) or getattr(mod, "lora_bias", {}).get(a):
                    raise NotImplementedError(f"{mod_name}: DoRA and LoRA bias are not merged here")
                t = t + mod.get_delta_weight(a).float()  # B @ A * scale, (out, in)
    return t.detach()
