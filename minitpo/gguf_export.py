"""`minitpo export --gguf` and `--gguf-lora`: the trained model as files llama.cpp runs.

Consumes a PATH that `minitpo.rundir.resolve_adapter` resolves (RUN_DIR/iter-N or an adapter folder).
Produces one GGUF file, written with the `gguf` package:
  --gguf       the merged model (base + LoRA) in f16, q8_0 or f32, with its tokenizer and chat template;
  --gguf-lora  the adapter alone, in llama.cpp's LoRA format (`llama-cli -m base.gguf --lora it.gguf`).

When the policy came from a GGUF file (both demos), that file's metadata and tokenizer are copied and
only the tensors are replaced; otherwise they are written from the transformers config and tokenizer
(byte-level BPE tokenizers: Llama 3, Qwen2, SmolLM2). Architectures: llama, qwen2, gemma3.

transformers and llama.cpp store two things differently, and llama.cpp's convert_hf_to_gguf.py undoes
them the same way: the llama architecture's q/k rows are permuted (llama.cpp's rope rotates adjacent
pairs of dimensions, transformers' rotates halves), and Gemma's RMSNorm weights are stored plus one
(transformers computes x * (1 + w), llama.cpp x * w). Tensor names come from gguf's own map.
"""

import functools
import json
from pathlib import Path

import numpy as np

from minitpo.errors import UserError
from minitpo.model import attention_head_dim

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Gemma3ForCausalLM": "gemma3"}
TYPES = ("f16", "q8_0", "f32")
# Tokenized by transformers and by the written GGUF after export: they must agree, or the file is refused.
PROBE = "Hello world! It's 2026: 12345 apples, naïve café, 日本語.\n\n  Two  spaces\tand a tab. <think>x</think>"


# ------------------------------------------------------------------------------------ before loading

def check_out(out: Path) -> None:
    if out.exists():
        raise UserError(f"OUT: {str(out)!r} already exists; give a new file name or delete this one first")
    if out.suffix != ".gguf":
        raise UserError(f"OUT: {str(out)!r} does not end in .gguf; name the file, for example model.gguf")


def architecture(model: str) -> str:
    """The llama.cpp architecture of a policy model (a GGUF file or a transformers folder/id), checked
    before any weight loads."""
    if model.endswith(".gguf"):
        import gguf

        arch = gguf.GGUFReader(model).fields["general.architecture"].contents()
        known = set(ARCHS.values())
    else:
        from transformers import AutoConfig

        arch = (getattr(AutoConfig.from_pretrained(model), "architectures", None) or ["unknown"])[0]
        known = set(ARCHS)
    if arch not in known:
        raise UserError(f"export --gguf: policy.model {model!r} is a {arch}; GGUF export supports "
                        f"{', '.join(sorted(known))}; use the plain `minitpo export PATH OUT` folder instead")
    return ARCHS.get(arch, arch)


# ------------------------------------------------------------------------------- transformers -> GGUF

def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_gguf_layout(name: str, x: np.ndarray, arch: str, config) -> np.ndarray:
    """One float32 tensor named `name` (GGUF name) from transformers' layout to llama.cpp's."""
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        return _rope_permute(x, heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return x + 1.0
    return x


@functools.cache
def _name_map(arch: str, n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)


def gguf_name(hf_name: str, arch: str, config) -> str:
    name = _name_map(arch, config.num_hidden_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"export --gguf: tensor {hf_name!r} has no GGUF name for {arch}; "
                        "use the plain `minitpo export PATH OUT` folder instead")
    return name


def model_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in llama.cpp's layout, for every weight of a (merged) transformers model."""
    config = model.config
    out = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = gguf_name(hf_name, arch, config)
        out[name] = to_gguf_layout(name, t.detach().float().cpu().numpy(), arch, config)
    return out


def _encode(x: np.ndarray, qtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor. Vectors (norms, biases) stay float32, as in
    llama.cpp's own files; q8_0 needs rows that are a multiple of its 32-value blocks, else f16."""
    import gguf

    if x.ndim == 1 or qtype == "f32":
        return np.ascontiguousarray(x, dtype=np.float32), None
    if qtype == "q8_0" and x.shape[-1] % 32 == 0:
        return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(x, dtype=np.float16), None


def _file_type(qtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]


# ---------------------------------------------------------------------------- metadata and tokenizer

def _copy_metadata(writer, reader) -> None:
    """Every key of the source GGUF but the ones the writer sets itself (file layout, architecture,
    file type): the tokenizer, the chat template, the hyperparameters and the model card stay as they were."""
    import gguf

    skip = {"general.architecture", "general.file_type", "general.quantization_version", *writer_keys(writer)}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub)


def _rope(config, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {"theta": float(theta), "type": params.get("rope_type", "default"), **params}


def _write_config(writer, config, arch: str) -> None:
    import gguf

    head_dim = attention_head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    supported = {"default", "llama3" if arch == "llama" else None, "linear" if arch == "gemma3" else None}
    if rope["type"] not in supported:
        raise UserError(f"export --gguf: rope type {rope['type']!r} of this {arch} model is not supported; "
                        "use the plain `minitpo export PATH OUT` folder instead")
    writer.add_rope_freq_base(rope["theta"])
    if arch == "gemma3":
        _check_gemma3(config, head_dim)
        writer.add_sliding_window(config.sliding_window)
        if rope["type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))


def _check_gemma3(config, head_dim: int) -> None:
    """What llama.cpp's gemma3 hard-codes: every 6th layer global, local rope base 10000, attention scaled
    by head_dim ** -0.5. A config that differs would run but compute something else."""
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    problems = []
    if list(getattr(config, "layer_types", want)) != want:
        problems.append("layer_types is not 5 sliding : 1 full")
    if _rope(config, "sliding_attention")["theta"] != 10000.0:
        problems.append("the local rope base is not 10000")
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        problems.append("query_pre_attn_scalar is not head_dim")
    if problems:
        raise UserError(f"export --gguf: this gemma3 config differs from what llama.cpp assumes ({'; '.join(problems)}); "
                        "use the plain `minitpo export PATH OUT` folder instead")


def llama3_rope_freqs(config) -> np.ndarray:
    """The `rope_freqs.weight` factors llama.cpp divides the rope frequencies by for Llama 3.1-style
    scaling (rope_type llama3), as convert_hf_to_gguf.py computes them."""
    rope = _rope(config)
    head_dim = attention_head_dim(config)
    freqs = 1.0 / rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    factors = np.where(wavelen < old / high, 1.0,
                       np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# byte-level BPE pre-tokenizers llama.cpp knows, by the regex transformers splits with before ByteLevel
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: dict | None) -> str | None:
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}.get(pattern)
    return None


def _write_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """A transformers byte-level BPE tokenizer as GGUF keys: tokens in id order (padded to the
    embedding's rows), their types, the merges, the special ids and the chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model["type"] != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel" or pre is None:
        raise UserError("export --gguf: this policy's tokenizer is not a byte-level BPE that llama.cpp knows "
                        "(Llama 3, Qwen2, SmolLM2, GPT-2 style); export from a GGUF policy, or use the plain "
                        "`minitpo export PATH OUT` folder")
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(max(n_vocab, max(tokens) + 1)):
        if i not in tokens:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    ids = sorted(tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tokens[i] for i in ids])
    writer.add_token_types([types[i] for i in ids])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    bos = tokenizer.bos_token_id
    for add, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, tokenizer.eos_token_id),
                       (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            add(value)
    ids_a = tokenizer("a").input_ids
    writer.add_add_bos_token(bos is not None and len(ids_a) > 0 and ids_a[0] == bos)
    template = _chat_template(tokenizer)
    if template and "tokenizer.chat_template" not in writer_keys(writer):
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------------------- writing

def thought_metadata(template, tokenizer=None) -> dict[str, str]:
    """The thought template the model was trained with, for whoever runs the file: the prompt to wrap
    a message in (with its {instruction} placeholder) and the marker its response follows. With
    thought.prefill, also the tokenizer's chat template with the thought's opening after the assistant's
    start (prompts.prefilled_chat_template), in place of the one the model came with."""
    from minitpo.prompts import prefilled_chat_template

    extra = {"minitpo.thought_template": template.text, "minitpo.thought_marker": template.marker or ""}
    chat = _chat_template(tokenizer) if tokenizer is not None else None
    if template.prefill and chat:
        extra["tokenizer.chat_template"] = prefilled_chat_template(chat, template)
    return extra


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def write_model_gguf(model, tokenizer, out: Path, arch: str, qtype: str, source_gguf: str | None = None,
                     extra: dict[str, str] | None = None) -> None:
    """The weights of `model` (transformers, merged) as one GGUF file at `out`, with `extra` string keys."""
    import gguf

    tensors = model_tensors(model, arch)
    writer = _writer(out, arch, extra)
    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        _copy_metadata(writer, reader)
        for t in reader.tensors:  # the source's order; what transformers does not hold is copied as is
            if t.name not in tensors:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            x = tensors.pop(t.name)
            if list(reversed(x.shape)) != [int(n) for n in t.shape]:
                raise UserError(f"export --gguf: {t.name} is {list(x.shape)} in the model but "
                                f"{list(reversed(t.shape.tolist()))} in {source_gguf}; the adapter was not trained on this GGUF")
            data, raw = _encode(x, qtype)
            writer.add_tensor(t.name, data, raw_dtype=raw)
        if tensors:
            raise UserError(f"export --gguf: {source_gguf} has no tensor {sorted(tensors)[0]!r}; "
                            "the adapter was not trained on this GGUF")
    else:
        config = model.config
        writer.add_name(getattr(config, "name_or_path", None) or arch)
        _write_config(writer, config, arch)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        if _rope(config)["type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
        for name, x in tensors.items():
            data, raw = _encode(x, qtype)
            writer.add_tensor(name, data, raw_dtype=raw)
    writer.add_file_type(_file_type(qtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _finish(writer)


def lora_tensors(peft_model, arch: str) -> tuple[dict[str, np.ndarray], float]:
    """({GGUF name + ".lora_a"/".lora_b": float32 array}, alpha) for llama.cpp's LoRA format: A as
    (r, in), B as (out, r) in llama.cpp's row order; llama.cpp scales B @ A by alpha / r, as peft does."""
    base = peft_model.get_base_model()
    config, out, alphas = base.config, {}, set()
    for module_name, module in base.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()
        name = gguf_name(f"{module_name}.weight", arch, config)
        out[f"{name}.lora_a"] = a
        out[f"{name}.lora_b"] = to_gguf_layout(name, b, arch, config)  # the permutation acts on output rows
        alphas.add(round(module.scaling["default"] * a.shape[0], 6))
    if getattr(peft_model, "modules_to_save", None) or any("lora_embedding" in n for n, _ in base.named_parameters()):
        raise UserError("export --gguf-lora: this adapter trains more than linear layers; use --gguf instead")
    if len(alphas) != 1:
        raise UserError("export --gguf-lora: the adapter's layers have different alpha / r; use --gguf instead")
    return out, alphas.pop()


def write_lora_gguf(peft_model, out: Path, arch: str, extra: dict[str, str] | None = None) -> None:
    import gguf

    tensors, alpha = lora_tensors(peft_model, arch)
    writer = _writer(out, arch, extra)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, x in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    _finish(writer)


def _writer(out: Path, arch: str, extra: dict[str, str] | None):
    """A GGUFWriter for `out` holding the `extra` string keys."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    return writer


def writer_keys(writer) -> set[str]:
    """The keys `writer` holds already (its `extra` keys): copied or default metadata does not overwrite them."""
    return {key for shard in writer.kv_data for key in shard}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_tokenizer(path: Path, tokenizer) -> None:
    """Refuse a GGUF whose tokenizer splits PROBE otherwise than transformers does: the model would
    read different tokens from the ones it was trained on."""
    from minitpo.llamacpp import load_vocab

    llm = load_vocab(path)
    try:
        got = llm.tokenize(PROBE.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    want = tokenizer(PROBE, add_special_tokens=False).input_ids
    if got != want:
        at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        raise UserError(f"export --gguf: llama.cpp tokenizes a test text differently from transformers "
                        f"(from token {at} of {len(want)} on); the file was not written")
