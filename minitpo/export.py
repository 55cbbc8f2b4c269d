"""`minitpo export`: a trained adapter merged into its base model, for use outside minitpo.

Consumes a PATH that is either an iteration folder (RUN_DIR/iter-N) or a bare peft adapter folder,
resolved by minitpo.rundir.resolve_adapter. Produces one of:
  export_merged     a plain transformers model folder (base + LoRA merged, full precision, with the
                    tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft;
  export_gguf       one GGUF file of the merged model, or of the adapter alone (lora=True), for
                    llama.cpp and the tools built on it (the format itself: minitpo.gguf_export).
"""

import dataclasses
from pathlib import Path

import torch

from minitpo.errors import UserError
from minitpo.io import write_dir, write_file
from minitpo.model import load_policy
from minitpo.prompts import prefilled_chat_template
from minitpo.rundir import resolve_adapter


def export_merged(path: str | Path, out: str | Path) -> Path:
    """Merge the adapter of PATH into its base and save the result with its tokenizer into OUT.

    The base is loaded in float32, never NF4: merging adds (alpha / r) * B @ A to every target weight,
    and rounding that sum to 4 bits would throw most of the update away. The merged weights are then
    saved in the base's own dtype (float32 when its config names none), rounded once."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"OUT: {str(out)!r} already exists and is not empty; give a new folder or delete this one first")
    resolved = resolve_adapter(path)
    policy = dataclasses.replace(resolved.policy, quantization="none", dtype="float32")
    save_dtype = _own_dtype(policy.model)
    model, tokenizer = load_policy(policy, resolved.adapter_dir, device="cpu")
    merged = model.merge_and_unload(safe_merge=True).to(save_dtype).eval()  # safe_merge: fail on NaN
    if isinstance(tokenizer.chat_template, str):  # with thought.prefill, the chat template opens the thought as training did
        tokenizer.chat_template = prefilled_chat_template(tokenizer.chat_template, resolved.template)

    def fill(tmp: Path):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_dir(out, fill)
    return out


def export_gguf(path: str | Path, out: str | Path, qtype: str = "f16", lora: bool = False) -> Path:
    """Write OUT, a GGUF file: the merged model in `qtype` (f16, q8_0, f32), or with `lora` the adapter
    alone in llama.cpp's LoRA format; either carries the run's thought template (gguf_export.thought_metadata). The architecture and OUT are checked before any weight loads; a
    merged file whose tokenizer llama.cpp reads differently is refused, and OUT is left unwritten."""
    from minitpo import gguf_export

    out = Path(out)
    gguf_export.check_out(out)
    resolved = resolve_adapter(path)
    arch = gguf_export.architecture(resolved.policy.model)
    policy = dataclasses.replace(resolved.policy, quantization="none", dtype="float32")
    model, tokenizer = load_policy(policy, resolved.adapter_dir, device="cpu")
    if lora:  # llama.cpp prompts with the base file's chat template, not an adapter's
        extra = gguf_export.thought_metadata(resolved.template)
        write_file(out, lambda tmp: gguf_export.write_lora_gguf(model, tmp, arch, extra))
        return out
    extra = gguf_export.thought_metadata(resolved.template, tokenizer)
    merged = model.merge_and_unload(safe_merge=True).eval()
    source = policy.model if policy.model.endswith(".gguf") else None

    def fill(tmp: Path):
        gguf_export.write_model_gguf(merged, tokenizer, tmp, arch, qtype, source, extra)
        gguf_export.check_tokenizer(tmp, tokenizer)
    write_file(out, fill)
    return out


def _own_dtype(model: str) -> torch.dtype:
    """The dtype the base model's config names (e.g. bfloat16); float32 for a GGUF or when unknown."""
    from transformers import AutoConfig

    if model.endswith(".gguf"):
        return torch.float32  # dequantized on load: float32 is the precision it has in memory
    try:
        dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    except (OSError, ValueError):
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
