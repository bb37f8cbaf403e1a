"""The serving bot's heartbeat file, and the health check that reads it.

`python -m bot run` keeps `<DATABASE_PATH>.health` fresh while it runs: a small JSON
saying when, which process, whether Discord is connected and whether the model
backend is alive. A container's HEALTHCHECK (`python -m bot health`) only reads that
file: it never opens the database or loads a model, so it is never a second process
on the bot's data, and it costs nothing while the bot is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REFRESH_S = 15.0  # the file is rewritten at least this often...
POLL_S = 1.0  # ...and within a second of a change (connected, disconnected, backend gone)
MAX_AGE_S = 60.0  # older than this: the process is stuck or gone

# What the serving process reports: (connected to Discord, model backend alive).
Probe = Callable[[], tuple[bool, bool]]


@dataclass(frozen=True)
class Beat:
    time: float  # unix time of the write
    pid: int
    connected: bool
    backend_alive: bool


def heartbeat_path(database_path: Path) -> Path:
    """The heartbeat lives beside the database, like its KV folder: one data folder holds all."""
    return database_path.with_name(database_path.name + ".health")


def write_beat(path: Path, beat: Beat) -> None:
    """Atomically (temporary file, then rename), private (0600): a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(asdict(beat)).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_beat(path: Path) -> Beat:
    """Raises OSError when the file cannot be read, ValueError when it is not a heartbeat."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        return Beat(time=float(raw["time"]), pid=int(raw["pid"]), connected=bool(raw["connected"]), backend_alive=bool(raw["backend_alive"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"missing or wrong field: {exc}") from None


def check(path: Path, max_age: float = MAX_AGE_S, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why) from the heartbeat file alone."""
    try:
        beat = read_beat(path)
    except FileNotFoundError:
        return False, f"not running: no heartbeat file {path} (it exists while `python -m bot run` serves)"
    except OSError as exc:
        return False, f"cannot read the heartbeat file {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return False, f"the heartbeat file {path} is not valid: {exc}"
    age = (time.time() if now is None else now) - beat.time
    if age > max_age:
        return False, f"heartbeat stale since {age:.0f} s (pid {beat.pid}): the bot is stuck or was killed"
    if not beat.backend_alive:
        return False, f"model backend gone (pid {beat.pid}): the bot is about to exit and be restarted"
    if not beat.connected:
        return False, f"not connected to Discord (pid {beat.pid}): logging in, or reconnecting"
    return True, f"ok: connected to Discord, model backend alive (pid {beat.pid}, heartbeat {max(age, 0):.0f} s old)"


class Heartbeat:
    """Keeps the heartbeat file fresh from `probe` while started; removes it on stop.

    `start()` writes at once and then from a background task; `stop()` ends the task and
    removes the file. Also an async context manager doing both.
    """

    def __init__(self, path: Path, probe: Probe, *, refresh: float = REFRESH_S, poll: float = POLL_S) -> None:
        self.path = path
        self.probe = probe
        self.refresh = refresh
        self.poll = poll
        self._task: asyncio.Task[None] | None = None
        self._failed = False

    def start(self) -> None:
        last = self._write()
        self._task = asyncio.get_running_loop().create_task(self._run(last), name="heartbeat")

    def stop(self) -> None:
        """Synchronous, so that a `finally:` can call it; the task only writes between its sleeps."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> Heartbeat:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop()

    async def _run(self, last: Beat | None) -> None:
        while True:
            await asyncio.sleep(self.poll)
            connected, alive = self.probe()
            changed = last is None or (connected, alive) != (last.connected, last.backend_alive)
            if changed or time.time() - last.time >= self.refresh:  # type: ignore[union-attr]
                last = self._write() or last

    def _write(self) -> Beat | None:
        connected, alive = self.probe()
        beat = Beat(time=time.time(), pid=os.getpid(), connected=connected, backend_alive=alive)
        try:
            write_beat(self.path, beat)
        except OSError as exc:  # a full disk must not stop the bot; the health check will say so
            if not self._failed:
                log.warning("cannot write the heartbeat file %s: %s", self.path, exc.strerror or exc)
            self._failed = True
            return None
        self._failed = False
        return beat
