"""Sampling: K thought+response candidates per instruction, in-process, from the current policy.

Consumes the policy (a peft model) and its tokenizer, a slice of `Instruction`s, a `Template` and a
`SamplingConfig`. Produces one `Candidate` per sample: the raw text, its split into thought and
response (or a parse failure), its token count and whether it hit `max_new_tokens` (a truncated
output is a parse failure: its response was cut off mid-way).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm

from minitpo.prompts import Template, build_prompt, split_output


@dataclass(frozen=True)
class Candidate:
    instruction_id: int
    instruction: str
    prompt: str  # exactly what the policy saw, chat template included
    index: int  # 0..K-1
    text: str  # thought + marker + response, as generated (special tokens dropped)
    thought: str
    response: str
    parsed: bool
    n_tokens: int  # new tokens, EOS excluded
    truncated: bool  # stopped by max_new_tokens instead of EOS
    category: str = ""


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config may list several (Qwen: <|im_end|> and
    <|endoftext|>); the tokenizer's eos comes first, as training appends it to completions."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def sample_candidates(model, tokenizer, instructions, template: Template, cfg, seed: int,
                      system_prompt: bool = False, engine=None, k: int | None = None,
                      progress: bool = True) -> list[Candidate]:
    """`k` (default `cfg.k`) candidates for each instruction. `engine` is a `generate_tokens`-style
    function; by default the recipe's `sampling.engine`: the fast sampler of minitpo/engine.py, or
    plain `generate` below."""
    if engine is None:
        from minitpo import engine as fast

        engine = fast.generate_tokens if cfg.engine == "fast" else generate_tokens
    prompts = [build_prompt(tokenizer, template, ins.text, system_prompt) for ins in instructions]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = [(i, j) for i in range(len(instructions)) for j in range(k or cfg.k)]
    with tqdm(total=len(jobs), desc="sample", unit="seq", dynamic_ncols=True, disable=not progress) as bar:
        outputs = engine(
            model, [prompt_ids[i] for i, _ in jobs],
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
            batch_size=cfg.batch_size, seed=seed, progress=bar.update,
        )
    candidates = []
    for (i, j), (new_ids, hit_eos) in zip(jobs, outputs):
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in cfg.stop if s in text), default=-1)
        if cut >= 0:  # a stop text ends the output as EOS would; tokens after it are dropped
            text, hit_eos = text[:cut], True
            new_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        split = split_output(text, template) if hit_eos else None
        ins = instructions[i]
        candidates.append(Candidate(
            instruction_id=ins.id, instruction=ins.text, prompt=prompts[i], index=j, text=text,
            thought=split[0] if split else "", response=split[1] if split else "",
            parsed=split is not None, n_tokens=len(new_ids), truncated=not hit_eos, category=ins.category,
        ))
    return candidates


@torch.no_grad()
def generate_tokens(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                    top_p: float, eos_token_ids: list[int], pad_token_id: int, batch_size: int,
                    seed: int, progress=None) -> list[tuple[list[int], bool]]:
    """Plain transformers `generate`, batched: for each prompt, (new token ids without EOS, hit EOS).

    Prompts are sorted by length so that each batch pads little; left padding keeps every prompt's
    last token at the same position, where generation starts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompt_ids[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            do_sample=temperature > 0, temperature=temperature or None, top_p=top_p if temperature > 0 else None,
            top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids, pad_token_id=pad_token_id,
        )
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            stop = next((j for j, t in enumerate(new) if t in eos_token_ids), None)
            results[i] = (new, False) if stop is None else (new[:stop], True)
        if progress:
            progress(len(batch))
    model.train(was_training)
    return results
