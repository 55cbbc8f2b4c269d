"""llama.cpp for minitpo: opening a GGUF with llama-cpp-python, and the prompt plumbing both GGUF judges
(judges/llama.py pointwise, judges/pairwise.py pairwise), `judge-check`, evaluation and the GGUF export
share on top of it.

Consumes a GGUF path and the judge's load settings (JudgeConfig: n_ctx, n_gpu_layers, n_threads);
produces an open llama_cpp.Llama (`open_llama_judge`, closed and its memory handed back on exit), and
for it: a chat-formatted prompt as tokens whose user text can inject no special token (`tokenize_prompt`),
cut to fit n_ctx (`fit_prompt`), evaluated with KV-cache prefix reuse (`eval_prompt`), and the token
ids of a verdict's options (`next_token_ids`). Every load runs with llama.cpp's logs silenced and
Ctrl-C held (`quiet_stderr`) and without CPU weight repacking (`no_weight_repacking`, which says why).
`check_gguf` is the one GGUF magic-bytes check, for the recipe's load-time checks and for the judge.
"""

import io
import os
import re
import signal
import sys
import threading
import warnings
from contextlib import contextmanager, redirect_stderr
from datetime import datetime
from pathlib import Path

import numpy as np

from minitpo.errors import UserError

GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
KEEP_ALIGN = 32  # tokens; see eval_prompt
N_BATCH = 512  # tokens llama.cpp evaluates at once, at most (a multiple of KEEP_ALIGN)


def n_batch(n_ctx: int) -> int:
    """llama.cpp's n_batch for a context of n_ctx: N_BATCH, or n_ctx when smaller (it then holds any
    prompt in one batch)."""
    return min(N_BATCH, n_ctx or N_BATCH)

_FENCE_TAG = re.compile(r"<(?=\s*/?\s*(?:instruction|response)\b)", re.IGNORECASE)
_SENTINEL = "\x00minitpo-judge-user-turn\x00"


def check_gguf(key: str, path, fix: str = "give a GGUF model file") -> None:
    """A UserError naming `key` unless the file at `path` starts with the GGUF magic bytes (the caller
    has checked that it exists): a file that is not a GGUF is refused before llama.cpp reads it."""
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise UserError(f"{key}: {str(path)!r} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); {fix}")


# ---------------------------------------------------------------------------------------------- loading

@contextmanager
def open_llama_judge(cfg):
    """A llama_cpp.Llama for cfg.model, closed (its weights and KV cache freed) on exit."""
    path = Path(cfg.model)
    if not path.is_file():
        raise UserError(f"judge.model: {str(path)!r} does not exist; give the path of a GGUF model file")
    check_gguf("judge.model", path)
    from llama_cpp import Llama  # optional dependency: only the llama_cpp judge needs it

    try:
        with quiet_stderr(), no_weight_repacking():
            llm = Llama(model_path=str(path), n_ctx=cfg.n_ctx, n_batch=n_batch(cfg.n_ctx),
                        n_gpu_layers=cfg.n_gpu_layers, n_threads=cfg.n_threads, n_threads_batch=cfg.n_threads,
                        logits_all=False,
                        verbose=False, **_own_gpu())
    except (ValueError, RuntimeError):
        raise UserError(f"judge.model: {str(path)!r} is not a valid GGUF file (llama.cpp could not load it); "
                        "give a complete GGUF model file") from None
    try:
        yield llm
    finally:
        llm.close()
        # glibc keeps the heap pages just freed (KV cache, compute buffers); hand them back to the OS.
        # gemma-3-270m Q4_K_M, n_ctx 2048: RSS 44 MiB before load, 377 loaded, 105 closed, 48 trimmed.
        from minitpo.device import trim_heap  # here: importing device imports torch, which a judge alone skips

        trim_heap()


def load_vocab(path):
    """A llama_cpp.Llama holding only the GGUF's tokenizer and metadata (vocab_only: no weights, so
    nothing to repack); the caller closes it. ValueError or RuntimeError when llama.cpp cannot read it."""
    from llama_cpp import Llama

    with quiet_stderr():
        return Llama(model_path=str(path), vocab_only=True, verbose=False)


def _own_gpu() -> dict:
    """Under torchrun, each rank's judge on the rank's GPU alone (llama.cpp would split its layers
    over every visible GPU); nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    return {"main_gpu": int(os.environ.get("LOCAL_RANK", "0")), "split_mode": 0}  # LLAMA_SPLIT_MODE_NONE


@contextmanager
def no_weight_repacking():
    """Load GGUF weights as stored: `use_extra_bufts = False` in llama_model_params (llama.cpp's
    `--no-repack`).

    Why: with extra buffer types on, llama.cpp copies the weights of quantized types (Q4_0, Q4_1, Q8_0,
    K-quants) into a CPU-specific layout at load time. On a CPU with AMX (Sapphire Rapids and later)
    that layout is the AMX buffer, and its matmul (ggml_backend_amx_mul_mat) dies on the first eval in
    llama-cpp-python 0.3.36: SIGILL on `tileloadd` in an OpenMP worker thread here, SIGSEGV on another
    machine (upstream: llama.cpp PR 26954, tile config and per-thread AMX permission). F32/F16 GGUFs
    never take that path. Measured on 2 AMX cores, SmolLM2-135M Q4_1: SIGILL with repacking, 2.3
    responses/s without, load included (benchmarks/RESULTS.md).

    Why a patch: llama-cpp-python 0.3.36 gives Llama no way to set the field. Its constructor has no
    argument for it (unknown keyword arguments are swallowed by **kwargs and ignored); it builds its
    llama_model_params from llama_model_default_params() and loads the model in the same call, with
    nothing in between to hook. The low-level API does take the struct (llama_model_load_from_file(path,
    params)), but everything minitpo uses Llama for would then be ours to write in ctypes: tokenize and
    detokenize, metadata, batched eval with its KV-cache bookkeeping, and, for the export's checks,
    all-position logits and LoRA adapters. So, for the duration of the constructor only, that factory
    returns defaults with the field off, and the original is back on exit, on error too. This is the one
    place minitpo patches a library; tests/test_judges_llama.py checks from llama.cpp's own load log that
    quantized weights are not repacked under it, where a plain Llama on the same CPU repacks them."""
    import llama_cpp.llama_cpp as lib

    factory = lib.llama_model_default_params

    def defaults_without_repacking():
        params = factory()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = defaults_without_repacking
    try:
        yield
    finally:
        lib.llama_model_default_params = factory


@contextmanager
def hold_signals():
    """Hold a Ctrl-C or SIGTERM that arrives inside the block and deliver it when the block ends.
    llama.cpp calls back into Python while it loads a model (llama-cpp-python's log callback, once per
    log line), and an exception raised inside a ctypes callback is printed and dropped: the run would go
    on as if Ctrl-C had not been pressed. Loading takes seconds, so holding costs no more than that.
    Only signals with a Python handler are held (Python's KeyboardInterrupt, the CLI's SIGTERM); an
    ignored or default one is left as it is."""
    if threading.current_thread() is not threading.main_thread():  # handlers belong to the main thread
        yield
        return
    held, previous = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(sig)):
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            previous[held[0]](held[0], None)  # the handler the block displaced raises its exception now


@contextmanager
def quiet_stderr():
    """fd 2 to /dev/null, and sys.stderr too: verbose=False is not enough, llama-cpp-python 0.3.36 maps
    ggml's WARN level to logging.ERROR, so context-creation warnings (gemma-3: "using full-size SWA
    cache") still print, from C (fd 2) or through its Python log callback (sys.stderr). The same callback
    would drop a Ctrl-C, so signals are held for the block too (hold_signals): every llama.cpp load that
    quiets its logs is also safe to interrupt."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        with redirect_stderr(io.StringIO()), hold_signals():
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------- prompts

def sanitize(text: str) -> str:
    """Neutralise what would let a response close its fence or pose as the verdict: any
    <response>/</response>/<instruction> tag loses its "<" (written "&lt;") and every "[[" gets a
    space ("[ ["), so a judge's lead-in ("Rating: [[", "Verdict: [[") and its "[[9]]" verdict format
    cannot occur inside user text."""
    text = _FENCE_TAG.sub("&lt;", text)
    return re.sub(r"\[(?=\[)", "[ ", text)


def chat_turn(chat_template: str, bos_token: str = "", eos_token: str = "") -> tuple[str, str] | None:
    """(head, tail): the chat template rendered around one user turn, the assistant's start included.
    None when the template will not render that way (it then falls back to plain text)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        rendered = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
            bos_token=bos_token, eos_token=eos_token, raise_exception=raise_exception,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),  # Llama-3.2 dates its system turn
            enable_thinking=False)  # Qwen3-style templates: skip the think block, answer directly
    except Exception as e:  # jinja2 errors, or the template's own raise_exception
        warnings.warn(f"judge: the model's chat template failed to render ({e}); using a plain prompt")
        return None
    if rendered.count(_SENTINEL) != 1:
        return None
    head, tail = rendered.split(_SENTINEL)
    return head, tail


def fit_prompt(llm, build, texts: list[str]) -> tuple[list[int], bool]:
    """(tokens of build(*texts), whether a text had to be cut). A prompt longer than the judge's n_ctx
    is not an error: one long response must not end an hour's run. The longest text (a response, as a
    rule) loses tokens from its end until the prompt fits; the judge then sees a response that stops
    mid-way, and the caller counts it."""
    # llama.cpp may round its context up (640 -> 768); llama-cpp-python's token buffer keeps what was asked
    n_ctx = min(llm.n_ctx(), len(llm.input_ids))
    tokens = tokenize_prompt(llm, build(*texts))
    if len(tokens) <= n_ctx:
        return tokens, False
    ids = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]
    while len(tokens) > n_ctx:
        j = max(range(len(ids)), key=lambda j: len(ids[j]))
        if not ids[j]:
            raise UserError(f"judge.n_ctx: {n_ctx} tokens cannot hold the judge's prompt itself "
                            f"({len(tokens)} tokens with every text cut); raise judge.n_ctx")
        # cut the excess plus a margin: text re-tokenizes a little differently once cut
        ids[j] = ids[j][:max(0, len(ids[j]) - (len(tokens) - n_ctx) - 8)]
        texts = [llm.detokenize(x).decode("utf-8", "ignore") for x in ids]
        tokens = tokenize_prompt(llm, build(*texts))
    return tokens, True


def model_chat_turn(llm) -> tuple[str, str] | None:
    """chat_turn for the GGUF's own chat template; None when it carries none."""
    template = llm.metadata.get("tokenizer.chat_template")
    text = lambda i: llm.detokenize([i], special=True).decode("utf-8", "replace") if i >= 0 else ""  # noqa: E731
    return chat_turn(template, text(llm.token_bos()), text(llm.token_eos())) if template else None


def tokenize_prompt(llm, parts: tuple[str, str, str]) -> list[int]:
    head, user_text, tail = parts
    tokens = llm.tokenize(head.encode(), add_bos=True, special=True)
    if len(tokens) >= 2 and tokens[0] == tokens[1] == llm.token_bos():
        tokens = tokens[1:]  # the template wrote bos_token and llama.cpp added one too
    tokens += llm.tokenize(user_text.encode(), add_bos=False, special=False)
    return tokens + llm.tokenize(tail.encode(), add_bos=False, special=True)


def eval_prompt(llm, tokens: list[int], reuse_prefix: bool) -> np.ndarray:
    """Evaluate `tokens` and return the logits (n_vocab,) at the last position.

    Prefix reuse: llm.input_ids[:llm.n_tokens] are the tokens whose keys/values sit in the KV cache. We
    keep their common prefix with the new prompt, rounded down to a multiple of KEEP_ALIGN, drop the rest
    of the cache and evaluate only the suffix. At least one token is always evaluated, since logits exist
    only for the last decoded batch.

    Why the rounding: ggml's CPU kernels for quantized weights (Q4_K on AVX2) take activation rows in
    groups of 4 and a batch's leftover rows by another path that rounds differently (gemma-3-270m Q4_K_M:
    logits moved by up to 0.7, scores by 0.08). Starting every batch at a multiple of KEEP_ALIGN (n_batch
    is one too) gives each token the numerics of a fresh evaluation: scores match it exactly."""
    import llama_cpp

    keep = 0
    if reuse_prefix:
        n = min(llm.n_tokens, len(tokens))
        differ = np.flatnonzero(llm.input_ids[:n] != np.asarray(tokens[:n]))
        keep = int(differ[0]) if len(differ) else n
    keep = min(keep, len(tokens) - 1) // KEEP_ALIGN * KEEP_ALIGN
    memory = llama_cpp.llama_get_memory(llm.ctx)
    if not llama_cpp.llama_memory_seq_rm(memory, -1, keep, -1):  # partial removal can fail (recurrent)
        keep = 0
        llama_cpp.llama_memory_clear(memory, True)
    llm.n_tokens = keep  # Llama.eval appends from here, in batches of n_batch tokens
    llm.eval(tokens[keep:])
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).astype(np.float64)


def next_token_ids(llm, lead_in: str, options) -> list[int]:
    """The token id of each option as it would follow `lead_in`. We tokenize the lead-in with and
    without each option and require exactly one extra token, so the ids are the ones the model would
    emit at the verdict position."""
    base = llm.tokenize(lead_in.encode(), add_bos=False, special=False)
    ids = []
    for option in options:
        toks = llm.tokenize((lead_in + option).encode(), add_bos=False, special=False)
        if len(toks) != len(base) + 1 or toks[: len(base)] != base:
            raise UserError(f"judge.model: the tokenizer of {llm.model_path} does not write {option!r} as one "
                            f"token after {lead_in!r}; use a judge model whose tokenizer does")
        ids.append(toks[-1])
    return ids
