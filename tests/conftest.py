"""Shared fixtures: the tiny policy, tokenizer and GGUF judge of recipes/tiny/ (made by
recipes/tiny/make_tiny.py), and tiny random models built in the session."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY / "policy")
