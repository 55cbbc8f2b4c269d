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


@pytest.fixture(scope="session", autouse=True)
def cache_in_tmp(tmp_path_factory):
    """GGUF policies are converted into MINITPO_CACHE (default ~/.cache/minitpo): keep the suite's
    conversions out of the user's home."""
    import os

    old = os.environ.get("MINITPO_CACHE")
    os.environ["MINITPO_CACHE"] = str(tmp_path_factory.mktemp("minitpo_cache"))
    yield
    if old is None:
        del os.environ["MINITPO_CACHE"]
    else:
        os.environ["MINITPO_CACHE"] = old
