"""Where models run and in what precision. One owner for what the policy, its sampler, the reward-model
judge, training and the loop would otherwise each decide for themselves: the device, the default
dtype, the NF4 (4-bit) config, and giving memory back.

Consumes nothing but torch's view of the machine. Produces a device name ("cuda" or "cpu"), dtypes,
a `BitsAndBytesConfig`, `free_memory()`, `trim_heap()`, and the process's resident memory on Linux
(`reset_peak_rss()`, `rss_bytes()`), which is what a stage holds on a CPU."""

import ctypes
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


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS: glibc keeps what was just freed (a closed GGUF judge's KV
    cache, a finished stage's tensors), so the resident memory stays up, and a next stage reusing the pages
    would go unseen in its peak. Nothing where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> int | None:
    """Reset this process's peak resident memory (Linux: VmHWM) to its current one, and return that in
    bytes; None where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return rss_bytes("VmRSS")
    except (OSError, StopIteration, ValueError):
        return None


def rss_bytes(field: str = "VmHWM") -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
