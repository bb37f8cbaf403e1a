"""One serving process per database: a second `run` or terminal chat on the same file is refused.

Two processes serving one database would answer every message twice. The lock is an
advisory `flock` on a file beside the database (`<DATABASE_PATH>.lock`), which the kernel
releases when its process ends in any way (SIGKILL included), so a crash never leaves a
stale lock. It is not SQLite's exclusive locking mode, which would also block a live
`.backup`; commands that only read (export, health) do not take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bot.conversations.records import StoreError


class AlreadyServing(StoreError):
    """Another process serves this database; the message says which and what to do."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def serving(database: Path) -> Iterator[None]:
    """Hold the database's serving lock for the block, or raise AlreadyServing at once."""
    if str(database) == ":memory:":
        yield
        return
    path = lock_path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyServing(
                f"another bot process (pid {holder}) is already serving {database}; two would answer every message twice. "
                "Stop it first, or give this one its own DATABASE_PATH."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race with a new holder)
