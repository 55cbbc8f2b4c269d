"""Atomic file writes and JSONL helpers. Every file in a run directory goes through here, so a killed
process never leaves a half-written file behind: we write a temporary sibling, fsync, then rename.

Faults are one line (a UserError), never a traceback: a write the disk refuses (full, read-only, not
permitted) names the path and the fix, and what was written before it stays; `check_writable` finds
it before the work that fills a location; a file that does not parse is named with its line and how to
get it back, never silently dropped."""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from minitpo.errors import UserError

# The errors of a location that cannot take a file: full, read-only, not permitted, not a folder.
_WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST}
RECOMPUTE = "delete it and run the same command again to recompute it"  # the fix for a file minitpo wrote

# mkstemp/mkdtemp create owner-only files; give finished outputs the modes a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def _one_line(path: Path):
    """A write the location refuses, as one line naming the path and the fix."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_FAULTS:
            raise
        raise UserError(f"{path}: cannot be written ({os.strerror(e.errno)}); free space or give a writable "
                        "location, then run the same command again (what was written before stays)") from None


def check_writable(folder: str | Path, key: str) -> None:
    """Fail now, in one line, when files cannot be written in `folder` (or created there, if it does not
    exist yet): before the work whose result would go there. A real probe, a temporary file created and
    removed, so a read-only mount fails here even for root."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: {str(folder)!r} cannot be created: {str(existing)!r} is a file; give another location")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".minitpo-probe.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{key}: {str(folder)!r} cannot be written ({os.strerror(e.errno)}); give a writable "
                        "location") from None
    os.close(fd)
    os.unlink(probe)


def write_file(path: str | Path, fill) -> None:
    """Write one file atomically: `fill(tmp_path)` writes a temporary sibling, which is fsynced and
    renamed into place. For files another library writes (a GGUF)."""
    path = Path(path)
    with _one_line(path):
        _write_file(path, fill)


def _write_file(path: Path, fill) -> None:
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


def read_json(path: str | Path, fix: str = RECOMPUTE):
    """The JSON in `path`; one that does not parse (cut by a full disk, edited) is a UserError naming its
    line and `fix`."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno} is not valid JSON ({e.msg}); {fix}") from None


def read_jsonl(path: str | Path, missing_ok: bool = False, fix: str = RECOMPUTE) -> list[dict]:
    """The rows of a JSONL file; with `missing_ok`, no rows when the file does not exist (yet). A line that
    does not parse is a UserError naming it and `fix`."""
    if missing_ok and not Path(path).is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n} is not valid JSON ({e.msg}); {fix}") from None
    return rows


def write_dir(path: str | Path, fill) -> None:
    """Build a directory atomically: `fill(tmp_dir)` writes into a temporary sibling, which is then
    renamed into place (replacing an older copy). Used for adapters, which are several files."""
    path = Path(path)
    with _one_line(path):
        _write_dir(path, fill)


def _write_dir(path: Path, fill) -> None:
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
