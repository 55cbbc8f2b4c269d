"""The fast sampler: new tokens for many prompts from the policy, with a per-slot static KV cache.

Consumes: the policy as the loop holds it (a transformers causal LM, optionally a peft LoRA model,
optionally on an NF4 bitsandbytes base), its `SamplingConfig` and prompts as token ids. Produces: for
each prompt the new token ids (EOS excluded) and whether it stopped at EOS (False: cut at
max_new_tokens). `Sampler` is the whole interface, a context manager that owns the memory it uses.

Why it is built this way, measured on an H100 (Qwen2.5-1.5B shape, random weights, LoRA r16, 64
prompts of 128 tokens, 256 new tokens, T 0.8, top-p 0.95; benchmarks/sample.py):
  HF generate, NF4 base + unmerged LoRA .......   567-648 tok/s   2.5 GiB peak
  this engine, no CUDA graphs (eager steps) ....  2,278 tok/s
  + the decode step as one CUDA graph ..........  8,988-9,144 tok/s  4.9 GiB   (14-16x)
  + torch.compile of the forward (compile=True)  10,585 tok/s  5.0 GiB   (16-19x), compiles ~60 s
  256 slots instead of 64, graphs ............. 20,299 tok/s
1. Weights. NF4 dequantizes every matrix at every step and the unmerged LoRA adds two small matmuls
   per projection (HF generate on an H200: NF4+LoRA 898, NF4 1,688, bf16 2,973 tok/s). So we sample
   from a bf16 copy with NF4 dequantized and the LoRA merged (W + B@A * scale): 3.1 GB for 1.5B
   parameters, only when free memory allows (else the policy runs in place), refreshed in place on
   each call since the LoRA changes every iteration, freed when the `Sampler` closes.
2. Launches. A batch-64 step is 2,777 kernels in eager PyTorch (6.5 ms even as a graph, 28 ms
   eager). The whole step (forward, top-p draw, EOS bookkeeping) is one CUDA graph, replayed. With
   compile=True the forward inside it is torch.compile'd, fusing norms, RoPE and activations (6.5 ->
   5.6 ms); it is off by default because its tokens have not yet been checked against HF on a GPU.
   The sampler stays outside compile: inductor fails on its (64, 151936) cumsum (torch 2.11). A
   failed compile or capture falls back (compiled -> plain graph -> eager) with a warning.
3. Batching. Continuous batching: B slots; a finished sequence leaves and its slot is refilled with
   the next prompt, longest prompts first so prefill blocks pad little. HF's StaticCache writes all
   rows at one shared position, which this can't use, so `SlotCache` keeps (B, H_kv, C, D) buffers
   per layer and we hand the HF forward explicit 4-D masks and position_ids. The model's own layers
   run unchanged, so architectures that take a prepared 4-D mask work (tested: Llama, Qwen2, Gemma3
   with its sliding-window layers). Sampling (sort + 2 cumsums over the vocab) is 1.5 ms of a step.
4. Memory. A decode step attends to the cache columns filled so far, rounded up to KEY_BLOCK (one
   CUDA graph per width, recorded on first use, sharing one memory pool), not to the whole static
   cache. The K copies of an instruction's prompt are prefilled once and their columns copied. The
   number of slots comes from the free memory (`fit_slots`; batch_size "auto" asks for up to
   AUTO_MAX_SLOTS), within an optional budget (sampling.memory_gb).
5. Continuations. sample.py's forced marker ends a thought and appends the marker; the sequence goes
   on in its slot (`extend`): only the tokens its cache lacks (the marker's, ~5) are written, by one
   forward, where a second call would prefill prompt + thought again (CPU demo, 2 cores: 96 such
   prompts of ~150 tokens cost ~35 s of prefill per iteration; the continuations ~2 s).
Distribution: minitpo/draw.py's, HF's temperature + top-p; each prompt brings its own seed, and the
uniform for its n-th token is the n-th of that seed's stream (`uniform_table`), read inside the graph:
which slot, batch or process draws a sequence never changes its tokens.
"""

import os
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from minitpo.config import SamplingConfig
from minitpo.dense import build_sampling_model, load_dense_weights
from minitpo.device import free_memory
from minitpo.draw import sample_next, uniform_table
from minitpo.model import attention_head_dim, cache_kwarg, hf_model, prepared_mask

# decode steps between host syncs; a finished slot idles at most this long. On CUDA a sync drains the queue of
# kernels; on a CPU it costs nothing, and a finished sequence stops costing rows sooner (the CPU demo's sampling: -13%)
SYNC_EVERY = {"cuda": 16, "cpu": 4}
AUTO_MAX_SLOTS = 256  # batch_size "auto": at most this many slots (20,299 tok/s at 256 on an H100, above)
# decode attends to the filled cache columns rounded up to this: one CUDA graph per width on CUDA; on a CPU,
# which records none, only the columns read cost
KEY_BLOCK = {"cuda": 128, "cpu": 32}
PREFILL_TOKENS = 8192  # (prompts x width) per prefill forward: bounds activation memory
RESERVE_BYTES = 2 << 30  # kept free on the GPU for prefill activations and allocator slack
WORKSPACE_PER_VOCAB = 32  # bytes per slot per vocab entry: fp32 logits, sort values+indices, cumsum

class SlotCache:
    """K/V buffers (n_slots, H_kv, n_cols, D) per layer, allocated at first use. Prefill writes
    a block of columns [0, L) for some slots (`rows`); a continuation writes columns `at` (n, S), its
    own per slot, after what those slots hold; decode writes column `cols[b]` of every slot."""

    def __init__(self, n_slots, n_cols, cols):
        self.n_slots, self.n_cols, self.cols = n_slots, n_cols, cols  # cols: (B,) the slots' `cur`
        self.rows = None  # (n,) slot ids during prefill and continuation, None during decode
        self.at = None  # (n, S) the cache columns of a continuation's tokens, None otherwise
        self.n_keys = n_cols  # decode attends to columns [0, n_keys): the filled ones, not the whole cache
        self.n_rows = n_slots  # decode computes slots [0, n_rows) (eager steps at the tail: `_compact`)
        self.k, self.v = {}, {}

    def copy_rows(self, src, dst, width: int) -> None:
        """Columns [0, width) of slots `src` into slots `dst`, every layer: a shared prefill."""
        for K in (*self.k.values(), *self.v.values()):
            K[:, :, :width].index_copy_(0, dst, K[src, :, :width])

    def update(self, k, v, layer_idx, *args, **kwargs):  # k, v: (N, H_kv, T, D), RoPE applied
        if layer_idx not in self.k:
            shape = (self.n_slots, k.shape[1], self.n_cols, k.shape[3])
            self.k[layer_idx] = k.new_zeros(shape)  # zeros, not empty: masked columns must be finite
            self.v[layer_idx] = v.new_zeros(shape)
        K, V = self.k[layer_idx][: self.n_rows], self.v[layer_idx][: self.n_rows]  # views: writes land
        if self.rows is not None and self.at is None:  # prefill attends within its own block only
            K[:, :, : k.shape[2]].index_copy_(0, self.rows, k)
            V[:, :, : v.shape[2]].index_copy_(0, self.rows, v)
            return k, v
        if self.rows is not None:  # a continuation attends to what its slots hold, and to itself
            for buf, new in ((K, k), (V, v)):  # (B, C, H_kv, D) views: row i's token t goes to column at[i, t]
                buf.transpose(1, 2).index_put_((self.rows[:, None], self.at), new.transpose(1, 2))
            return K[self.rows, :, :self.n_keys], V[self.rows, :, :self.n_keys]
        idx = self.cols[: self.n_rows].view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])  # (B, H_kv, 1, D)
        K.scatter_(2, idx, k)
        V.scatter_(2, idx, v)
        return K[:, :, :self.n_keys], V[:, :, :self.n_keys]

    def get_seq_length(self, layer_idx=0):  # only asked when position_ids is missing; we pass them
        return 0


@dataclass
class _Slots:
    """Per-slot decode state: static tensors, since a CUDA graph replays on fixed addresses."""
    tokens: torch.Tensor  # (B,) next input token
    start: torch.Tensor  # (B,) first cache column of the slot's sequence
    cur: torch.Tensor  # (B,) cache column of `tokens`; its position id is cur - start
    n_gen: torch.Tensor  # (B,) tokens written to `out`
    active: torch.Tensor  # (B,) bool
    eos_hit: torch.Tensor  # (B,) bool
    uniforms: torch.Tensor  # (B, max_new) fp32: column n is the draw of the slot's n-th new token
    out: torch.Tensor  # (B, max_new) new tokens
    eos_ids: torch.Tensor  # (E,)
    is_stop: torch.Tensor  # (V,) bool: the token ends a sequence once it has written text (stop_ids)
    is_blank: torch.Tensor  # (V,) bool: the token writes only whitespace (or nothing)
    wrote: torch.Tensor  # (B,) bool: the slot has drawn a token that is not blank
    limit: torch.Tensor  # (B,) the most new tokens of the slot's pass (a first pass, or a continuation)
    stops: torch.Tensor  # (B,) bool: stop tokens end the slot's pass

    PER_SLOT = ("tokens", "start", "cur", "n_gen", "active", "eos_hit", "uniforms", "out", "wrote", "limit", "stops")

    def head(self, n: int) -> "_Slots":
        """The first n slots: views, so a step on them updates these tensors in place."""
        return _Slots(**{f: getattr(self, f)[:n] if f in self.PER_SLOT else getattr(self, f)
                         for f in self.__dataclass_fields__})

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slots src's state into slots dst; src left idle."""
        for f in self.PER_SLOT:
            t = getattr(self, f)
            t.index_copy_(0, dst, t[src])
        for t in (self.active, self.cur, self.start):
            t.index_fill_(0, src, 0)


@dataclass
class _Engine:
    base: torch.nn.Module  # the policy's HF model (LoRA layers inside when peft)
    lm: torch.nn.Module  # what runs: the dense copy, or `base` itself when memory is short
    cache: SlotCache
    slots: _Slots
    cache_kw: str  # the forward's name for the cache: "cache" (transformers 5.2x), "past_key_values"
    layer_kinds: frozenset  # {"full_attention", "sliding_attention"}
    window: int | None  # sliding window of the sliding layers
    temperature: float
    top_p: float
    pad_id: int
    forward: object = None  # the decode step's forward: _logits, or torch.compile of it
    graphs: dict | None = None  # n_keys -> torch.cuda.CUDAGraph of one decode step; None: decode eagerly
    pool: object = None  # the memory pool the graphs share (they never run at once)
    prefill_rows: int = 0  # prompts prefilled so far: copies of a prompt in one refill count once


class Sampler:
    """The fast sampler over `model`, alive for a `with` block; it takes the recipe's sampling section
    (temperature, top_p, batch_size, memory_gb) and the ids that end a sequence:

        with Sampler(policy, recipe.sampling, eos_token_ids=eos, pad_token_id=pad) as sampler:
            outputs = sampler.generate(prompt_ids, max_new_tokens=256, seeds=seeds)

    Its first call builds the engine: the sampling copy, the KV cache, and on CUDA a graph per decode
    width as widths come up. A later call of the same shape (slots, cache columns, max_new_tokens)
    reuses all of it, the copy's weights refreshed from the policy (its LoRA may have changed since):
    that is where the graphs' capture (~3 s) and the compile (~60 s) pay off, for `minitpo bench`'s
    chunks and a benchmark's timed call after its warm-up. A call of another shape frees the engine
    and builds anew (another number of slots, longer prompts or another max_new_tokens). Leaving the block
    frees the copy, cache and graphs, so the judge or training that comes next has the memory.
    cuda_graphs / compile (CUDA only) are there to switch the fast paths off when they misbehave."""

    def __init__(self, model, cfg: SamplingConfig, *, eos_token_ids, pad_token_id: int | None,
                 cuda_graphs: bool = True, compile: bool = False):
        self.model, self.cfg = model, cfg
        self.eos_token_ids, self.pad_token_id = list(eos_token_ids), pad_token_id
        self.cuda_graphs, self.compile = cuda_graphs, compile
        self.engine: _Engine | None = None  # built by the first call, freed on exit
        self._shape = None  # (slots wanted, cache columns, max_new_tokens) the engine was built for
        self.slots_built: list[int] = []  # the slots of each engine built, in order (auto: what the memory held)
        self._closed = False

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the sampling copy, KV cache and CUDA graphs; the sampler takes no more calls."""
        self._free()
        self._closed = True

    def _free(self) -> None:
        if self.engine is not None and self.engine.forward is not _logits:
            torch._dynamo.reset()  # else each iteration's new engine piles up recompiles until dynamo gives up
        self.engine = self._shape = None
        free_memory()

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, seeds: list[int], progress=None,
                 stop_ids=(), blank_ids=(), early_stop: bool = True, first_tokens: int | None = None,
                 extend=None) -> list[tuple[list[int], bool]]:
        """For each prompt: (new token ids without EOS, stopped at EOS?). seeds: one per prompt, its draws
        (uniform_table). A token of stop_ids also ends a sequence (it is kept, and counts as EOS) once the
        sequence holds a token not in blank_ids: the caller, which cuts the text at its stop texts, gets
        the same text as without them, and the tokens after the stop are never computed. early_stop=False:
        stop_ids end only continuations (below).
        first_tokens (default max_new_tokens): the most new tokens of a prompt's first pass. extend(i, ids,
        ended), when given, is told of prompt i's first pass as it ends and may return its continuation,
        (prompt, seed, max_new_tokens): a longer prompt, usually prompt i + some of `ids` + more, whose
        new tokens are then prompt i's result (stop_ids end them). The sequence goes on in its slot: of
        the continuation's prompt, only what the cache does not already hold (what follows the longest
        common prefix with prompt i + ids) is written, by one forward, instead of prefilling it all.
        Its prompt + max_new_tokens may hold at most prompt i's + max_new_tokens.
        sampling.batch_size is the most slots decoded at once, or "auto": as many as the memory holds, up
        to AUTO_MAX_SLOTS (fewer in either case if the KV cache wouldn't fit in the free memory, or in
        sampling.memory_gb when given: the sampling copy, KV cache and workspace together). progress(n)
        is told of n finished prompts."""
        assert not self._closed, "the sampler was closed: open another"
        assert max_new_tokens >= 1, "max_new_tokens must be >= 1"
        assert all(map(len, prompt_ids)), "every prompt needs at least one token"
        assert len(seeds) == len(prompt_ids), "one seed per prompt"
        if not prompt_ids:
            return []
        n_cols = cache_columns(max(map(len, prompt_ids)), max_new_tokens)
        e = self._engine(len(prompt_ids), n_cols, max_new_tokens, (stop_ids, blank_ids))
        was_training = e.lm.training
        e.lm.eval()  # sampling in place must not run LoRA dropout
        try:
            return _run(e, prompt_ids, max_new_tokens, seeds, progress, min(first_tokens or max_new_tokens, max_new_tokens),
                        early_stop, extend)
        finally:
            e.lm.train(was_training)

    def _engine(self, n_prompts: int, n_cols: int, max_new: int, stop) -> _Engine:
        """The engine built before when this call has its shape (weights refreshed, slots reset), else a new one."""
        batch_size = self.cfg.batch_size
        want = wanted_slots(batch_size, n_prompts)
        shape = (want, n_cols, max_new)
        if self.engine is not None and self._shape == shape:
            e = self.engine  # bound only here: a reference held past this branch would keep the old engine alive
            if e.lm is not e.base:
                load_dense_weights(e.lm, e.base, e.lm.dtype, e.lm.device)
            for t in (e.slots.start, e.slots.cur, e.slots.n_gen, e.slots.active, e.slots.eos_hit, e.slots.wrote,
                      e.slots.limit, e.slots.stops):
                t.zero_()
            is_stop, is_blank = _token_flags(stop, e.slots.is_stop.shape[0], e.slots.is_stop.device)
            e.slots.is_stop.copy_(is_stop)  # in place: a recorded CUDA graph reads these addresses
            e.slots.is_blank.copy_(is_blank)
            return e
        self._free()  # the old engine goes before the new one takes its memory
        self.engine, self._shape = self._build(want, n_cols, max_new, stop), shape
        self.slots_built.append(self.engine.slots.cur.shape[0])
        return self.engine

    def _build(self, n_slots: int, n_cols: int, max_new: int, stop) -> _Engine:
        """A new engine: the dense copy when the memory allows it (_plan), up to n_slots slots."""
        budget = None if self.cfg.memory_gb is None else int(self.cfg.memory_gb * 2**30)
        base = hf_model(self.model)
        device = next(base.parameters()).device
        use_copy, n_slots = _plan(base, n_slots, n_cols, device, budget)
        if use_copy:  # bf16 on the GPU; on CPU (tests) the policy's own float dtype
            dtype = torch.bfloat16 if device.type == "cuda" else base.get_input_embeddings().weight.dtype
            lm = build_sampling_model(base, dtype, device)
        else:
            lm = base
            if base.config._attn_implementation not in ("sdpa", "eager"):
                raise ValueError(f"sampling in place needs sdpa or eager attention, not {lm.config._attn_implementation}")
        z = lambda dtype=torch.long: torch.zeros(n_slots, dtype=dtype, device=device)  # noqa: E731
        slots = _Slots(z(), z(), z(), z(), z(torch.bool), z(torch.bool),
                       torch.zeros(n_slots, max_new, dtype=torch.float, device=device),
                       torch.zeros(n_slots, max_new, dtype=torch.long, device=device),
                       torch.tensor(self.eos_token_ids, dtype=torch.long, device=device),
                       *_token_flags(stop, base.get_output_embeddings().weight.shape[0], device), z(torch.bool),
                       z(), z(torch.bool))
        cfg = lm.config.get_text_config()
        kinds = frozenset(getattr(cfg, "layer_types", None) or ["full_attention"])
        e = _Engine(base, lm, SlotCache(n_slots, n_cols, slots.cur), slots, cache_kwarg(lm), kinds,
                    getattr(cfg, "sliding_window", None), float(self.cfg.temperature), float(self.cfg.top_p),
                    self.pad_token_id)
        e.forward = _logits
        if self.compile and use_copy and device.type == "cuda":  # fuses norms, RoPE, activations
            e.forward = torch.compile(_logits, dynamic=False)  # decode shapes only: prefill calls _logits
        if self.cuda_graphs and device.type == "cuda":
            e.graphs, e.pool = {}, torch.cuda.graph_pool_handle()
        return e


def fit_slots(free: int, copy_bytes: int, per_slot: int, want: int, budget: int | None = None) -> tuple[bool, int]:
    """(sample from a dense copy?, number of slots) for `free` bytes, capped by `budget` when given:
    the copy when it leaves room for min(want, 64) slots, then as many slots as the rest holds, at
    most `want`, at least 1."""
    if budget is not None:
        free = min(free, budget)
    use_copy = free - copy_bytes >= per_slot * min(want, 64)
    room = free - (copy_bytes if use_copy else 0)
    return use_copy, max(1, min(want, room // per_slot))


def wanted_slots(batch_size: int | str, n_prompts: int) -> int:
    """Slots asked of fit_slots: batch_size, or AUTO_MAX_SLOTS for "auto", never more than the prompts."""
    return min(AUTO_MAX_SLOTS if batch_size == "auto" else batch_size, n_prompts)


def cache_columns(longest_prompt: int, max_new_tokens: int) -> int:
    """Cache columns of a call: its longest prompt + max_new_tokens, rounded up to 64 (calls of similar
    lengths reuse the cached engine)."""
    return -(-(longest_prompt + max_new_tokens) // 64) * 64


def slot_bytes(config, n_cols: int, elem_bytes: int) -> int:
    """Memory of one slot: its K and V for every layer over n_cols columns, and its share of the
    sampling workspace (fp32 logits, sort, cumsum over the vocabulary)."""
    cfg = config.get_text_config()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * attention_head_dim(cfg) * n_cols * elem_bytes \
        + WORKSPACE_PER_VOCAB * cfg.vocab_size


def _free_bytes(device) -> int:
    """What the sampler may use: free GPU memory (the allocator's cached blocks included), or the
    host's available memory, less RESERVE_BYTES."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        free -= torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free - RESERVE_BYTES


def _plan(base, want, n_cols, device, budget=None):
    """(build a dense copy?, number of slots) from the memory free on `device`, within `budget` bytes."""
    elem = 2 if device.type == "cuda" else base.get_input_embeddings().weight.element_size()  # the copy's dtype
    n_params = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()
                   for n, p in base.named_parameters() if "lora_" not in n)
    return fit_slots(_free_bytes(device), elem * n_params, slot_bytes(base.config, n_cols, elem), want, budget)


def _token_flags(stop, vocab: int, device):
    """(is_stop, is_blank), each (V,) bool, from (stop_ids, blank_ids)."""
    flags = torch.zeros(2, vocab, dtype=torch.bool)
    for row, ids in enumerate(stop):
        flags[row, list(ids)] = True
    return flags[0].to(device), flags[1].to(device)


def _step(e, n_keys: int) -> None:
    """One decode step over the first n_keys cache columns: the CUDA graph recorded for that width
    (recorded on first use), or eagerly."""
    e.cache.n_keys = n_keys
    if e.graphs is not None and n_keys not in e.graphs:
        graph = _capture(e)
        if graph is None:
            e.graphs = None
        else:
            e.graphs[n_keys] = graph
    if e.graphs is not None:
        e.graphs[n_keys].replay()
    else:
        _decode_step(e)


def _capture(e):
    """Record one decode step, at the cache width e.cache.n_keys, as a CUDA graph. Warm-up runs first
    on a side stream (cuBLAS handles, cache allocation, compilation); with every slot inactive a step
    changes nothing that matters. If the compiled step fails we retry the plain one; if that fails
    too, we decode eagerly."""
    active = e.slots.active.clone()
    e.slots.active.zero_()
    try:
        while True:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        _decode_step(e)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=e.pool):
                    _decode_step(e)
                return graph
            except Exception as err:  # noqa: BLE001 -- compile or capture errors come in many types
                compiled = e.forward is not _logits
                warnings.warn(f"{'compiled' if compiled else 'plain'} decode step not recorded as a CUDA graph: {err!r}")
                if not compiled:
                    return None
                e.forward = _logits
    finally:
        e.slots.active.copy_(active)


def _logits(e, input_ids, position_ids, valid, dist):
    """Last-position fp32 logits (N, V). valid (N, 1, Q, K) bool: causal and in-sequence; dist: query
    position - key position, broadcastable to valid, for the sliding-window layers."""
    sliding = valid & (dist < e.window) if e.window else valid  # HF: key > query - window
    if "sliding_attention" not in e.layer_kinds:
        mask = prepared_mask(e.lm, valid)
    elif "full_attention" not in e.layer_kinds:
        mask = prepared_mask(e.lm, sliding)
    else:  # mixed layers (Gemma3): HF takes a dict of prepared masks keyed by layer type
        mask = {"full_attention": prepared_mask(e.lm, valid), "sliding_attention": prepared_mask(e.lm, sliding)}
    out = e.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
               logits_to_keep=1, **{e.cache_kw: e.cache})
    return out.logits[:, -1].float()  # fp32, as generate samples


def _decode_step(e):
    """One token for every slot: forward, draw, book-keeping; all on device, so it can be a graph."""
    s = e.slots
    cols = torch.arange(e.cache.n_keys, device=s.cur.device)  # only the filled columns are read
    dist = s.cur[:, None] - cols  # (B, C) query position - key position
    valid = (cols >= s.start[:, None]) & (dist >= 0)  # an idle slot still sees its own column
    logits = e.forward(e, s.tokens[:, None], (s.cur - s.start)[:, None], valid[:, None, None], dist[:, None, None])
    col = s.n_gen.clamp(max=s.out.shape[1] - 1)[:, None]  # (B, 1): the index of the token drawn now
    nxt = sample_next(logits, e.temperature, e.top_p, s.uniforms.gather(1, col).squeeze(1))  # (B,)
    is_eos = (nxt[:, None] == s.eos_ids).any(-1) & s.active
    keep = s.active & ~is_eos
    # a stop token is kept (the caller cuts the text at the stop), and only ends a slot that has written
    # text before it: the caller's cut skips leading whitespace, so an earlier stop would not be one
    is_stop = s.is_stop[nxt] & s.wrote & keep & s.stops
    s.wrote.logical_or_(keep & ~s.is_blank[nxt])
    s.out.scatter_(1, col, torch.where(keep[:, None], nxt[:, None], s.out.gather(1, col)))
    s.n_gen.add_(keep.long())
    s.eos_hit.logical_or_(is_eos | is_stop)
    s.active.logical_and_(~is_eos & ~is_stop & (s.n_gen < s.limit))
    s.cur.add_(s.active.long())  # finished slots stay put, inside the cache
    s.tokens.copy_(torch.where(s.active, nxt, s.tokens))


def _prefill(e, rows, prompts, uniforms, limit: int, stops: bool):
    """Write all but the last token of each prompt into the cache rows, left-padded to one width;
    the last prompt token becomes the slot's next input, so the first new token is drawn by the
    decode step like every other. uniforms: (n, max_new), the prompts' draws; limit and stops: the
    slots' first pass (_Slots)."""
    s, dev = e.slots, e.slots.cur.device
    width = max(len(p) for p in prompts) - 1
    start = torch.tensor([width - len(p) + 1 for p in prompts], device=dev)  # (n,)
    rows_t = torch.tensor(rows, device=dev)
    # The K candidates of an instruction are K copies of one prompt, queued together: run the forward
    # for the first copy of each prompt only and copy its cache columns into the other copies' slots.
    first: dict[tuple, int] = {}
    src = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]
    uniq = sorted(first.values())
    e.prefill_rows += len(uniq)
    if width > 0:
        ids = torch.full((len(uniq), width), e.pad_id or 0, dtype=torch.long)  # masked: any valid id
        for j, i in enumerate(uniq):
            ids[j, width - len(prompts[i]) + 1:] = torch.tensor(prompts[i][:-1])
        cols = torch.arange(width, device=dev)
        dist = cols[:, None] - cols  # (L, L)
        start_u = start[uniq]
        valid = (cols >= start_u[:, None, None]) & (dist >= 0)  # (n, L, L)
        valid |= dist == 0  # a padding query sees itself, so no softmax row is empty (NaN)
        e.cache.rows = rows_t[uniq]
        try:
            _logits(e, ids.to(dev), (cols - start_u[:, None]).clamp(min=0), valid[:, None], dist)
        finally:
            e.cache.rows = None
        copies = [i for i in range(len(prompts)) if src[i] != i]
        if copies:
            e.cache.copy_rows(rows_t[[src[i] for i in copies]], rows_t[copies], width)
    s.start.index_copy_(0, rows_t, start)
    _arm(e, rows_t, torch.full_like(rows_t, width), [p[-1] for p in prompts], uniforms, [limit] * len(rows), stops)


def _continue(e, rows, keep, prompts, uniforms, limits):
    """Continue the sequences in slots `rows` with `prompts` (each extends what its slot holds): keep the
    first keep[i] cached tokens of slot rows[i], write prompts[i][keep[i]:-1] after them in one forward
    (each slot at its own columns, right-padded to one width; a padding token's column lies past the
    slot's last and is written again before decode reads it), and make prompts[i][-1] the slot's next
    input, as _prefill does. Stop tokens end a continuation."""
    s, dev = e.slots, e.slots.cur.device
    rows_t = torch.tensor(rows, device=dev)
    start = s.start[rows_t]  # (n,) unchanged: the kept tokens stay where they are
    new = [p[k:-1] for p, k in zip(prompts, keep)]
    width = max(map(len, new))
    if width > 0:
        ids = torch.full((len(rows), width), e.pad_id or 0, dtype=torch.long)
        for i, t in enumerate(new):
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        pos = torch.tensor(keep, device=dev)[:, None] + torch.arange(width, device=dev)  # (n, S) position ids
        at = start[:, None] + pos  # (n, S) cache columns
        n_keys = min(e.cache.n_cols, int(at.max()) + 1)
        cols = torch.arange(n_keys, device=dev)
        dist = at[:, :, None] - cols  # (n, S, K)
        valid = (cols >= start[:, None, None]) & (dist >= 0)
        e.cache.rows, e.cache.at, e.cache.n_keys = rows_t, at.clamp(max=e.cache.n_cols - 1), n_keys
        try:
            _logits(e, ids.to(dev), pos, valid[:, None], dist[:, None])
        finally:
            e.cache.rows = e.cache.at = None
    cur = start + torch.tensor([len(p) - 1 for p in prompts], device=dev)
    _arm(e, rows_t, cur, [p[-1] for p in prompts], uniforms, limits, True)


def _arm(e, rows_t, cur, tokens, uniforms, limits, stops: bool):
    """Slots rows_t start a pass: input `tokens` at cache column `cur`, their draws and limits."""
    s, dev = e.slots, e.slots.cur.device
    s.uniforms.index_copy_(0, rows_t, uniforms.to(dev))
    s.cur.index_copy_(0, rows_t, cur)
    s.tokens.index_copy_(0, rows_t, torch.tensor(tokens, device=dev))
    s.limit.index_copy_(0, rows_t, torch.tensor(limits, device=dev))
    s.stops.index_fill_(0, rows_t, stops)
    s.n_gen.index_fill_(0, rows_t, 0)
    s.eos_hit.index_fill_(0, rows_t, False)
    s.wrote.index_fill_(0, rows_t, False)
    s.active.index_fill_(0, rows_t, True)


def _steps(e, rows: int, steps: int, n_keys: int) -> None:
    """`steps` decode steps over the first `rows` slots (every slot under CUDA graphs)."""
    full = e.slots
    if rows < full.cur.shape[0]:
        e.slots, e.cache.n_rows = full.head(rows), rows  # the cache narrows its K/V and columns itself
    try:
        for _ in range(steps):
            _step(e, n_keys)
    finally:
        e.slots, e.cache.n_rows = full, full.cur.shape[0]


def _compact(e, busy, owner, left, pos):
    """Move the busy slots to the lowest rows, so an eager step computes len(busy) rows, not n_slots:
    on a CPU a step's time grows with its rows, and at the end of a call the last few sequences
    would otherwise pay for every slot. A sequence's tokens don't depend on its row (its draws
    come from its own seed). Returns the busy slots after the move."""
    n = len(busy)
    src = [b for b in busy if b >= n]
    if not src:
        return busy
    dst = [r for r in range(n) if owner[r] < 0][: len(src)]
    src_t, dst_t = torch.tensor(src, device=e.slots.cur.device), torch.tensor(dst, device=e.slots.cur.device)
    e.cache.copy_rows(src_t, dst_t, min(e.cache.n_cols, max(pos[b] for b in src) + 1))
    e.slots.move(src_t, dst_t)
    for b, r in zip(src, dst):
        owner[r], left[r], pos[r] = owner[b], left[b], pos[b]
        owner[b], pos[b] = -1, 0
    return list(range(n))


def _run(e, prompt_ids, max_new, seeds, progress, first, early_stop, extend):
    s, n_slots = e.slots, e.slots.cur.shape[0]
    kind = "cpu" if s.cur.device.type == "cpu" else "cuda"
    sync_every, key_block = SYNC_EVERY[kind], KEY_BLOCK[kind]

    def draws(seeds_):
        return uniform_table(seeds_, max_new) if e.temperature > 0 else torch.zeros(len(seeds_), max_new)

    table = draws(seeds)
    queue = deque(sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i])))  # longest first
    owner, left = [-1] * n_slots, [0] * n_slots  # prompt in each slot; decode steps it may still need
    pos = [0] * n_slots  # a bound on each slot's cache column (`cur`), known without a host sync
    results = [None] * len(prompt_ids)
    asked = [extend is None] * len(prompt_ids)  # extend was told of the prompt's first pass
    while True:
        free = [b for b in range(n_slots) if owner[b] < 0]
        # refill once enough slots are free: each prefill is an eager forward, worth batching
        if queue and free and (len(free) >= min(max(1, n_slots // 8), len(queue)) or len(free) == n_slots):
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            while take:  # blocks of <= PREFILL_TOKENS, the longest prompt first sets the width
                n = max(1, min(len(take), PREFILL_TOKENS // len(prompt_ids[take[0]])))
                group, take, rows, free = take[:n], take[n:], free[:n], free[n:]
                _prefill(e, rows, [prompt_ids[i] for i in group], table[group], first, early_stop)
                width = max(len(prompt_ids[i]) for i in group) - 1
                for b, i in zip(rows, group):
                    owner[b], left[b], pos[b] = i, first, width
        busy = [b for b in range(n_slots) if owner[b] >= 0]
        if not busy:
            return results
        if e.graphs is None and not queue:  # the tail, stepped eagerly: compute only the busy slots
            busy = _compact(e, busy, owner, left, pos)
        n_rows = n_slots if e.graphs is not None else max(busy) + 1
        steps = min(sync_every, max(left[b] for b in busy))
        # these steps write and read columns up to max(pos) + steps - 1: attend to that many, rounded up
        n_keys = min(e.cache.n_cols, -(-(max(pos[b] for b in busy) + steps) // key_block) * key_block)
        _steps(e, n_rows, steps, n_keys)
        for b in busy:
            left[b] -= steps
            pos[b] += steps
        active = s.active.tolist()  # the host sync
        done = [b for b in busy if not active[b]]
        if not done:
            continue
        idx = torch.tensor(done, device=s.cur.device)
        outs, n_gen, eos = s.out[idx].tolist(), s.n_gen[idx].tolist(), s.eos_hit[idx].tolist()
        start = s.start[idx].tolist()
        held = [c - a + 1 for c, a in zip(s.cur[idx].tolist(), start)]  # tokens in the cache: prompt + ids, less the last drawn
        goes_on = []  # (slot, its continuation)
        for j, b in enumerate(done):
            i, out = owner[b], (outs[j][: n_gen[j]], eos[j])
            more = None if asked[i] else extend(i, *out)
            asked[i] = True
            if more is None:
                results[i] = out
            else:
                assert len(more[0]) + more[2] <= len(prompt_ids[i]) + max_new, \
                    "a continuation's prompt + max_new_tokens must fit in its prompt's + max_new_tokens"
                goes_on.append((b, more, _common_prefix((prompt_ids[i] + out[0])[: held[j]], more[0]), start[j]))
        if goes_on:
            rows = [b for b, *_ in goes_on]
            conts = [c for _, c, *_ in goes_on]
            keep = [min(n, len(c[0]) - 1) for _, c, n, _ in goes_on]  # the last token is the decode step's input
            _continue(e, rows, keep, [c[0] for c in conts], draws([c[1] for c in conts]), [c[2] for c in conts])
            for b, c, _, a in goes_on:  # the slot's next input sits at start + len(prompt) - 1, as _continue put it
                left[b], pos[b] = c[2], a + len(c[0]) - 1
        going = {b for b, *_ in goes_on}
        ended = [b for b in done if b not in going]
        if ended:
            idx = torch.tensor(ended, device=s.cur.device)
            for b in ended:
                owner[b], pos[b] = -1, 0
            s.cur.index_fill_(0, idx, 0)  # an idle slot sits at column 0, inside any n_keys
            s.start.index_fill_(0, idx, 0)
            if progress is not None:
                progress(len(ended))


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
