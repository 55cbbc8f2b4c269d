"""Atomic file writes and JSONL helpers. Every file in a run directory goes through here, so a killed
process never leaves a half-written file behind: we write a temporary sibling, fsync, then rename."""

import json
import os
import shutil
import tempfile
from pathlib import Path

# mkstemp/mkdtemp create owner-only files; give finished outputs the modes a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_file(path: str | Path, fill) -> None:
    """Write one file atomically: `fill(tmp_path)` writes a temporary sibling, which is fsynced and
    renamed into place. For files another library writes (a GGUF)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """The rows of a JSONL file; with `missing_ok`, no rows when the file does not exist (yet)."""
    if missing_ok and not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_dir(path: str | Path, fill) -> None:
    """Build a directory atomically: `fill(tmp_dir)` writes into a temporary sibling, which is then
    renamed into place (replacing an older copy). Used for adapters, which are several files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
