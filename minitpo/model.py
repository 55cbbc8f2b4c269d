"""The policy: load it (4-bit NF4 or full precision), attach a LoRA adapter, save the adapter.

Consumes a `PolicyConfig` and optionally the adapter folder a previous iteration saved. Produces a
peft model (the base frozen, only LoRA weights trainable) and its tokenizer. The reference model of
DPO is never loaded separately: reference log-probs are computed once per iteration with this same
model before training (see train.py), so only one copy of the base ever sits in memory.
"""

import hashlib
import inspect
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitpo.config import PolicyConfig
from minitpo.device import default_dtype, nf4_config, pick_device
from minitpo.errors import UserError
from minitpo.io import write_dir

LORA_INIT_SEED = 0


def attention_head_dim(config) -> int:
    """Per-head width of an attention config: its own head_dim (Gemma sets one), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def compute_dtype(cfg: PolicyConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return default_dtype(device)
    return getattr(torch, cfg.dtype)


def load_tokenizer(model: str):
    tokenizer = AutoTokenizer.from_pretrained(_source(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out, so any id will do
    return tokenizer


def context_length(model: str) -> int | None:
    """The policy's context in tokens (its config's max_position_embeddings), read without its weights;
    None when the config does not say."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(_source(model)), "max_position_embeddings", None)


def _not_trust_check_skipped(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Skipping publisher trust check")


def quiet_libraries() -> None:
    """Silence the libraries' messages that say nothing to a minitpo user, where they come from; their
    other warnings still show (Python shows each warning once per place)."""
    import warnings

    from transformers.utils import logging as hf_logging

    # bitsandbytes on an AVX-512-bf16 CPU tries an optional kernel from the Hub ("Failed to load CPU
    # gemm_4bit_forward from kernels-community"): it is not installed, and its fallback is what we test.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ... and with HF_HUB_OFFLINE=1, as offline users run, that lookup says on every run that it skips the
    # kernel's "publisher trust check": that message alone goes, the module's others stay.
    logging.getLogger("kernels._internals.hf_hub").addFilter(_not_trust_check_skipped)
    # peft asks for transformers' old name `is_gradient_checkpointing`: a FutureWarning on every load.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # "Loading weights" bars, a second per load; Hub download bars (huggingface_hub's) still show.
    hf_logging.disable_progress_bar()


def load_policy(cfg: PolicyConfig, adapter_dir: str | Path | None = None, device: str | None = None):
    """(model, tokenizer). With `adapter_dir`, the saved adapter is loaded trainable, so iteration t+1
    continues from the adapter iteration t trained; without it, a fresh LoRA (B = 0: the model equals
    its base) is attached."""
    quiet_libraries()  # before peft, which imports bitsandbytes
    from peft import LoraConfig, PeftModel, get_peft_model

    device = device or pick_device()
    dtype = compute_dtype(cfg, device)
    try:
        tokenizer = load_tokenizer(cfg.model)
        base = _load_base(cfg, device, dtype)
    except OSError as e:
        raise UserError(
            f"policy.model: {cfg.model!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
            "give a local model folder, a .gguf file, or a Hub id reachable from here"
        ) from None
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
        )
        try:
            with torch.random.fork_rng(devices=[]):  # LoRA's A is random: seed it, so a run is reproducible
                torch.manual_seed(LORA_INIT_SEED)  # and a resumed one equals an uninterrupted one
                model = get_peft_model(base, lora)
        except ValueError as e:
            raise UserError(f"policy.target_modules: {list(cfg.target_modules)} ({e}); name linear layers of this model") from None
    return model, tokenizer


def hf_model(model):
    """The transformers model inside a peft PeftModel (its LoRA layers stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(module) -> str:
    """The name under which a transformers forward takes its KV cache: "cache" (transformers 5.2x) or
    "past_key_values"."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def prepared_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A prepared 4-D attention mask for `model`'s attention from `allowed` (bool, True = attend): sdpa
    takes it as is, eager adds a float mask (0 or the dtype's minimum)."""
    if model.config._attn_implementation != "eager":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in backward instead of storing them (non-reentrant, so the
    frozen 4-bit base needs no input-grad hooks)."""
    base = model.get_base_model()
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        base.activation_checkpointing_enable(kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def save_adapter(model, path: str | Path) -> None:
    """Only the LoRA weights and their config: loadable with `peft.PeftModel.from_pretrained`."""
    write_dir(path, lambda tmp: model.save_pretrained(tmp))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of the adapter weights (small), e.g. to keep the best epoch in memory."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _source(model: str) -> str:
    """A folder or Hub id that transformers loads fast. A GGUF file is converted once into a cached HF
    folder: transformers dequantizes a GGUF on every load (a minute for 270M params on CPU), and
    bitsandbytes can only quantize while loading safetensors."""
    return _gguf_as_folder(model) if model.endswith(".gguf") else model


def _load_base(cfg: PolicyConfig, device: str, dtype: torch.dtype):
    source = _source(cfg.model)
    if cfg.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=nf4_config(dtype), dtype=dtype, device_map={"": device}
    )
    disable_bnb_cpu_weight_packing(model)
    return model


def disable_bnb_cpu_weight_packing(model) -> None:
    """Keep every 4-bit layer on bitsandbytes' differentiable path, on CPU too. Call before any forward.

    bitsandbytes >= 0.48 on CPUs with AVX512-BF16: the first eval-mode forward whose input needs no
    grad (generate, reference log-probs) permanently swaps each Linear4bit weight for a bf16 "packed"
    layout served by `gemv_4bit`, which has no autograd. Training afterwards then either crashes
    (layers with bias, e.g. Qwen2: the in-place `result += bias` on a view) or, worse, silently drops
    the gradient through every base layer (no bias, e.g. Llama). With the flag off, every forward
    uses the MatMul4Bit path in `bnb_4bit_compute_dtype`, in sampling and training alike. The flag is
    read only for CPU inputs, so this changes nothing on CUDA."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), (
                "a Linear4bit was already repacked for CPU inference; call this before the first forward"
            )
            module.support_avx512bf16_for_cpu = False


def _clear_gguf_marking(model) -> None:
    # transformers tags a GGUF-loaded model with a quantizer that refuses save_pretrained (and training
    # frameworks); the weights are already dequantized plain tensors, so the tag can go.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)


def _gguf_as_folder(gguf_path: str) -> str:
    stat = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MINITPO_CACHE", Path.home() / ".cache" / "minitpo"))
    folder = cache / f"{Path(gguf_path).stem}-{key}"
    if not (folder / "config.json").exists():
        path = Path(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        _clear_gguf_marking(model)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

        def fill(tmp):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_dir(folder, fill)
    return str(folder)
