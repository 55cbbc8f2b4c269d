"""The run directory's single writer: a lock held for the whole of `minitpo run`.

Consumes a run directory path; provides `lock(out)` (a context manager that refuses, in one line, a
directory another process holds), `clear(out)` (what --fresh does, under that lock) and the removal of
temporary files a killed process left behind.

The lock is `flock` on RUN_DIR/.lock: the kernel releases it when the holding process exits, however it
exits (SIGKILL included), so a killed run never leaves it stuck; the file itself staying behind means
nothing. The holder's pid is written into it, for the message a second run prints.
"""

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from minitpo.errors import UserError

LOCK = ".lock"


@contextmanager
def lock(out: Path):
    """Hold RUN_DIR's lock for the duration of the block, or raise UserError when another process does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"out: {str(out)!r} is in use by another minitpo run (pid {holder}); wait for it to "
                        "finish or stop it, or pass --out to use another directory") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def clear(out: Path) -> None:
    """Delete everything in RUN_DIR but its lock (--fresh). Call it with the lock held."""
    for entry in Path(out).iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_stale_temps(out: Path) -> int:
    """Remove the temporary siblings (.NAME.*.tmp, files or folders) that minitpo.io leaves when a
    process is killed mid-write; return how many. Call it with the lock held: nobody else is writing."""
    n = 0
    for tmp in sorted(Path(out).rglob(".*.tmp"), key=lambda p: len(p.parts)):  # outer ones first
        if not tmp.exists():
            continue  # inside a temporary folder removed just before
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n
