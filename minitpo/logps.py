"""Sequence log-probs for preference training: sum of log p(token | prefix) over the completion tokens.

Consumes a causal LM (a Hugging Face `*ForCausalLM`, or a peft `PeftModel` around one, 4-bit base allowed)
and a padded batch:
    input_ids       (B, T)  prompt + thought + response + EOS, then padding
    attention_mask  (B, T)  1 at real tokens, 0 at padding
    completion_mask (B, T)  1 at the tokens being scored (thought + response + EOS); 0 at prompt and padding
Produces logps (B,) float32, the summed log-probs of the scored tokens, and n_tokens (B,) int64, their count.

Positions: the logit at position t predicts token t + 1, so token t is scored with the hidden state at
t - 1, and completion_mask[:, 0] must be 0 (nothing predicts the first token). Padding may be on either side;
train.py pads on the right. We pass position_ids = cumsum(attention_mask) - 1 so that a left-padded
row sees the same positions as the same row alone without padding (with HF's default arange positions
RoPE would give the same result only up to rounding).

Why not `model(...).logits`: for a batch of 2 x 8 sequences of 1024 tokens and Qwen2.5's 151,936-token
vocabulary, the (B, T, V) logits are 10 GB in float32, and log_softmax and its backward add as much again;
that dwarfs a 1.5B 4-bit model. `sequence_logps` never builds them:
  1. find the N positions whose hidden state predicts a scored token, and their targets (N,);
  2. run the decoder body (`base.model`) for the final hidden states (B, T, H), already normed, and keep
     those N rows, (N, H);
  3. `_ChunkedTokenLogps` applies lm_head, optional final-logit softcapping (Gemma 2/3) and log_softmax in
     float32 to chunk_size rows at a time and keeps only the target's log-prob, (N,).
     The gradient of each row is
        d logp(y) / d hidden = (onehot(y) - softmax(logits)) @ W
     With a frozen lm_head (QLoRA) it is formed in the forward, while the chunk's log-probs exist, and
     saved as (N, H); backward only scales it. With a trainable lm_head, backward recomputes each
     chunk's logits instead. Either way peak memory grows with chunk_size * V, not T * V. Gradients
     flow to the hidden states, hence to the LoRA weights.
`pair_logps` does the same for DPO's pairs with one forward of each shared prompt: its K/V are repeated
for the chosen and the rejected row (train.py uses it wherever `shares_prompts`).
`naive_sequence_logps` is the textbook version, kept as the reference for tests and benchmarks. On one
H100 (Qwen2.5-1.5B shape, NF4 + LoRA, 8 pairs x 1024 tokens, benchmarks/train_step.py) a DPO step peaked at
5.3 GiB instead of 30.6 and ran at 1.01x naive's tokens/s (benchmarks/RESULTS.md). At that size the step is
close to bound by the CPU launching kernels, so the row indices are found before the body runs (see below).

Only an un-adapted lm_head is supported: LoRA on lm_head or a quantized lm_head fails an assert (QLoRA
keeps lm_head in bf16 and never targets it). Logit transforms other than softcapping (e.g. Cohere's
logit_scale) are not applied, so such configs are refused too.
"""

import torch
from torch import Tensor

from minitpo.model import cache_kwarg, hf_model, prepared_mask


class _ChunkedTokenLogps(torch.autograd.Function):
    """token_logps[i] = log_softmax(softcap(hidden[i] @ weight.T))[targets[i]], chunk_size rows at a time.

    Shapes: hidden (N, H), weight (V, H), targets (N,) -> token_logps (N,) float32. Saved for backward:
    with a frozen weight, -d token_logps[i] / d hidden[i] as (N, H); else hidden, weight (references, not
    copies) and targets. Never the (N, V) logits.
    Matmuls run in weight.dtype (bf16 under QLoRA), softmax arithmetic in float32. Autocast is switched off
    inside so the dtypes are the ones written here whatever the caller's context. Per chunk, the (c, V)
    values see: the matmul, log_softmax (with its float32 cast), exp in place and the cast for the second
    matmul; at most one chunk's buffers are alive at a time (c x V x 10 bytes with a bf16 weight).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap):
        n = hidden.shape[0]
        token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # With a frozen lm_head (QLoRA) the only gradient is d logp / d hidden, and it is cheapest to
        # form it here, while each chunk's log-probs exist: one extra (c, V) @ (V, H) matmul now instead of
        # recomputing the logits in backward (two matmuls). Backward then only scales the (N, H) rows.
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        neg_unit_grad = torch.empty_like(hidden) if eager else None  # (N, H): -d token_logps[i] / d hidden[i]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                chunk_targets = targets[start:end, None]  # (c, 1)
                logp, tanh = _chunk_log_softmax(hidden[start:end], weight, softcap)  # (c, V) float32
                token_logps[start:end] = logp.gather(1, chunk_targets).squeeze(1)
                if eager:
                    grad = _softmax_minus_onehot(logp, chunk_targets, tanh).to(weight.dtype)
                    neg_unit_grad[start:end] = grad @ weight
                    del grad
                del logp, tanh  # before the next chunk allocates its own: one chunk's buffers alive, not two
        ctx.save_for_backward(*((neg_unit_grad,) if eager else (hidden, weight, targets)))
        ctx.eager, ctx.chunk_size, ctx.softcap = eager, chunk_size, softcap
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):  # (N,)
        if ctx.eager:
            (neg_unit_grad,) = ctx.saved_tensors
            return neg_unit_grad * -grad_token_logps[:, None].to(neg_unit_grad.dtype), None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate the weight gradient in float32: it sums over all N rows.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        neg_grad_token_logps = -grad_token_logps.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = min(start + ctx.chunk_size, hidden.shape[0])
                logp, tanh = _chunk_log_softmax(hidden[start:end], weight, ctx.softcap)  # (c, V) float32
                grad = _softmax_minus_onehot(logp, targets[start:end, None], tanh)
                grad = grad.mul_(neg_grad_token_logps[start:end, None]).to(weight.dtype)  # d loss / d logits
                if need_hidden:
                    grad_hidden[start:end] = (grad @ weight).to(hidden.dtype)  # (c, H)
                if need_weight:
                    grad_weight += (grad.t() @ hidden[start:end].to(weight.dtype)).float()  # (V, H)
                del logp, tanh, grad
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_log_softmax(hidden_chunk, weight, softcap):
    """(c, H) @ (V, H).T, softcapped as cap * tanh(z / cap) when softcap is set, then log_softmax in
    float32: (c, V). Also returns tanh(z / cap) (c, V), which the chain rule needs, or None."""
    logits = hidden_chunk.to(weight.dtype) @ weight.t()  # (c, V) in weight.dtype
    if softcap is None:
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32), None
    tanh = logits.float().div_(softcap).tanh_()
    return torch.log_softmax(tanh * softcap, dim=-1), tanh


def _softmax_minus_onehot(logp, targets, tanh):
    """-d logp(y) / d pre-softcap logits = (softmax - onehot(y)) * (1 - tanh^2), (c, V) float32, built in
    place in the log_softmax buffer (softmax = exp(logp)); targets is (c, 1)."""
    grad = logp.exp_()
    grad.scatter_add_(1, targets, torch.full_like(grad[:, :1], -1.0))
    if tanh is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
        grad.mul_(tanh.square_().neg_().add_(1.0))
    return grad


def _position_ids(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting real tokens only, so left padding does not shift them; 0 on padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _check_masks(input_ids, attention_mask, completion_mask):
    assert input_ids.shape == attention_mask.shape == completion_mask.shape, (
        f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
        f"completion_mask {tuple(completion_mask.shape)} must all be (B, T)"
    )
    assert not completion_mask[:, 0].any(), "completion_mask[:, 0] must be 0: no logit predicts the first token"
    assert not (completion_mask.bool() & ~attention_mask.bool()).any(), "completion_mask marks padding tokens"


def _lm_head_weight_and_softcap(base):
    """The (V, H) lm_head weight and the final-logit softcap (None for Llama and Qwen2), after checking
    that plain `hidden @ weight.T` (then softcapping) is exactly what the model's forward computes."""
    lm_head = base.get_output_embeddings()
    assert not hasattr(lm_head, "base_layer"), (
        "sequence_logps does not support adapters on lm_head; leave lm_head out of lora target_modules "
        "or use naive_sequence_logps"
    )
    assert isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None, f"unsupported lm_head {lm_head!r}"
    assert lm_head.weight.dtype.is_floating_point, (
        f"lm_head weight is {lm_head.weight.dtype} (quantized?); sequence_logps needs a float lm_head"
    )
    text_config = base.config.get_text_config()
    assert getattr(text_config, "logit_scale", None) is None, "configs with logit_scale are not supported"
    return lm_head.weight, getattr(text_config, "final_logit_softcapping", None)


def sequence_logps(
    model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens (B,) float32 and their counts (B,) int64, without ever
    building the (B, T, V) logits; see the module docstring for how. Differentiable w.r.t. every trainable
    parameter below lm_head (LoRA weights included). The reference is the policy as it stands before
    the iteration trains (M_t): train.py scores the pairs with it under `torch.no_grad()` first.
    """
    _check_masks(input_ids, attention_mask, completion_mask)
    return _scored_logps(model, input_ids, completion_mask, chunk_size, lambda body: body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask), use_cache=False,
    ).last_hidden_state)


def shares_prompts(model) -> bool:
    """pair_logps works for this model: every layer attends fully (a sliding-window layer's cache keeps
    only its window) and no activation checkpointing (which turns the cache off)."""
    base = hf_model(model)
    kinds = getattr(base.config.get_text_config(), "layer_types", None) or ["full_attention"]
    return set(kinds) == {"full_attention"} and not getattr(base.model, "gradient_checkpointing", False)


def pair_logps(
    model, prompt_ids: Tensor, prompt_mask: Tensor, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """sequence_logps of 2B rows where rows 2b and 2b + 1 (a pair's chosen and rejected sides) continue
    prompt b: the prompts run once, not twice. A DPO pair's prompt is a third to a half of its tokens.
        prompt_ids, prompt_mask (B, P): each prompt but its last token, right-padded (at least one token)
        input_ids, attention_mask, completion_mask (2B, T): the prompt's last token, then the completion,
            right-padded; completion_mask marks the completion (never position 0)
    The prompts' K/V (a transformers DynamicCache, in the graph, so gradients reach them from both
    sides) are repeated for both rows of their pair; the rows attend to their prompt's real tokens and
    causally to their own, through a 4-D mask, at position ids that continue the prompt's. The same
    numbers as sequence_logps on the whole rows, up to rounding (tests/test_logps.py). Needs
    `shares_prompts(model)`."""
    _check_masks(input_ids, attention_mask, completion_mask)
    assert prompt_ids.shape == prompt_mask.shape and 2 * prompt_ids.shape[0] == input_ids.shape[0]
    assert prompt_mask[:, 0].all(), "every prompt needs a token before its last one"
    from transformers import DynamicCache

    def body_with_cache(body):
        cache_kw = cache_kwarg(body)
        cache = DynamicCache()
        body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_position_ids(prompt_mask), use_cache=True,
             **{cache_kw: cache})
        cache.batch_repeat_interleave(2)  # rows 2b, 2b + 1 see prompt b
        seen = prompt_mask.bool().repeat_interleave(2, dim=0)[:, None, :]  # (2B, 1, P)
        own = torch.tril(torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool, device=input_ids.device))
        own = own & attention_mask.bool()[:, None, :]  # (2B, T, T): causal, real tokens
        mask = torch.cat([seen.expand(-1, input_ids.shape[1], -1), own], dim=-1)[:, None]  # (2B, 1, T, P + T)
        mask = prepared_mask(body, mask)
        start = prompt_mask.sum(-1).repeat_interleave(2)[:, None]  # (2B, 1): the prompt's tokens before the row's
        return body(input_ids=input_ids, attention_mask=mask, position_ids=start + _position_ids(attention_mask),
                    use_cache=True, **{cache_kw: cache}).last_hidden_state

    return _scored_logps(model, input_ids, completion_mask, chunk_size, body_with_cache)


def _scored_logps(model, input_ids, completion_mask, chunk_size, run_body):
    """The summed log-probs (B,) and counts (B,) of the completion tokens, from the final hidden states
    (B, T, H) that run_body(decoder body) returns."""
    assert chunk_size > 0, f"chunk_size must be positive, got {chunk_size}"
    base = hf_model(model)
    assert hasattr(base, "model"), f"{type(base).__name__} has no decoder body at .model"
    weight, softcap = _lm_head_weight_and_softcap(base)
    device_type = input_ids.device.type
    if torch.is_autocast_enabled(device_type) and not weight.requires_grad:
        weight = weight.to(torch.get_autocast_dtype(device_type))  # the LM head's matmul, as autocast would run it
    # Which rows of the flattened (B * T, H) hidden states predict a scored token: row b * T + t predicts
    # token t + 1 of sequence b. Found before the body runs: nonzero() waits for the GPU, and here it has
    # nothing queued; after the forward, the wait would idle the GPU while the CPU launches the backward.
    batch, seq_len = input_ids.shape
    predicts = torch.zeros_like(completion_mask, dtype=torch.bool)
    predicts[:, :-1] = completion_mask[:, 1:].bool()
    rows = predicts.flatten().nonzero().squeeze(1)  # (N,)
    targets = input_ids.flatten()[rows + 1]  # (N,)

    hidden = run_body(base.model)  # (B, T, H), after the final norm
    scored_hidden = hidden.flatten(0, 1).index_select(0, rows)  # (N, H); backward is an index_add
    token_logps = _ChunkedTokenLogps.apply(scored_hidden, weight, targets, chunk_size, softcap)  # (N,)

    logps = token_logps.new_zeros(batch).index_add(0, rows // seq_len, token_logps)  # (B,)
    return logps, predicts.sum(dim=-1)


def naive_sequence_logps(
    model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Reference implementation of `sequence_logps`: full (B, T, V) logits, log_softmax, gather, mask, sum.
    Same inputs and outputs; memory grows with B * T * V."""
    _check_masks(input_ids, attention_mask, completion_mask)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        use_cache=False,
    ).logits  # (B, T, V)
    all_logps = logits[:, :-1].float().log_softmax(dim=-1)  # (B, T-1, V)
    token_logps = all_logps.gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    scored = completion_mask[:, 1:].bool()
    # where(), not multiply: a padding row's logits may be non-finite, and 0 * nan = nan.
    return torch.where(scored, token_logps, 0.0).sum(dim=-1), scored.sum(dim=-1)
