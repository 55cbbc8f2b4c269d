"""The adapter update: DPO on one iteration's pairs, in plain PyTorch (forward, loss, backward, step, log).

Consumes the policy (peft model), the iteration's `Pair`s and a `TrainConfig`. Produces the trained
adapter (in place), one log row per optimizer update, and a summary. The reference model is the same
model at the start of the iteration: `reference_logps` runs it once, without gradients, before any
update, and the numbers travel with the pairs, so no second copy of the model is ever held.

Sequences: prompt + completion (thought + marker + response + EOS); only completion tokens are
scored. A batch of B pairs is one forward over 2B right-padded rows: chosen rows, then rejected rows;
where the model allows it (logps.shares_prompts), each pair's prompt runs once for both of its rows
(logps.pair_logps: on the CPU demo a third less compute, the same log-probs up to rounding).

Under torchrun every rank forms the same batches; each runs its `dist.shard` of a batch's pairs, and
the gradients are summed over the ranks before the update, so train.batch_size is the batch of the
whole update and one process with the same recipe takes the same steps.
"""

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minitpo import dist
from minitpo.config import TrainConfig
from minitpo.logps import pair_logps, sequence_logps, shares_prompts
from minitpo.loss import nll_loss, preference_loss
from minitpo.device import cpu_has_native_bf16
from minitpo.model import load_trainable_state, trainable_state

MIN_PROMPT_TOKENS = 16  # a pair that would keep fewer prompt tokens than this is skipped instead


@dataclass(frozen=True)
class Example:
    """One tokenised pair, already truncated to `max_length`."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def tokenize_pairs(tokenizer, pairs, max_length: int, eos_id: int):
    """([Example or None per pair], [prompt truncated? per pair]). None marks a skipped pair: its
    longer completion leaves fewer than MIN_PROMPT_TOKENS of room for the prompt. Deterministic, so
    the reference and the policy see exactly the same tokens."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples, truncated = [], []
    for p in pairs:
        prompt = encode(p.prompt)
        chosen = encode(p.chosen) + [eos_id]
        rejected = encode(p.rejected) + ([] if p.rejected_truncated else [eos_id])
        room = max_length - max(len(chosen), len(rejected))
        skip = room < min(MIN_PROMPT_TOKENS, len(prompt))
        truncated.append(not skip and room < len(prompt))
        if skip:
            examples.append(None)
            continue
        # keep the prompt's end: the instruction's tail and the assistant-turn marker
        examples.append(Example(prompt[-room:] if truncated[-1] else prompt, chosen, rejected))
    return examples, truncated


def collate(examples: list[Example], pad_id: int):
    """input_ids, attention_mask, completion_mask, each (2B, T): chosen rows then rejected rows."""
    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    return _right_padded(rows, pad_id)


def collate_pairs(examples: list[Example], pad_id: int):
    """For logps.pair_logps: prompt_ids, prompt_mask (B, P), each prompt but its last token; input_ids,
    attention_mask, completion_mask (2B, T), rows 2b and 2b + 1 the prompt's last token and then pair
    b's chosen and rejected completions. All right-padded."""
    width = max(len(e.prompt_ids) for e in examples) - 1
    prompt_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        prompt_ids[r, :len(e.prompt_ids) - 1] = torch.tensor(e.prompt_ids[:-1])
        prompt_mask[r, :len(e.prompt_ids) - 1] = 1
    rows = [(e.prompt_ids[-1:], c) for e in examples for c in (e.chosen_ids, e.rejected_ids)]
    input_ids, attention_mask, completion_mask = _right_padded(rows, pad_id)
    return prompt_ids, prompt_mask, input_ids, attention_mask, completion_mask


def _right_padded(rows, pad_id: int):
    """input_ids, attention_mask, completion_mask (len(rows), T) of (prompt, completion) rows."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion)
        attention_mask[r, :n] = 1
        completion_mask[r, len(prompt):n] = True
    return input_ids, attention_mask, completion_mask


def autocast_dtype(cfg: TrainConfig, device: str) -> torch.dtype | None:
    """What `train.autocast` means on this device: bf16 autocast on CUDA (half the activation memory)
    and on a CPU with native bf16 matmuls; None (the weights' own dtype) on other CPUs, where bf16
    matmuls are emulated and slow."""
    if cfg.autocast == "none":
        return None
    if cfg.autocast == "bfloat16" or device == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _autocast(cfg: TrainConfig, device: str):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def _forward(model, examples, pad_id, cfg: TrainConfig, device):
    """(logps (2B,), n_tokens (2B,)) for the chosen rows then the rejected rows. A pair's prompt runs once
    for both sides (pair_logps) where the model allows it (on the CPU demo: a third less compute)."""
    if shares_prompts(model) and all(len(e.prompt_ids) >= 2 for e in examples):
        tensors = (t.to(device) for t in collate_pairs(examples, pad_id))
        with _autocast(cfg, device):
            logps, n_tokens = pair_logps(model, *tensors, chunk_size=cfg.logps_chunk)
        return logps.view(-1, 2).t().flatten(), n_tokens.view(-1, 2).t().flatten()  # rows 2b, 2b + 1 -> b, B + b
    input_ids, attention_mask, completion_mask = (t.to(device) for t in collate(examples, pad_id))
    with _autocast(cfg, device):
        return sequence_logps(model, input_ids, attention_mask, completion_mask, chunk_size=cfg.logps_chunk)


@torch.no_grad()
def reference_logps(model, examples: list[Example], pad_id: int, cfg: TrainConfig, device: str):
    """[(ref_chosen_logps, ref_rejected_logps)] per example, from the model as it is now (M_t)."""
    was_training = model.training
    model.eval()  # dropout off: the reference is a deterministic function of M_t
    out = []
    for batch in tqdm(_length_batches(examples, cfg.batch_size), desc="reference", unit="batch", dynamic_ncols=True,
                      disable=not dist.is_main()):
        logps, _ = _forward(model, [examples[i] for i in batch], pad_id, cfg, device)
        b = len(batch)
        out += [(i, logps[j].item(), logps[b + j].item()) for j, i in enumerate(batch)]
    model.train(was_training)
    return [(c, r) for _, c, r in sorted(out)]


def _length_batches(examples, batch_size: int) -> list[list[int]]:
    """Indices grouped by length, so rows in a batch need little padding."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _lr_factor(update: int, total: int, cfg: TrainConfig) -> float:
    warmup = int(cfg.warmup_ratio * total)
    if update < warmup:
        return (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.schedule]


def _optimizer(params, cfg: TrainConfig, device: str):
    if device == "cuda":
        import bitsandbytes as bnb  # paged 8-bit AdamW: optimizer state in 8 bits, paged to host on spikes

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin")  # what _batch_loss sums


def _batch_loss(model, examples, refs, pad_id, cfg: TrainConfig, device):
    """(mean loss over the batch, (5,) tensor of METRICS summed over it). refs: (B, 2) reference log-probs."""
    logps, n_tokens = _forward(model, examples, pad_id, cfg, device)
    b = len(examples)
    ref = torch.tensor(refs, dtype=torch.float32, device=logps.device)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        cfg.loss, logps[:b], logps[b:], ref[:, 0], ref[:, 1], beta=cfg.beta, label_smoothing=cfg.label_smoothing
    )
    if cfg.nll_weight > 0:
        losses = losses + cfg.nll_weight * nll_loss(logps[:b], n_tokens[:b])
    # Sums over the batch in METRICS order, left on the device: reading them waits for the GPU, which must
    # not happen between forward and backward (the GPU would idle while the CPU launches the backward).
    metrics = torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                           (chosen_rewards > rejected_rewards).float().sum(),
                           (chosen_rewards - rejected_rewards).sum()]).detach()
    return losses.mean(), metrics


@torch.no_grad()
def evaluate(model, examples, refs, pad_id, cfg: TrainConfig, device) -> dict:
    """Mean DPO loss and reward accuracy on held-out pairs (dropout off)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(METRICS), device=device)
    for batch in _length_batches(examples, cfg.batch_size):
        if part := dist.shard(batch):
            sums += _batch_loss(model, [examples[i] for i in part], [refs[i] for i in part], pad_id, cfg, device)[1]
    dist.all_reduce_(sums)
    model.train(was_training)
    return {k: v / len(examples) for k, v in zip(METRICS, sums.tolist())}


def train_adapter(model, examples: list[Example], refs: list[tuple[float, float]], pad_id: int,
                  cfg: TrainConfig, device: str, log=None) -> dict:
    """Train the adapter in place on (example, reference log-probs) pairs; return the summary.
    `log(row)` receives one dict per optimizer update."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = int(len(order) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    train_ex, train_refs = [examples[i] for i in train], [refs[i] for i in train]
    val_ex, val_refs = [examples[i] for i in val], [refs[i] for i in val]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg, device)
    batches = _length_batches(train_ex, cfg.batch_size)
    updates_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: _lr_factor(u, total_updates, cfg))

    model.train()
    update, epochs, best = 0, [], None
    bar = tqdm(total=total_updates, desc="train", unit="step", dynamic_ncols=True, disable=not dist.is_main())
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(batches)  # length buckets stay together; their order changes every epoch
        for start in range(0, len(batches), cfg.grad_accum):
            group = batches[start:start + cfg.grad_accum]
            n_pairs = sum(len(b) for b in group)  # of every rank
            t0 = time.perf_counter()
            totals = torch.zeros(len(METRICS) + 1, device=device)  # METRICS summed, then tokens; on the device
            for batch in group:
                part = dist.shard(batch)  # this rank's pairs of the batch: all of them in one process
                if not part:
                    continue
                ex = [train_ex[i] for i in part]
                loss, metrics = _batch_loss(model, ex, [train_refs[i] for i in part], pad_id, cfg, device)
                (loss * len(part) / n_pairs).backward()  # weight by pairs: every pair counts the same
                totals[:-1] += metrics
                totals[-1] += sum(e.n_tokens for e in ex)
            dist.all_reduce_grads_(params)  # the gradient of the whole update's mean loss, on every rank
            *sums, n_tok = dist.all_reduce_(totals).tolist()  # one wait for the GPU per update, after backward
            sums = dict(zip(METRICS, sums))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            update += 1
            row = {"epoch": epoch, "step": update, **{k: v / n_pairs for k, v in sums.items()},
                   "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": n_tok / (time.perf_counter() - t0)}
            if log:
                log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['reward_accuracy']:.2f}")
        summary = {"epoch": epoch}
        if val_ex:
            summary.update({f"val_{k}": v for k, v in evaluate(model, val_ex, val_refs, pad_id, cfg, device).items()})
            if best is None or summary["val_loss"] < best[0]:
                best = (summary["val_loss"], epoch, trainable_state(model))
        epochs.append(summary)
    bar.close()
    best_epoch = cfg.epochs
    if best is not None and best[1] != cfg.epochs:
        load_trainable_state(model, best[2])  # the paper keeps the best epoch, not the last
        best_epoch = best[1]
    dtype = autocast_dtype(cfg, device)
    return {"n_train_pairs": len(train_ex), "n_val_pairs": len(val_ex), "updates": update,
            "epochs": epochs, "best_epoch": best_epoch, "autocast": str(dtype).removeprefix("torch.") if dtype else None}
