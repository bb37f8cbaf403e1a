"""The heartbeat file (bot/health.py) and `python -m bot health` run as a real process."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from bot.health import MAX_AGE_S, Beat, Heartbeat, check, heartbeat_path, read_beat, write_beat
from tests.conftest import ROOT


class Status:
    """What the serving process would report; the tests change it."""

    def __init__(self) -> None:
        self.connected = False
        self.backend_alive = True

    def __call__(self) -> tuple[bool, bool]:
        return self.connected, self.backend_alive


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_heartbeat_lives_beside_the_database(tmp_path: Path) -> None:
    assert heartbeat_path(tmp_path / "bot.sqlite3") == tmp_path / "bot.sqlite3.health"


async def test_heartbeat_follows_the_probe_and_is_removed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3.health"
    status = Status()
    beat = Heartbeat(path, status, poll=0.05)
    beat.start()
    try:
        first = read_beat(path)  # written at once, before the first poll
        assert (first.pid, first.connected, first.backend_alive) == (os.getpid(), False, True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ok, why = check(path)
        assert not ok and "not connected to Discord" in why
        status.connected = True
        await wait_until(lambda: read_beat(path).connected)  # a change is written without waiting for the refresh
        assert check(path)[0]
        status.backend_alive = False
        await wait_until(lambda: not read_beat(path).backend_alive)
        ok, why = check(path)
        assert not ok and "model backend gone" in why
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    finally:
        beat.stop()
    assert not path.exists()
    await asyncio.sleep(0.2)  # the stopped task never writes it again
    assert not path.exists()


async def test_heartbeat_is_refreshed_while_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "h"
    status = Status()
    status.connected = True
    async with Heartbeat(path, status, refresh=0.2, poll=0.05):
        first = read_beat(path).time
        await wait_until(lambda: read_beat(path).time > first)
    assert not path.exists()


async def test_heartbeat_survives_a_folder_it_cannot_write(tmp_path: Path) -> None:
    status = Status()
    beat = Heartbeat(tmp_path / "missing-folder" / "h", status, poll=0.05)
    beat.start()  # logs a warning, does not raise: the bot goes on serving
    await asyncio.sleep(0.2)
    beat.stop()
    ok, why = check(tmp_path / "missing-folder" / "h")
    assert not ok and "not running" in why


def test_check_says_why(tmp_path: Path) -> None:
    path = tmp_path / "h"
    now = time.time()
    ok, why = check(path)
    assert not ok and why.startswith("not running") and str(path) in why
    write_beat(path, Beat(time=now, pid=42, connected=True, backend_alive=True))
    ok, why = check(path, now=now + 5)
    assert ok and "pid 42" in why
    ok, why = check(path, now=now + MAX_AGE_S + 30)
    assert not ok and f"stale since {MAX_AGE_S + 30:.0f} s" in why
    ok, _ = check(path, max_age=200, now=now + MAX_AGE_S + 30)
    assert ok
    write_beat(path, Beat(time=now, pid=42, connected=False, backend_alive=False))
    ok, why = check(path, now=now)
    assert not ok and "model backend gone" in why
    path.write_text("{half a fi")
    ok, why = check(path)
    assert not ok and "not valid" in why
    path.write_text('{"time": 1}')
    ok, why = check(path)
    assert not ok and "not valid" in why


def run_health(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_", "DISCORD_", "DATABASE_"))}
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "bot", *args, "health"], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)


def test_health_command_reads_the_heartbeat_and_never_the_database(tmp_path: Path) -> None:
    db = tmp_path / "data" / "bot.sqlite3"
    db.parent.mkdir()
    missing = run_health(tmp_path, DATABASE_PATH=str(db))
    assert missing.returncode == 1
    assert missing.stdout.startswith("not running") and "Traceback" not in missing.stderr

    write_beat(heartbeat_path(db), Beat(time=time.time(), pid=7, connected=True, backend_alive=True))
    fresh = run_health(tmp_path, DATABASE_PATH=str(db))
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert fresh.stdout.startswith("ok") and len(fresh.stdout.splitlines()) == 1

    write_beat(heartbeat_path(db), Beat(time=time.time() - 3600, pid=7, connected=True, backend_alive=True))
    stale = run_health(tmp_path, DATABASE_PATH=str(db))
    assert stale.returncode == 1 and "stale since" in stale.stdout

    write_beat(heartbeat_path(db), Beat(time=time.time(), pid=7, connected=False, backend_alive=True))
    offline = run_health(tmp_path, DATABASE_PATH=str(db))
    assert offline.returncode == 1 and "not connected to Discord" in offline.stdout
    assert sorted(p.name for p in db.parent.iterdir()) == ["bot.sqlite3.health"]  # no database created or opened


def test_health_command_takes_the_database_path_from_the_env_file(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.sqlite3"
    env_file = tmp_path / "bot.env"
    env_file.write_text(f"DATABASE_PATH={db}\n")
    write_beat(heartbeat_path(db), Beat(time=time.time(), pid=7, connected=True, backend_alive=True))
    assert run_health(tmp_path).returncode == 1  # default: ./bot.sqlite3, no heartbeat there
    found = run_health(tmp_path, "--env-file", str(env_file))
    assert found.returncode == 0, found.stdout + found.stderr


def test_health_command_reports_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    bad = run_health(tmp_path, LLAMA_N_CTX="lots")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and "LLAMA_N_CTX" in bad.stderr
