"""Sampling candidates (minitpo/sample.py) from the tiny policy: splits, limits and stop texts."""

import dataclasses

import pytest

from conftest import TINY
from minitpo.config import PolicyConfig, SamplingConfig
from minitpo.data import load_instructions
from minitpo.model import load_policy
from minitpo.prompts import GENERIC, split_output
from minitpo.sample import sample_candidates


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


def test_stop_text_ends_an_output_like_eos(policy):
    model, tokenizer = policy
    instructions = load_instructions(TINY / "instructions.jsonl")[:6]
    cfg = SamplingConfig(k=3, max_new_tokens=64, batch_size=8)
    plain = sample_candidates(model, tokenizer, instructions, GENERIC, cfg, seed=0)
    stopped = sample_candidates(model, tokenizer, instructions, GENERIC,
                                dataclasses.replace(cfg, stop=("Here is my response:",)), seed=0)
    hits = [(a, b) for a, b in zip(plain, stopped) if "Here is my response:" in a.text]
    assert hits
    for a, b in hits:
        assert b.text == a.text[:a.text.find("Here is my response:")]
        assert not b.truncated and not b.parsed  # finished, but without its response
        assert b.n_tokens == len(tokenizer(b.text, add_special_tokens=False)["input_ids"])
