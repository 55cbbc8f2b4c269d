"""Sampling: K thought+response candidates per instruction, in-process, from the current policy.

Consumes the policy (a peft model) and its tokenizer, a slice of `Instruction`s, a `Template` and a
`SamplingConfig`. Produces one `Candidate` per sample: the raw text, its split into thought and
response (or a parse failure), its token count and whether it hit `max_new_tokens` (a truncated
output is a parse failure: its response was cut off mid-way).

With `sampling.force_marker`, the thought gets `sampling.thought_tokens` (default: half of
`max_new_tokens`): an output that ends, or reaches that, before writing the template's marker gets
"\n\n" + marker + "\n" appended and is sampled on until its response ends, within the same total
budget (as s1's budget forcing ends a thought, Muennighoff et al. 2025); the fast engine goes on in the
output's own slot, writing only the marker's tokens to its cache. The newline after the marker is
measured: SmolLM2 ended its turn right after a bare marker more often (benchmarks/RESULTS.md). Such a
candidate is `forced`; DPO then trains on the whole text, marker included, so the model can learn to
write the marker itself, and the loop records how often it did (the natural marker rate).

Every candidate samples from its own seed (`candidate_seed`: the run's seed, the instruction's id, the
candidate's index), so the batch, the engine's slot or the process that draws it never changes it.
"""

import functools
import hashlib
import re
from dataclasses import dataclass

import torch
from tqdm import tqdm

from minitpo.config import GENERATE_AUTO_BATCH, SamplingConfig
from minitpo.draw import sample_next, uniform_table
from minitpo.errors import UserError
from minitpo.prompts import Template, build_prompt, split_output, word_count



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
    forced: bool = False  # the marker was appended by sampling.force_marker, not written by the model
    # a forced candidate's own first pass, before the marker was appended: a format failure the model
    # wrote (pairs.py makes it the rejected side when the candidate is chosen); "" when not forced
    unforced_text: str = ""
    unforced_truncated: bool = False  # that first pass ran out of thought budget instead of ending


THOUGHT_MIN_WORDS = 5  # a thought of fewer words is no thought: "Okay." closed at once is not thinking


def wrote_marker(c: Candidate, marker: str | None) -> bool:
    """The model wrote the template's marker itself (sampling.force_marker did not append it)."""
    return bool(marker) and not c.forced and marker in c.text


def thinks(c: Candidate, marker: str | None) -> bool:
    """The model wrote, by itself, a thought of THOUGHT_MIN_WORDS words or more, the marker, and a
    response: the format TPO teaches."""
    return wrote_marker(c, marker) and c.parsed and word_count(c.thought) >= THOUGHT_MIN_WORDS


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config may list several (Qwen: <|im_end|> and
    <|endoftext|>); the tokenizer's eos comes first, as training appends it to completions."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def candidate_seed(seed: int, instruction_id: int, index: int, part: int = 0) -> int:
    """The sampling seed of one candidate's part (0: the output, or its thought when the marker is
    forced; 1: the forced response): a function of these numbers alone, 63 bits of their hash."""
    digest = hashlib.sha256(f"{seed}:{instruction_id}:{index}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_prompt_lengths(tokenizer, context: int | None, instructions, template: Template, cfg,
                         system_prompt: bool = False) -> int:
    """Before any sampling: every instruction's prompt plus sampling.max_new_tokens must fit the policy's
    context (`context` tokens; None: unknown, not checked). One that does not is named in one line: a
    megabyte pasted into the file would otherwise ask the prefill for terabytes. Returns the longest
    prompt's tokens (the plan sizes the KV cache with it)."""
    longest = 0
    for ins in instructions:
        n = len(tokenizer(build_prompt(tokenizer, template, ins.text, system_prompt), add_special_tokens=False)["input_ids"])
        longest = max(longest, n)
        if context is not None and n + cfg.max_new_tokens > context:
            raise UserError(f"data.instructions: line {ins.id + 1} makes a prompt of {n} tokens, and with "
                            f"sampling.max_new_tokens {cfg.max_new_tokens} it does not fit the policy's context of "
                            f"{context} tokens; shorten or remove that instruction, or lower sampling.max_new_tokens")
    return longest


def open_sampler(model, tokenizer, cfg: SamplingConfig):
    """The recipe's sampler over `model` (`sampling.engine`), for a `with` block: the fast sampler of
    minitpo/engine.py, or plain `generate` (GenerateSampler, below)."""
    ends = dict(eos_token_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
    if cfg.engine == "fast":
        from minitpo.engine import Sampler  # the engine imports transformers' internals; summary.py imports this

        return Sampler(model, cfg, **ends)
    return GenerateSampler(model, cfg, **ends)


def sample_candidates(model, tokenizer, instructions, template: Template, cfg: SamplingConfig, seed: int,
                      system_prompt: bool = False, sampler=None, k: int | None = None,
                      progress: bool = True) -> list[Candidate]:
    """`k` (default `cfg.k`) candidates for each instruction. `sampler`: one the caller holds open across
    calls (open_sampler); by default one is opened here and closed, its memory freed, before returning."""
    if sampler is None:
        with open_sampler(model, tokenizer, cfg) as sampler:
            return sample_candidates(model, tokenizer, instructions, template, cfg, seed, system_prompt, sampler, k,
                                     progress)
    prompts = [build_prompt(tokenizer, template, ins.text, system_prompt) for ins in instructions]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = [(i, j) for i in range(len(instructions)) for j in range(k or cfg.k)]
    marker = template.marker
    stop_ids, blank_ids = stop_tokens(tokenizer, tuple(cfg.stop))

    def seeds(part, numbers):
        return [candidate_seed(seed, instructions[jobs[n][0]].id, jobs[n][1], part) for n in numbers]

    def cut(text, n_tokens, ended):
        """A stop text ends the output as EOS would; the text from the stop on is dropped."""
        at = cut_at_stop(text, cfg.stop, marker)
        if at is None:
            return text, n_tokens, ended
        text = text[:at]
        return text, len(tokenizer(text, add_special_tokens=False)["input_ids"]), True

    force = cfg.force_marker and marker is not None
    forceable = cfg.k - cfg.unforced  # of the recipe's K, so that eval's k=1 is forced as the loop's
    firsts = {}  # each output's first pass: the text the model wrote with nothing forced
    heads = {}  # output that goes on -> (its head: the first pass, the marker appended if forced; its tokens; forced?)

    def go_on(n, ids, ended):
        """Output n's first pass is done. Every output not yet finished with a response goes on: one that
        stopped or ran out of thought budget without the marker gets it appended, unless it is one of
        the last `sampling.unforced` candidates of its instruction (those stay format failures: the
        rejected side of a pair, the paper's rule); one cut off after writing it just continues. Its
        continuation (the sampler's `extend`) gets the rest of the sampling.max_new_tokens budget."""
        text, n_tokens, ended = firsts[n] = cut(tokenizer.decode(ids, skip_special_tokens=True), len(ids), ended)
        if not force:
            return None
        i, j = jobs[n]
        has_marker = marker in text
        if (ended and has_marker) or (not has_marker and j >= forceable):
            return None
        # a thought cut by its budget ends at its last whole sentence, so the marker follows a sentence
        thought = text if ended else whole_sentences(text)
        words = word_count(thought.strip().removeprefix(template.thought_prefix))
        if not has_marker and words < template.min_words:
            return None  # too short a thought to force: it stays a format failure
        head = text if has_marker else thought.rstrip() + "\n\n" + marker + "\n"
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        if len(head_ids) >= cfg.max_new_tokens:
            return None
        heads[n] = (head, len(head_ids), not has_marker)
        return prompt_ids[i] + head_ids, seeds(1, [n])[0], cfg.max_new_tokens - len(head_ids)

    # With a marker the first pass may hold a thought, which stop texts do not end: it runs to its budget.
    with tqdm(total=len(jobs), desc="sample", unit="seq", dynamic_ncols=True, disable=not progress) as bar:
        outputs = sampler.generate([prompt_ids[i] for i, _ in jobs], max_new_tokens=cfg.max_new_tokens,
                                   first_tokens=cfg.thought_tokens if force else None, seeds=seeds(0, range(len(jobs))),
                                   progress=bar.update, stop_ids=stop_ids, blank_ids=blank_ids,
                                   early_stop=marker is None, extend=go_on)
    results, forced = [], []
    for n, (ids, ended) in enumerate(outputs):
        if n not in heads:
            results.append(firsts[n])
            forced.append(False)
            continue
        head, n_head, was_forced = heads[n]
        results.append(cut(head + tokenizer.decode(ids, skip_special_tokens=True), n_head + len(ids), ended))
        forced.append(was_forced)
    firsts = [firsts[n] for n in range(len(jobs))]

    candidates = []
    for (i, j), (text, n_tokens, ended), was_forced, first in zip(jobs, results, forced, firsts):
        split = split_output(text, template) if ended else None
        ins = instructions[i]
        candidates.append(Candidate(
            instruction_id=ins.id, instruction=ins.text, prompt=prompts[i], index=j, text=text,
            thought=split[0] if split else "", response=split[1] if split else "",
            parsed=split is not None, n_tokens=n_tokens, truncated=not ended, category=ins.category,
            forced=was_forced, unforced_text=first[0] if was_forced else "",
            unforced_truncated=was_forced and not first[2],
        ))
    return candidates


def cut_at_stop(text: str, stops, marker: str | None = None) -> int | None:
    """Where the first stop text starts, or None. Stop texts end the response: with a marker in the
    text they are looked for after it (a thought may hold a blank line before its marker), and never
    in the leading whitespace (a stop of "\n\n" ends a paragraph, not an output or response that
    merely begins with a blank line, as a response after its marker often does)."""
    start = 0
    if marker and marker in text:
        start = text.index(marker) + len(marker)
    start += len(text[start:]) - len(text[start:].lstrip())
    cuts = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end (. ! or ? before a space or the end, or a line break), or
    all of it when no sentence with a word in it ends."""
    for m in reversed(list(_SENTENCE_END.finditer(text))):
        if text[:m.end()].strip():
            return text[:m.end()]
    return text


@functools.lru_cache(maxsize=4)
def stop_tokens(tokenizer, stops: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids whose text holds a stop text, ids whose text is only whitespace), over the vocabulary:
    what the engine needs to end an output at a stop without decoding (49,152 ids: about a second)."""
    if not stops:
        return (), ()
    stop, blank = [], []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if any(s in text for s in stops):
            stop.append(i)
        elif not text.strip():
            blank.append(i)
    return tuple(stop), tuple(blank)


class GenerateSampler:
    """Transformers `generate`, batched, with the interface of engine.Sampler (`with` block, `generate`);
    it holds nothing between calls, so leaving the block frees nothing.

    Prompts are sorted by length so that each batch pads little; left padding keeps every prompt's
    last token at the same position, where generation starts. The draw is minitpo/draw.py's (temperature,
    top-p, inverse CDF from the prompt's own seeded uniforms), run as a logits processor under greedy
    decoding, so that a sequence's tokens do not depend on its batch, as in the engine. batch_size
    "auto" is GENERATE_AUTO_BATCH; memory_gb is not used (generate grows its cache as it goes), nor are
    stop_ids and blank_ids (they let the engine stop early; the caller cuts the text in any case)."""

    def __init__(self, model, cfg: SamplingConfig, *, eos_token_ids, pad_token_id: int | None):
        self.model, self.cfg = model, cfg
        self.eos_token_ids, self.pad_token_id = list(eos_token_ids), pad_token_id

    def __enter__(self) -> "GenerateSampler":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, seeds: list[int], progress=None,
                 stop_ids=(), blank_ids=(), early_stop: bool = True, first_tokens: int | None = None,
                 extend=None) -> list[tuple[list[int], bool]]:
        """For each prompt, (new token ids without EOS, hit EOS); first_tokens and extend as in engine.Sampler,
        here as a second batch of the continuations' whole prompts."""
        results = self._generate(prompt_ids, first_tokens or max_new_tokens, seeds, None if extend else progress)
        if extend is None:
            return results
        more = {i: c for i, out in enumerate(results) if (c := extend(i, *out)) is not None}
        if progress:
            progress(len(prompt_ids) - len(more))
        if more:
            tails = self._generate([c[0] for c in more.values()], max(c[2] for c in more.values()),
                                   [c[1] for c in more.values()], progress)
            for (i, (_, _, limit)), (ids, ended) in zip(more.items(), tails):  # each within its own max_new_tokens
                results[i] = (ids, ended) if len(ids) < limit else (ids[:limit], False)
        return results

    @torch.no_grad()
    def _generate(self, prompt_ids, max_new_tokens, seeds, progress):
        from transformers import LogitsProcessorList

        model, eos_token_ids, pad_token_id = self.model, self.eos_token_ids, self.pad_token_id
        temperature, top_p = self.cfg.temperature, self.cfg.top_p
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        batch_size = GENERATE_AUTO_BATCH if self.cfg.batch_size == "auto" else self.cfg.batch_size
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
            draw = [] if temperature == 0 else [_Draw(uniform_table([seeds[i] for i in batch], max_new_tokens).to(device),
                                                     width, temperature, top_p)]
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
                logits_processor=LogitsProcessorList(draw), max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_ids, pad_token_id=pad_token_id,
            )
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                stop = next((j for j, t in enumerate(new) if t in eos_token_ids), None)
                results[i] = (new, False) if stop is None else (new[:stop], True)
            if progress:
                progress(len(batch))
        model.train(was_training)
        return results


class _Draw:
    """A logits processor that samples: each row's token from its own uniforms (draw.sample_next),
    returned as the only finite score, so that generate's greedy step takes it."""

    def __init__(self, uniforms, width: int, temperature: float, top_p: float):
        self.uniforms, self.width, self.temperature, self.top_p = uniforms, width, temperature, top_p

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width  # the index of the token drawn now
        nxt = sample_next(scores.float(), self.temperature, self.top_p, self.uniforms[:, step])
        return torch.full_like(scores, float("-inf")).scatter_(1, nxt[:, None], 0.0)
