"""Where models run and in what precision. One owner for what the policy, its sampler, the reward-model
judge, training and the loop would otherwise each decide for themselves: the device, the default
dtype, the NF4 (4-bit) config, and giving memory back.

Consumes nothing but torch's view of the machine. Produces a device name ("cuda" or "cpu"), dtypes,
a `BitsAndBytesConfig`, and `free_memory()`."""

import functools
import gc

import torch


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU; float32 on CPU, where most CPUs emulate bf16 matmuls (see cpu_has_native_bf16)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16); elsewhere torch emulates
    bf16 matmuls, slower than float32. torch's own CPU-feature probes (private, hence the getattr)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def nf4_config(compute_dtype: torch.dtype):
    """bitsandbytes' 4-bit NF4 with double quantization (QLoRA's setting), computing in compute_dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def free_memory() -> None:
    """Collect what was dropped and hand the GPU's cached blocks back, so the next stage (the judge,
    training) finds the memory the last one used. Call it after deleting the last reference."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
