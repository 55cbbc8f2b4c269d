"""Sampling candidates (minitpo/sample.py) from the tiny policy: splits, limits and stop texts."""

import dataclasses

import pytest

from conftest import TINY
from minitpo.config import PolicyConfig, SamplingConfig
from minitpo.data import load_instructions
from minitpo.model import load_policy
from minitpo.prompts import GENERIC, split_output
from minitpo.sample import open_sampler, sample_candidates


@pytest.fixture(scope="module")
def policy():
    return load_policy(PolicyConfig(model=str(TINY / "policy"), quantization="none"), device="cpu")


@pytest.mark.parametrize("engine", ["fast", "generate"])
def test_candidates_record_split_tokens_and_truncation(policy, engine):
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    cfg = SamplingConfig(k=3, max_new_tokens=24, batch_size=8, engine=engine)
    cands = sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=0)
    assert len(cands) == 18 and [c.index for c in cands[:3]] == [0, 1, 2]
    assert any(c.truncated for c in cands) and any(not c.truncated for c in cands)
    for c in cands:
        assert c.n_tokens <= 24 and (c.n_tokens == 24) == c.truncated
        assert c.parsed == (not c.truncated and split_output(c.text, GENERIC) is not None)
        assert not c.truncated or not c.parsed  # a cut-off output never counts as parsed


@pytest.mark.parametrize("engine", ["fast", "generate"])
def test_stop_text_ends_an_output_like_eos(policy, engine):
    """Without a marker (direct) a stop text ends the output wherever it first appears after the
    leading whitespace; the fast engine also stops computing there, and must give the same texts."""
    from minitpo.prompts import DIRECT

    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    cfg = SamplingConfig(k=3, max_new_tokens=64, batch_size=8, engine=engine)
    plain = sample_candidates(model, tokenizer, instructions, DIRECT, cfg, seed=0, progress=False)
    stopped = sample_candidates(model, tokenizer, instructions, DIRECT,
                                dataclasses.replace(cfg, stop=(". ", "tree")), seed=0, progress=False)
    hits = 0
    for a, b in zip(plain, stopped):
        start = len(a.text) - len(a.text.lstrip())
        cuts = [i for i in (a.text.find(". ", start), a.text.find("tree", start)) if i >= 0]
        if not cuts:
            assert b == a
            continue
        hits += 1
        assert b.text == a.text[:min(cuts)]
        assert not b.truncated and b.parsed == bool(b.text.strip())  # finished, as at EOS
        assert b.n_tokens == len(tokenizer(b.text, add_special_tokens=False)["input_ids"])
    assert hits >= 6


def test_stop_texts_end_the_response_not_the_thought(policy):
    """With a marker, stop texts are looked for after it: a thought may hold one."""
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    cfg = SamplingConfig(k=3, max_new_tokens=64, batch_size=8)
    plain = sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=0, progress=False)
    stopped = sample_candidates(model, tokenizer, instructions, GENERIC,
                                dataclasses.replace(cfg, stop=(". ",)), seed=0, progress=False)
    hits = 0
    for a, b in zip(plain, stopped):
        if GENERIC.marker not in a.text:
            continue
        after = a.text.index(GENERIC.marker) + len(GENERIC.marker)
        assert ". " in a.text[:after]  # the thought holds the stop text, and is not cut there
        cut = a.text.find(". ", after)
        if cut >= 0:
            hits += 1
            assert b.text == a.text[:cut] and b.parsed
    assert hits >= 3


def test_force_marker_appends_the_marker_and_samples_the_response(policy):
    """Greedy, so that a forced run's first pass is the plain run's beginning token for token."""
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:8]
    cfg = SamplingConfig(k=2, max_new_tokens=48, batch_size=16, temperature=0.0)
    # A marker the tiny model never writes, so every candidate is a forced one.
    never = dataclasses.replace(GENERIC, marker="<R>")
    plain = sample_candidates(model, tokenizer, instructions, never, cfg, seed=0, progress=False)
    forced = sample_candidates(model, tokenizer, instructions, never,
                               dataclasses.replace(cfg, force_marker=True), seed=0, progress=False)
    assert not any(c.parsed for c in plain)
    half = cfg.max_new_tokens // 2  # thought_tokens unset: half of max_new_tokens
    assert all(b.forced for b in forced)
    for a, b in zip(plain, forced):
        assert b.n_tokens <= cfg.max_new_tokens and b.text.count(never.marker) == 1
        assert b.parsed == (not b.truncated and split_output(b.text, never) is not None)
        # the thought is the model's own output, cut at the thought budget back to its last whole
        # sentence, then the marker
        thought, marker, _ = b.text.partition("\n\n" + never.marker)
        budget_text = tokenizer.decode(tokenizer(a.text, add_special_tokens=False)["input_ids"][:half])
        assert marker and budget_text.startswith(thought)
        # its own first pass, kept for the pair: the plain output's beginning, the thought's start
        assert a.text.startswith(b.unforced_text) and b.unforced_text.startswith(thought.rstrip())
        assert b.unforced_truncated == (b.unforced_text == budget_text)
        assert thought.rstrip()[-1] in ".!?" or "." not in budget_text.rstrip()[:-1]
    shorter = sample_candidates(model, tokenizer, instructions, never,
                                dataclasses.replace(cfg, force_marker=True, thought_tokens=6), seed=0, progress=False)
    for b in shorter:  # sampling.thought_tokens sets the budget
        thought = b.text.partition("\n\n" + never.marker)[0]
        assert len(tokenizer(thought, add_special_tokens=False)["input_ids"]) <= 7


def test_whole_sentences_cuts_at_the_last_sentence_end():
    from minitpo.sample import whole_sentences

    assert whole_sentences("First one. Second one! Third is cut") == "First one. Second one!"
    assert whole_sentences('He said "go." Then the') == 'He said "go."'
    assert whole_sentences("A list:\n- one\n- tw") == "A list:\n- one\n"
    assert whole_sentences("Pi is 3.14 and more") == "Pi is 3.14 and more"  # no sentence ends: all of it
    assert whole_sentences("\nno end") == "\nno end"


def test_unforced_candidates_stay_format_failures(policy):
    """sampling.unforced: the last N of each instruction's K are never forced; the others are, and
    the first pass is the same for both (the same seeds)."""
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    never = dataclasses.replace(GENERIC, marker="<R>")
    cfg = SamplingConfig(k=3, max_new_tokens=40, batch_size=18, force_marker=True, thought_tokens=12)
    all_forced = sample_candidates(model, tokenizer, instructions, never, cfg, seed=1, progress=False)
    some = sample_candidates(model, tokenizer, instructions, never, dataclasses.replace(cfg, unforced=1),
                             seed=1, progress=False)
    for a, b in zip(all_forced, some):
        if b.index < 2:
            assert b == a  # the forced ones are unchanged
        else:
            assert a.forced and not b.forced and not b.parsed and never.marker not in b.text
            thought = a.text.partition("\n\n" + never.marker)[0]
            assert b.text.startswith(thought)  # its own first pass, with no marker appended
    # eval samples k=1 from a recipe with unforced=1: index 0 is forced, as in the loop
    one = sample_candidates(model, tokenizer, instructions, never, dataclasses.replace(cfg, unforced=1), seed=1,
                            k=1, progress=False)
    assert all(c.forced for c in one)


def test_force_marker_does_nothing_without_a_marker(policy):
    from minitpo.prompts import DIRECT

    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:4]
    cfg = SamplingConfig(k=2, max_new_tokens=32, batch_size=8, temperature=0.0)
    plain = sample_candidates(model, tokenizer, instructions, DIRECT, cfg, seed=0, progress=False)
    forced = sample_candidates(model, tokenizer, instructions, DIRECT,
                               dataclasses.replace(cfg, force_marker=True), seed=0, progress=False)
    assert [c.text for c in plain] == [c.text for c in forced] and not any(c.forced for c in forced)


@pytest.mark.parametrize("engine", ["fast", "generate"])
def test_a_candidate_does_not_depend_on_its_batch(policy, engine):
    """Seeds are per instruction and candidate: sampling 2 of 6 instructions, in the other order and
    with smaller batches, gives those two exactly the candidates the full slice gave them (the forced
    marker's second pass included); another run seed gives others."""
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    cfg = SamplingConfig(k=3, max_new_tokens=40, batch_size=18, engine=engine, force_marker=True, thought_tokens=8)
    full = sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=5, progress=False)
    part = sample_candidates(model, tokenizer, [instructions[4], instructions[1]], GENERIC,
                             dataclasses.replace(cfg, batch_size=4), seed=5, progress=False)
    by_key = {(c.instruction_id, c.index): c for c in full}
    assert all(c == by_key[(c.instruction_id, c.index)] for c in part) and len(part) == 6
    assert any(c.forced for c in part)
    other = sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=6, progress=False)
    assert sum(a.text != b.text for a, b in zip(full, other)) >= 9


@pytest.mark.parametrize("engine", ["fast", "generate"])
def test_a_sampler_held_across_calls_gives_what_a_sampler_per_call_gives(policy, engine):
    """`minitpo bench` holds one sampler across its chunks: each call's candidates are those a sampler of its
    own gives (the fast engine's slots start afresh). The fast sampler builds its engine once for calls of
    one shape, the same instructions under two run seeds here, and frees it when the block ends."""
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:4]
    cfg = SamplingConfig(k=2, max_new_tokens=24, batch_size=8, engine=engine)
    alone = [sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=seed, progress=False)
             for seed in (3, 4)]
    held, engines = [], []
    with open_sampler(model, tokenizer, cfg) as sampler:
        for seed in (3, 4):
            held.append(sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=seed, progress=False,
                                          sampler=sampler))
            engines.append(getattr(sampler, "engine", None))
    assert held == alone and [c.text for c in held[0]] != [c.text for c in held[1]]
    if engine == "fast":
        assert engines[0] is not None and engines[1] is engines[0] and sampler.engine is None


def test_thinks_needs_a_thought_of_five_words_the_marker_unforced_and_a_response():
    from minitpo.sample import Candidate, thinks, wrote_marker

    def cand(text, thought, forced=False, parsed=True):
        return Candidate(instruction_id=0, instruction="q", prompt="p", index=0, text=text, thought=thought,
                         response="r" if parsed else "", parsed=parsed, n_tokens=3, truncated=False, forced=forced)

    good = cand("I will list three tips.\n</think>\nr", "I will list three tips.")
    assert wrote_marker(good, "</think>") and thinks(good, "</think>")
    short = cand("Okay then.\n</think>\nr", "Okay then.")  # two words: closed at once
    assert wrote_marker(short, "</think>") and not thinks(short, "</think>")
    forced = cand("I will list three tips.\n\n</think>\nr", "I will list three tips.", forced=True)
    assert not wrote_marker(forced, "</think>") and not thinks(forced, "</think>")
    failed = cand("I will list three tips.\n</think>\n", "", parsed=False)  # no response
    assert wrote_marker(failed, "</think>") and not thinks(failed, "</think>")
    assert not wrote_marker(good, None) and not wrote_marker(good, "<R>")


def test_min_words_makes_a_short_thought_a_format_failure():
    template = dataclasses.replace(GENERIC, min_words=5)
    text = "Here is my thought process: one two three four\nHere is my response: ok"
    assert split_output(text, GENERIC) == ("one two three four", "ok")
    assert split_output(text, template) is None
    assert split_output(text.replace("four", "four five"), template) == ("one two three four five", "ok")
