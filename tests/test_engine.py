"""minitpo.engine against transformers itself: greedy tokens equal `generate` (Llama, Qwen2 with
q/k/v bias, Gemma3 with sliding-window layers, LoRA, NF4 + LoRA, and the low-memory path that samples
from the policy in place), continuous batching changes nothing, LoRA updates reach the engine a Sampler
keeps between calls, its memory goes when the Sampler closes, and sampled tokens follow HF's
temperature + top-p distribution (HF's own warpers are the reference; the draw alone: test_draw.py).
All on CPU; the CUDA paths (bf16 copy, CUDA graphs, torch.compile) were exercised on an H100 by hand."""

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from test_draw import chi2_ok, hf_probs

from minitpo import engine
from minitpo.config import SamplingConfig
from minitpo.dense import build_sampling_model
from minitpo.engine import Sampler

PAD = 0
# different lengths (1 to 9) so the batch is left-padded; no PAD inside
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21], [22, 23, 24, 25],
           [26, 27, 28, 29, 30, 31], [32, 33, 34], [35, 36, 37, 38, 39, 40, 41]]
MAX_NEW = 14
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# init 0.2 (HF uses 0.02): logits far apart, so fp32 rounding differences don't flip a greedy argmax
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=PAD)


def tiny(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    if kind == "qwen2":  # q/k/v bias, untied head
        return Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False)).eval()
    # Gemma3: a sliding layer with window 4 (prompts + new tokens are longer) and a full layer
    cfg = Gemma3TextConfig(**SIZES, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def hf_greedy(model, prompts, eos, max_new=MAX_NEW):
    """`generate` on a left-padded batch, cut at the first EOS: [(new tokens, stopped at EOS)]."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         eos_token_id=eos or None, pad_token_id=PAD)[:, width:].tolist()
    result = []
    for row in out:
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        result.append((row, False) if cut is None else (row[:cut], True))
    return result


def pick_eos(model, prompts, max_new=MAX_NEW):
    """A token that greedy decoding emits mid-sequence for some prompts but not all, so the
    comparison covers both EOS stops and max_new_tokens cuts."""
    rows = [r for r, _ in hf_greedy(model, prompts, [], max_new)]
    for tok in sorted({t for r in rows for t in r[1:-1]}):
        if 0 < sum(tok in r[1:] for r in rows) < len(rows):
            return [tok]
    raise AssertionError("no usable EOS token in the greedy outputs")


def open_engine(model, eos, batch_size, temperature=0.0, top_p=1.0, memory_gb=None):
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, batch_size=batch_size, memory_gb=memory_gb)
    return Sampler(model, cfg, eos_token_ids=eos, pad_token_id=PAD)


def generate_tokens(model, prompts, *, max_new_tokens, temperature, top_p, eos_token_ids, batch_size, seeds,
                    memory_gb=None, **call):
    """One call of a Sampler opened for it and closed after."""
    with open_engine(model, eos_token_ids, batch_size, temperature, top_p, memory_gb) as sampler:
        return sampler.generate(prompts, max_new_tokens=max_new_tokens, seeds=seeds, **call)


def engine_greedy(model, prompts, eos, batch_size, sampler=None):
    if sampler is not None:
        return sampler.generate(prompts, max_new_tokens=MAX_NEW, seeds=[0] * len(prompts))
    return generate_tokens(model, prompts, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0,
                           eos_token_ids=eos, batch_size=batch_size, seeds=[0] * len(prompts))


def lora(model, seed=1, dropout=0.0):
    """Non-zero B (init_lora_weights=False), so the adapter changes the outputs."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=dropout)
    return get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_greedy_matches_generate(kind):
    model = tiny(kind)
    eos = pick_eos(model, PROMPTS)
    expected = hf_greedy(model, PROMPTS, eos)
    assert any(s for _, s in expected) and not all(s for _, s in expected)
    assert engine_greedy(model, PROMPTS, eos, batch_size=len(PROMPTS)) == expected


def test_greedy_matches_generate_lora_and_follows_updates():
    model = lora(tiny("qwen2"))
    eos = pick_eos(model, PROMPTS)
    with model.disable_adapter():
        base_out = hf_greedy(model, PROMPTS, eos)
    expected = hf_greedy(model, PROMPTS, eos)
    assert expected != base_out, "the adapter should change the greedy outputs"
    with open_engine(model, eos, batch_size=8) as sampler:
        assert engine_greedy(model, PROMPTS, eos, 8, sampler) == expected
        built = sampler.engine
        # a training step changes the LoRA weights in place; the engine kept between calls must see it
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.5)
        expected = hf_greedy(model, PROMPTS, eos)
        assert engine_greedy(model, PROMPTS, eos, 8, sampler) == expected
        assert sampler.engine is built and built.lm is not built.base  # the same dense copy, refreshed


def test_in_place_sampling_matches_generate(monkeypatch):
    """When the GPU can't hold a dense copy the policy samples in place (LoRA unmerged); it must be
    put in eval mode for sampling (LoRA dropout off) and handed back in the mode it came in."""
    monkeypatch.setattr(engine, "_plan", lambda base, want, n_cols, device, budget=None: (False, want))
    model = lora(tiny("qwen2"), dropout=0.5)
    eos = pick_eos(model, PROMPTS)
    expected = hf_greedy(model, PROMPTS, eos)
    model.train()
    with open_engine(model, eos, batch_size=3) as sampler:
        assert engine_greedy(model, PROMPTS, eos, 3, sampler) == expected
        assert model.training and sampler.engine.lm is model.get_base_model()


def nf4_policy(tmp_path):
    tiny("qwen2").save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)


def test_greedy_matches_generate_nf4_lora(tmp_path):
    model = lora(nf4_policy(tmp_path))
    # On CPUs with AVX512-BF16, bnb swaps in a bf16 kernel at the first eval forward; the engine's
    # dense copy is fp32, so keep bnb on its fp32 path to compare tokens exactly.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    eos = pick_eos(model, PROMPTS)
    assert engine_greedy(model, PROMPTS, eos, batch_size=8) == hf_greedy(model, PROMPTS, eos)


def test_dense_copy_of_nf4_survives_bnb_cpu_repacking(tmp_path):
    """On CPUs with AVX512-BF16, bnb repacks NF4 weights in place at the policy's first eval
    forward and keeps their block scales in bf16 from then on. The dense copy must follow: equal
    to the fresh dequantized weights up to that rounding, 2**-8 of a block's absmax (bnb's own
    inverse of the repacking scrambles the scales when in_features > blocksize)."""
    model = lora(nf4_policy(tmp_path))
    before = build_sampling_model(model, torch.float32, torch.device("cpu")).state_dict()
    model(torch.tensor([PROMPTS[0]]))  # may repack
    after = build_sampling_model(model, torch.float32, torch.device("cpu")).state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert (after[k] - before[k]).abs().max() <= 2**-8 * before[k].abs().max() + 1e-6, k


def test_continuous_batching_changes_nothing():
    """3 slots for 8 prompts: slots are refilled mid-run, results equal one batch of 8 and HF."""
    model = tiny("llama")
    eos = pick_eos(model, PROMPTS)
    one_batch = engine_greedy(model, PROMPTS, eos, batch_size=8)
    done = []
    out = generate_tokens(model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0, eos_token_ids=eos,
                          batch_size=3, seeds=[0] * len(PROMPTS), progress=done.append)
    assert out == one_batch == hf_greedy(model, PROMPTS, eos)
    assert sum(done) == len(PROMPTS)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_the_tail_steps_only_the_busy_slots(kind):
    """On CPU, once no prompt waits, the running sequences move to the lowest slots and a decode step
    computes only them (a step's time grows with its rows): 40 new tokens with an EOS that ends some
    sequences early, so rows are compacted at a host sync (every engine.SYNC_EVERY["cpu"] steps). Greedy
    tokens stay transformers' own; sampled tokens stay those each prompt draws alone."""
    model = tiny(kind)
    max_new = 40
    assert max_new > 2 * engine.SYNC_EVERY["cpu"]
    eos = pick_eos(model, PROMPTS, max_new)
    rows = []  # the batch size of each decode forward (one new token per row)

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(module, torch.nn.Embedding) and ids is not None and ids.shape[-1] == 1:
            rows.append(ids.shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: count(m, a, {}))
    try:
        out = generate_tokens(model, PROMPTS, max_new_tokens=max_new, temperature=0.0, top_p=1.0, eos_token_ids=eos,
                              batch_size=8, seeds=[0] * len(PROMPTS))
    finally:
        handle.remove()
    expected = hf_greedy(model, PROMPTS, eos, max_new)
    assert out == expected
    still_running = [sum(len(toks) + stopped > n for toks, stopped in expected) for n in range(max_new)]
    assert rows[0] == 8 and min(rows) < 8 and sum(rows) < 8 * len(rows)
    # a step computes at least the sequences that still need it, and after a sync no more rows than ran
    assert all(r >= still_running[i] for i, r in enumerate(rows))
    assert all(r <= max(still_running[i - i % engine.SYNC_EVERY["cpu"]], 1) for i, r in enumerate(rows))

    kw = dict(max_new_tokens=max_new, temperature=0.8, top_p=0.95, eos_token_ids=eos)
    seeds = [7 + i for i in range(len(PROMPTS))]
    together = generate_tokens(model, PROMPTS, batch_size=8, seeds=seeds, **kw)
    alone = [generate_tokens(model, [p], batch_size=1, seeds=[s], **kw)[0] for p, s in zip(PROMPTS, seeds)]
    assert together == alone
    assert len({len(t) for t, _ in together}) > 1  # sequences ended at different steps


def test_first_token_distribution_end_to_end():
    """4,000 copies of one prompt, one new token each: the empirical distribution of that token
    equals HF's temperature + top-p distribution over the model's logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SIZES, "vocab_size": 32, "initializer_range": 0.15})).eval()
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].float()  # (1, V)
    temperature, top_p, n = 0.8, 0.9, 4000
    probs = hf_probs(logits, temperature, top_p)
    assert 3 <= (probs > 0).sum() < 32, "the nucleus should be a proper subset"
    out = generate_tokens(model, [prompt] * n, max_new_tokens=1, temperature=temperature, top_p=top_p,
                          eos_token_ids=[], batch_size=1000, seeds=list(range(n)))
    assert all(not stopped and len(toks) == 1 for toks, stopped in out)
    counts = torch.bincount(torch.tensor([toks[0] for toks, _ in out]), minlength=32)
    assert counts[probs == 0].sum() == 0, "tokens outside the nucleus must never be drawn"
    assert chi2_ok(counts, probs)
    assert not chi2_ok(counts, hf_probs(logits, 1.0, top_p)), "the test must tell temperature 0.8 from 1.0"


def test_a_sequence_draws_from_its_own_seed_whatever_its_batch():
    """Sampled (T 0.8, top-p 0.95), each prompt with its own seed: one batch of 8, 3 slots refilled
    mid-run, and each prompt alone in reverse order give the same tokens; so does transformers'
    generate with the same draw (sample.GenerateSampler). A different seed gives other tokens."""
    from minitpo.sample import GenerateSampler

    model = tiny("llama")
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, eos_token_ids=[])
    seeds = [101 + i for i in range(len(PROMPTS))]
    together = generate_tokens(model, PROMPTS, batch_size=8, seeds=seeds, **kw)
    refilled = generate_tokens(model, PROMPTS, batch_size=3, seeds=seeds, **kw)
    alone = [generate_tokens(model, [p], batch_size=1, seeds=[s], **kw)[0] for p, s in reversed(list(zip(PROMPTS, seeds)))]
    assert together == refilled == alone[::-1]
    with GenerateSampler(model, SamplingConfig(temperature=0.8, top_p=0.95, batch_size=3), eos_token_ids=[],
                         pad_token_id=PAD) as hf:
        assert hf.generate(PROMPTS, max_new_tokens=MAX_NEW, seeds=seeds) == together
    other = generate_tokens(model, PROMPTS, batch_size=8, seeds=[s + 1000 for s in seeds], **kw)
    assert sum(a != b for a, b in zip(other, together)) >= 6


def test_a_stop_token_ends_a_sequence_once_it_has_written_text():
    """stop_ids: the sequence ends at the first stop token that follows a token outside blank_ids; the
    stop token is kept and counts as EOS; everything before it is the unstopped sequence's tokens
    (3 slots, so refilled slots start with a fresh `wrote` flag)."""
    model = tiny("llama")
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, eos_token_ids=[], batch_size=3,
              seeds=[7 + i for i in range(len(PROMPTS))])
    plain = generate_tokens(model, PROMPTS, **kw)
    counts = torch.bincount(torch.tensor([t for ids, _ in plain for t in ids[1:]]))
    stop, blank = int(counts.argmax()), int(plain[0][0][0])  # the commonest token; one first token
    stopped = generate_tokens(model, PROMPTS, stop_ids=[stop], blank_ids=[blank], **kw)
    ended = 0
    for (ids, _), (cut, hit) in zip(plain, stopped):
        wrote = [i for i, t in enumerate(ids) if t != blank]  # positions of text-writing tokens
        at = next((i for i, t in enumerate(ids) if t == stop and wrote and wrote[0] < i), None)
        if at is None:
            assert (cut, hit) == (ids, False)
        else:
            ended += 1
            assert (cut, hit) == (ids[:at + 1], True)
    assert ended >= 3  # 3 of the 8 meet a stop here: the path is exercised


# ---------------------------------------------------------------- memory, shared prefill, filled columns

GB = 2**30


def test_fit_slots_sizes_from_memory_within_a_cap():
    """Qwen2.5-1.5B's shape in bf16 with 1,024 + 128 columns: ~38 MB a slot, a 3.1 GB sampling copy."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      vocab_size=151936)
    per_slot = engine.slot_bytes(cfg, 1152, 2)
    assert per_slot == 2 * 28 * 2 * 128 * 1152 * 2 + 32 * 151936
    copy = int(3.1 * GB)
    assert engine.fit_slots(40 * GB, copy, per_slot, 256) == (True, 256)  # an H100's free memory: the cap
    use_copy, slots = engine.fit_slots(40 * GB, copy, per_slot, 256, budget=12 * GB)  # a 12 GB budget
    assert use_copy and copy + slots * per_slot <= 12 * GB < copy + (slots + 1) * per_slot and slots == 252
    use_copy, slots = engine.fit_slots(5 * GB, copy, per_slot, 256)  # no room for 64 slots beside a copy
    assert not use_copy and slots == 5 * GB // per_slot == 141
    assert engine.fit_slots(1, copy, per_slot, 256) == (False, 1)  # never below one slot


def test_auto_batch_size_follows_the_memory_budget():
    """batch_size auto with memory_gb for 3 slots (no room for a dense copy: the policy samples in
    place): 3 slots, refilled, the same tokens; without a cap, one slot per prompt."""
    model = tiny("llama")
    eos = pick_eos(model, PROMPTS)
    expected = engine_greedy(model, PROMPTS, eos, batch_size=8)
    n_cols = -(-(max(map(len, PROMPTS)) + MAX_NEW) // 64) * 64
    budget = 3 * engine.slot_bytes(model.config, n_cols, 4) + 100
    with open_engine(model, eos, "auto", memory_gb=budget / GB) as sampler:
        assert engine_greedy(model, PROMPTS, eos, "auto", sampler) == expected
        assert sampler.engine.slots.cur.shape[0] == 3 and sampler.engine.lm is model
    with open_engine(model, eos, "auto") as sampler:
        engine_greedy(model, PROMPTS, eos, "auto", sampler)
        assert sampler.engine.slots.cur.shape[0] == 8  # the host's free memory: every prompt at once


def test_copies_of_a_prompt_share_one_prefill():
    """4 copies of each of 3 prompts (the K candidates of 3 instructions), each copy with its own seed:
    3 prefilled rows, not 12, and every copy's tokens equal to its own run alone."""
    model = tiny("gemma3")  # sliding-window layers: the copied columns feed both kinds of layer
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    seeds = list(range(12))
    kw = dict(max_new_tokens=MAX_NEW, temperature=2.0, top_p=1.0, eos_token_ids=[])  # flat: varied
    with open_engine(model, [], 12, temperature=2.0) as sampler:
        shared = sampler.generate(prompts, max_new_tokens=MAX_NEW, seeds=seeds)
        assert sampler.engine.prefill_rows == 3
    alone = [generate_tokens(model, [p], batch_size=1, seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert shared == alone
    assert len({tuple(t) for t, _ in shared[:4]}) > 1, "the copies must sample different tokens"


def test_decode_reads_only_the_filled_columns(monkeypatch):
    """With 16-column blocks, decode attends to 16, 32, ... columns as sequences grow, never the whole
    cache, and greedy tokens still equal generate's (every architecture, a LoRA included)."""
    monkeypatch.setitem(engine.KEY_BLOCK, "cpu", 16)
    widths = []
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda e, n_keys: (widths.append((n_keys, e.cache.n_cols)), step(e, n_keys)))
    for model in (tiny("llama"), tiny("gemma3"), lora(tiny("qwen2"))):
        eos = pick_eos(model, PROMPTS)
        assert engine_greedy(model, PROMPTS, eos, batch_size=3) == hf_greedy(model, PROMPTS, eos)
    assert {w for w, _ in widths} >= {16, 32} and all(w <= n for w, n in widths)
    assert any(w < n for w, n in widths)


def test_leaving_the_block_frees_the_engine():
    """The sampling copy and KV cache live as long as the `with` block: a call of another shape frees the
    engine before building its own, and the exit frees the last; a closed sampler takes no more calls."""
    model = tiny("llama")
    with open_engine(model, [], batch_size=8) as sampler:
        sampler.generate(PROMPTS, max_new_tokens=MAX_NEW, seeds=[0] * 8)
        first = weakref.ref(sampler.engine.lm)
        assert sampler.engine.lm is not model  # a dense copy: what must not outlive its use
        sampler.generate(PROMPTS, max_new_tokens=MAX_NEW - 4, seeds=[0] * 8)  # another shape
        gc.collect()
        assert first() is None
        second = weakref.ref(sampler.engine.lm)
    gc.collect()
    assert second() is None and sampler.engine is None
    with pytest.raises(AssertionError, match="closed"):
        sampler.generate(PROMPTS, max_new_tokens=MAX_NEW, seeds=[0] * 8)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2-lora"])
def test_a_continuation_goes_on_in_its_slot(kind):
    """sample.py's forced marker: a first pass of 6 tokens, then `extend` continues each prompt with some of
    what it wrote (all, all but 2, none) and 2 tokens more. The continuation goes on in its slot, writing
    only what the cache lacks (no prompt is prefilled twice), and its tokens equal the continuation's
    prompt sampled afresh by the engine, by transformers' generate (greedy), and by the generate sampler
    (sampled, T 0.8), with 3 slots refilled mid-run and 8."""
    from minitpo.sample import GenerateSampler

    model = lora(tiny("qwen2")) if kind == "qwen2-lora" else tiny(kind)
    first, limit = 6, 9

    def extend_of(firsts):
        def extend(i, ids, ended):
            firsts[i] = (ids, ended)
            if i == 5:
                return None  # this one is final after its first pass
            kept = ids if i % 3 == 0 else ids[:-2] if i % 3 == 1 else []
            return PROMPTS[i] + kept + [40 + i, 41], 500 + i, limit - (i % 2)
        return extend

    for temperature, top_p in ((0.0, 1.0), (0.8, 0.95)):
        kw = dict(max_new_tokens=first + 2 + limit, seeds=[100 + i for i in range(len(PROMPTS))], first_tokens=first)
        for batch_size in (8, 3):
            firsts = {}
            with open_engine(model, [], batch_size, temperature, top_p) as sampler:
                out = sampler.generate(PROMPTS, extend=extend_of(firsts), **kw)
                assert sampler.engine.prefill_rows == len(PROMPTS)  # continuations were not prefilled
            assert all(len(ids) == first and not ended for ids, ended in firsts.values()) and len(firsts) == 8
            assert out[5] == firsts[5]
            conts = {i: extend_of({})(i, *firsts[i]) for i in range(8) if i != 5}
            for i, (prompt, seed, n) in conts.items():
                alone = generate_tokens(model, [prompt], max_new_tokens=n, temperature=temperature, top_p=top_p,
                                        eos_token_ids=[], batch_size=1, seeds=[seed])[0]
                assert out[i] == alone and len(alone[0]) == n, (kind, i)
                if temperature == 0:
                    assert out[i] == hf_greedy(model, [prompt], [], n)[0]
        if temperature > 0:
            cfg = SamplingConfig(temperature=temperature, top_p=top_p, batch_size=3)
            with GenerateSampler(model, cfg, eos_token_ids=[], pad_token_id=PAD) as hf:
                assert hf.generate(PROMPTS, extend=extend_of({}), **kw) == out
