"""sequence_logps (chunked, lean) against naive_sequence_logps (full logits) and against an independent
per-sequence loop, on tiny random Llama, Qwen2 and Gemma3 models; LoRA and a real bitsandbytes NF4 base."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from minitpo.logps import naive_sequence_logps, sequence_logps
from minitpo.model import disable_bnb_cpu_weight_packing

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # larger than HF's 0.02 so that log-probs are far from uniform
    pad_token_id=0,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(family):
    if family == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "qwen2":  # Qwen2.5 small models tie lm_head to the embeddings
        return Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "gemma3":  # a small softcap so that tanh actually bends the logits
        return Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=2.0, sliding_window=4)
    raise ValueError(family)


def tiny_model(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


def lora(model):
    # init_lora_weights=False: random A and B, so that the LoRA path changes the output and both get grads.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def make_batch(lengths, prompt_lengths, seq_len, padding_side="right", pad_id=0, seed=0):
    """Random token rows padded to seq_len; returns the (B, T) tensors and each row alone as
    (tokens (L,), prompt_length) for the per-sequence reference."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_ids = torch.full((batch, seq_len), pad_id)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    completion_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    rows = []
    for i, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths)):
        tokens = torch.randint(1, VOCAB, (length,), generator=g)
        start = 0 if padding_side == "right" else seq_len - length
        input_ids[i, start : start + length] = tokens
        attention_mask[i, start : start + length] = 1
        completion_mask[i, start + prompt_length : start + length] = 1
        rows.append((tokens, prompt_length))
    return input_ids, attention_mask, completion_mask, rows


@torch.no_grad()
def per_sequence_logps(model, rows):
    """Independent reference: each sequence alone (no padding, no masks), log p(tokens[t] | tokens[:t])
    summed in float64 over t >= prompt_length, one position at a time."""
    out = []
    for tokens, prompt_length in rows:
        logps = model(input_ids=tokens[None]).logits[0].double().log_softmax(-1)  # (L, V)
        out.append(sum(logps[t - 1, tokens[t]] for t in range(prompt_length, len(tokens))))
    return torch.stack(out)


LENGTHS, PROMPTS, SEQ_LEN = [14, 9, 16], [5, 3, 7], 16


def assert_grads_match(model, chunk_size):
    """Backprop the same weighted sum through naive and lean logps; every trainable grad must agree."""
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    weights = torch.tensor([1.0, -2.0, 0.5])  # distinct per-row upstream grads, as DPO gives
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        if lean:
            logps, _ = sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size)
        else:
            logps, _ = naive_sequence_logps(model, input_ids, attention_mask, completion_mask)
        (logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in params:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_lean_matches_naive_and_per_sequence_loop(family, padding_side):
    model = tiny_model(family)
    input_ids, attention_mask, completion_mask, rows = make_batch(LENGTHS, PROMPTS, SEQ_LEN, padding_side)
    with torch.no_grad():
        lean, lean_n = sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=3)
        naive, naive_n = naive_sequence_logps(model, input_ids, attention_mask, completion_mask)
    expected = per_sequence_logps(model, rows).float()
    assert lean.dtype == torch.float32 and lean.shape == (3,)
    # Scored tokens are completion tokens only: length - prompt_length per row.
    assert lean_n.tolist() == naive_n.tolist() == [9, 6, 9]
    torch.testing.assert_close(naive, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(lean, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(lean, naive, atol=1e-4, rtol=0)


def test_padding_token_ids_do_not_matter():
    model = tiny_model("llama")
    batches = [make_batch(LENGTHS, PROMPTS, SEQ_LEN, pad_id=pad) for pad in (0, 42)]
    with torch.no_grad():
        first, second = [sequence_logps(model, *batch[:3])[0] for batch in batches]
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunk_size_does_not_change_result(chunk_size):
    # 24 scored tokens in all: chunk 1 and 3 split them, 1024 keeps them in one chunk.
    model = tiny_model("qwen2")
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    with torch.no_grad():
        lean, _ = sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size)
        naive, _ = naive_sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(lean, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_full_model_gradients_match_naive(family):
    # All parameters trainable, lm_head included (tied to the embeddings for qwen2): exercises the
    # hidden-state and the weight gradient of the chunked backward, and the softcap chain rule (gemma3).
    model = tiny_model(family)
    assert_grads_match(model, chunk_size=5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_gradients_match_naive(family):
    model = lora(tiny_model(family))
    assert_grads_match(model, chunk_size=4)


def test_disabled_adapter_scores_the_base_model():
    # With its adapters off, the policy scores exactly as its bare base model (the seed).
    base = tiny_model("llama")
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    with torch.no_grad():
        expected, _ = naive_sequence_logps(base, input_ids, attention_mask, completion_mask)
        model = lora(base)
        with model.disable_adapter():
            ref, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
        policy, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    # 1e-4, the tolerance of every lean-vs-naive comparison here: sums of ~60 in float32
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=0)
    assert (policy - ref).abs().max() > 1e-3, "random LoRA weights should change the log-probs"


def test_lora_on_lm_head_is_refused():
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(tiny_model("llama"), config)
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    with pytest.raises(AssertionError, match="lm_head"):
        sequence_logps(model, input_ids, attention_mask, completion_mask)


# A bitsandbytes trap on CPU (0.50.2): a Linear4bit in eval mode that sees a no-grad input repacks its
# weight for an inference kernel (gemv_4bit) that has no autograd, for good; later backward passes then
# silently drop the gradient through every 4-bit layer. minitpo.model.disable_bnb_cpu_weight_packing
# prevents it (tests/test_model.py); this warning, turned into an error, catches the trap.
@pytest.mark.filterwarnings("error:.*gemv_4bit")
def test_nf4_base_with_lora_matches_naive(tmp_path):
    # Real bitsandbytes NF4 on CPU: save the tiny model, reload it 4-bit, attach LoRA.
    from transformers import BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    disable_bnb_cpu_weight_packing(base)  # the no-grad forwards below would repack the weights otherwise
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = lora(base).eval()
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    with torch.no_grad():
        lean, _ = sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=3)
        naive, _ = naive_sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(lean, naive, atol=1e-4, rtol=0)
    assert_grads_match(model, chunk_size=3)


def test_masks_are_checked():
    model = tiny_model("llama")
    input_ids, attention_mask, completion_mask, _ = make_batch(LENGTHS, PROMPTS, SEQ_LEN)
    bad = completion_mask.clone()
    bad[0, 0] = 1  # nothing predicts the first token
    with pytest.raises(AssertionError, match="first token"):
        sequence_logps(model, input_ids, attention_mask, bad)
    bad = completion_mask.clone()
    bad[1, -1] = 1  # row 1 is 9 tokens long: position 15 is padding
    with pytest.raises(AssertionError, match="padding"):
        sequence_logps(model, input_ids, attention_mask, bad)


def random_pairs(n_pairs=3, seed=3):
    """train.Example pairs of random tokens: prompts of 4-9 tokens, completions of 2-8."""
    from minitpo.train import Example

    g = torch.Generator().manual_seed(seed)

    def toks(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
    return [Example(toks(4, 9), toks(2, 8), toks(2, 8)) for _ in range(n_pairs)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama-eager"])
def test_pair_logps_runs_each_prompt_once_and_matches_whole_rows(family):
    """pair_logps (a pair's prompt run once, its K/V shared by both sides) gives each row's log-prob as
    the row alone does (an independent per-sequence loop) and as sequence_logps on the whole padded
    rows; the gradients of every LoRA weight equal sequence_logps' (prompts of different lengths, so
    the shared K/V carry padding between prompt and completion)."""
    from minitpo.logps import pair_logps, shares_prompts
    from minitpo.train import collate, collate_pairs

    model = tiny_model(family.removesuffix("-eager"))
    if family.endswith("eager"):
        model.config._attn_implementation = "eager"
    model = lora(model)
    assert shares_prompts(model)
    pairs = random_pairs()
    b = len(pairs)
    whole = collate(pairs, pad_id=0)
    shared = collate_pairs(pairs, pad_id=0)
    assert shared[0].shape[1] + shared[2].shape[1] < whole[0].shape[1] + 7  # the prompts are not in the rows
    rows = [(torch.tensor(e.prompt_ids + c), len(e.prompt_ids)) for e in pairs for c in (e.chosen_ids, e.rejected_ids)]
    with torch.no_grad():
        expected = per_sequence_logps(model, rows).float()
        got, n = pair_logps(model, *shared, chunk_size=3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert n.tolist() == [len(c) for e in pairs for c in (e.chosen_ids, e.rejected_ids)]

    weights = torch.tensor([1.0, -2.0, 0.5, 0.25, -1.0, 3.0])  # per row, as DPO's upstream grads differ
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = []
    for use_pairs in (False, True):
        model.zero_grad(set_to_none=True)
        if use_pairs:
            logps = pair_logps(model, *shared)[0]  # rows 2b, 2b + 1
        else:
            whole_logps = sequence_logps(model, *whole)[0]  # rows b, B + b
            logps = torch.stack([whole_logps[:b], whole_logps[b:]], dim=1).flatten()
        (logps * weights).sum().backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    for name in params:  # fp32 rounding, relative to each gradient's scale (up to ~50 here)
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_shares_prompts_only_where_the_cache_keeps_every_token():
    """A sliding-window layer (Gemma3) keeps only its window in the cache, and activation checkpointing
    turns the cache off: there train.py scores whole rows."""
    from minitpo.logps import shares_prompts
    from minitpo.model import enable_checkpointing

    assert not shares_prompts(lora(tiny_model("gemma3")))
    model = lora(tiny_model("llama"))
    assert shares_prompts(model)
    enable_checkpointing(model)
    assert not shares_prompts(model)
