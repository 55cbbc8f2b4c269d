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


def hf_cache_file(cache: Path, repo_id: str, filename: str, source: Path) -> Path:
    """`source` put into the Hugging Face cache folder `cache` (HF_HUB_CACHE) as huggingface_hub lays out a
    downloaded file: its bytes in blobs/<sha256>, snapshots/<commit>/<filename> a relative symlink to
    them, refs/main naming the commit. Returns the snapshot path."""
    import hashlib
    import os

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    data = Path(source).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, as a commit hash is
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link
