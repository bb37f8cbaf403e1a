"""Smoke test of the container image and compose.yaml, with podman (run by .ci/container-smoke).

The image must already be built (the shell script does that). This starts the tests'
local Discord API (tests/fakediscord.py) on the host and runs the image against it with
--network=host, the way the README's container route runs it:

  1. the image itself: size, user, stop signal, health check, no build secret inside;
  2. `docker run -i IMAGE` with a question on standard input: the terminal chat answers;
  3. the bot with a bind-mounted data folder: a mention gets a reply in its channel, the
     health check passes, the process is not root, the database is 0600 in the volume,
     and SIGTERM (`podman stop`) ends it cleanly within the grace period;
  4. compose.yaml, parsed: the same image, command, volumes, environment and stop grace
     run with `podman run` (Docker Compose is not there), and checked the same way.

Usage: python -m tests.container_smoke --image llamabot --work DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.fakediscord import FakeDiscord

ROOT = Path(__file__).resolve().parent.parent
BOT_UID = 1000  # the Dockerfile's UID
MAX_IMAGE_BYTES = 1_500_000_000
SMALL = {"LLAMA_N_CTX": "1024", "LLAMA_N_PREDICT": "48", "TEMPERATURE": "0"}  # quick replies on a shared CPU


def say(text: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {text}", flush=True)


class SmokeFailure(Exception):
    pass


def expect(condition: object, what: str) -> None:
    if not condition:
        raise SmokeFailure(what)


async def podman(*args: str, input: bytes | None = None, timeout: float = 300, check: bool = True, stderr: bool = False) -> tuple[int, str]:
    """Run podman without blocking the event loop (the fake Discord must keep serving).

    Returns the exit code and standard output (and error, with `stderr`: `podman logs`
    gives the container's there); otherwise standard error (podman's own complaints, such
    as having no systemd to schedule health checks with) only shows on failure."""
    process = await asyncio.create_subprocess_exec(
        "podman", *args, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT if stderr else asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(input), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise SmokeFailure(f"podman {' '.join(args[:3])} ... took more than {timeout:.0f} s") from None
    text = out.decode("utf-8", "replace")
    assert process.returncode is not None
    if check and process.returncode != 0:
        raise SmokeFailure(f"podman {' '.join(args)} exited {process.returncode}:\n{text[-3000:]}\n{(err or b'').decode('utf-8', 'replace')[-3000:]}")
    return process.returncode, text


# ----------------------------------------------------------------------------- 1. the image


async def check_image(image: str) -> None:
    _, size = await podman("image", "inspect", "--format", "{{.Size}}", image)
    _, config = await podman("image", "inspect", "--format", "{{.Config.User}}|{{.Config.StopSignal}}|{{json .Config.Env}}", image)
    _, health = await podman("image", "inspect", "--format", "{{json .HealthCheck}}", image)
    user, signal, env = config.strip().split("|", 2)
    say(f"image {image}: {int(size) / 1e6:.0f} MB, user {user}, stop signal {signal}, health check {health.strip()}")
    expect(int(size) <= MAX_IMAGE_BYTES, f"the image is {int(size) / 1e6:.0f} MB, more than {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    expect(user and user not in ("root", "0"), f"the image runs as {user!r}")
    expect(signal == "SIGTERM", f"stop signal {signal!r}")
    expect('"bot","health"' in health.replace(" ", ""), f"no `python -m bot health` HEALTHCHECK (build with --format docker): {health}")
    expect("PIP_CERT" not in env, "PIP_CERT is set in the image")
    # The CA bundle was a build secret: it must be in no layer.
    _, found = await podman("run", "--rm", "--network=host", image, "sh", "-c", "ls -A /run/secrets 2>/dev/null; find / -xdev -name 'ca' -path '*secrets*' 2>/dev/null; true")
    expect(found.strip() == "", f"the build secret is in the image: {found}")


# ----------------------------------------------------------------------------- 2. terminal chat


async def terminal_chat(image: str) -> None:
    env = [f"--env={k}={v}" for k, v in SMALL.items()]
    started = time.monotonic()
    _, out = await podman("run", "--rm", "-i", "--network=host", *env, image, input=b"What is the capital of France?\n", timeout=300)
    match = re.search(r"\[ASSISTANT\]:\n(.*?)(?:\n\[USER\]:|\Z)", out, re.S)
    expect(match and match.group(1).strip(), f"no answer from the terminal chat:\n{out[-2000:]}")
    assert match is not None
    say(f"terminal chat answered in {time.monotonic() - started:.0f} s: {match.group(1).strip()[:80]!r}")
    expect("Traceback" not in out, f"a traceback in the terminal chat:\n{out[-2000:]}")


# ----------------------------------------------------------------------------- 3./4. the Discord bot


@dataclass
class Service:
    """How one bot container is started, and where its /data is on the host."""

    name: str
    run_args: list[str]  # everything between `podman run -d --name NAME` and the image
    command: list[str]
    grace_s: float
    data_dir: Path | None = None  # a bind mount; None: the named volume `volume`
    volume: str | None = None
    files: dict[Path, str] = field(default_factory=dict)  # written before the start, like run_args
    stop_while_writing: bool = False  # SIGTERM while a long reply is being written: the drain


async def host_data_dir(service: Service) -> Path:
    if service.data_dir is not None:
        return service.data_dir
    assert service.volume is not None
    _, mountpoint = await podman("volume", "inspect", "--format", "{{.Mountpoint}}", service.volume)
    return Path(mountpoint.strip())


async def serve_and_stop(image: str, service: Service) -> None:
    async with FakeDiscord() as fake:
        guild = fake.add_guild("town")
        general = fake.add_channel(guild, "general")
        other = fake.add_channel(guild, "other")
        ann = fake.add_user("ann")
        fake.add_member(guild, ann)
        discord_env = {"DISCORD_TOKEN": fake.token, "DISCORD_API_BASE": fake.api_base, "DISCORD_GATEWAY_URL": fake.gateway_url}
        args = [a.format(**discord_env) for a in service.run_args]
        for path, text in service.files.items():
            path.write_text(text.format(**discord_env))
        started = time.monotonic()
        await podman("run", "-d", "--name", service.name, *args, image, *service.command)
        try:
            await fake.wait_ready(timeout=300)
            say(f"{service.name}: connected to the local Discord API {time.monotonic() - started:.0f} s after `podman run`")
            sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> What is the capital of France?")
            replies = await fake.wait_for_bot_message(general, after=sent, timeout=180)
            writing = lambda: any("llamabot:stop:" in json.dumps(m.get("components", [])) for m in fake.bot_messages(general))  # noqa: E731
            await fake.wait_for(lambda: not writing(), 120, description="the reply finished (no Stop button)")
            reply = fake.bot_messages(general)[-1]["content"]
            expect(replies and reply, "an empty reply")
            expect(fake.bot_messages(other) == [], "the bot wrote in a channel it was not asked in")
            say(f"{service.name}: replied in #general: {reply[:80]!r}")

            await check_health(service.name)
            await check_not_root(service.name)
            await check_data(service)

            if service.stop_while_writing:
                sent = await fake.send_message(general, ann, f"<@{fake.bot_user['id']}> Write a long story about a dragon.")
                await fake.wait_for_bot_message(general, after=sent, timeout=120)  # streaming: it is being written
            grace = service.grace_s
            stopping = time.monotonic()
            await podman("stop", service.name, timeout=grace + 60)  # the container's own --stop-timeout
            took = time.monotonic() - stopping
            _, state = await podman("inspect", "--format", "{{.State.ExitCode}}|{{.State.Status}}", service.name)
            code, status = state.strip().split("|")
            _, log = await podman("logs", service.name, stderr=True)
            during = " during a reply" if service.stop_while_writing and "finishing replies in progress" in log else ""
            say(f"{service.name}: `podman stop`{during} took {took:.1f} s (grace {grace:.0f} s); exit code {code}")
            expect(code == "0", f"exit code {code} after SIGTERM:\n{log[-3000:]}")
            expect(took < grace, f"stopping took {took:.1f} s, not within the {grace:.0f} s grace period")
            expect("shutting down" in log and re.search(r"\bstopped\b", log), f"the log does not say it stopped:\n{log[-3000:]}")
            expect("Traceback" not in log, f"a traceback in the bot's log:\n{log[-3000:]}")
            data = await host_data_dir(service)
            expect(not (data / "bot.sqlite3.health").exists(), "the heartbeat file is still there after a clean stop")
        finally:
            await podman("rm", "-f", "-t", "0", service.name, check=False)


async def check_health(name: str) -> None:
    """The image's HEALTHCHECK command, run inside the running container, passes once connected."""
    _, command = await podman("inspect", "--format", "{{json .Config.Healthcheck.Test}}", name)
    deadline = time.monotonic() + 30
    while True:
        code, out = await podman("healthcheck", "run", name, check=False)
        if code == 0:
            break
        if time.monotonic() > deadline:
            _, why = await podman("exec", name, "python", "-m", "bot", "health", check=False)
            raise SmokeFailure(f"the health check fails while connected: {out.strip()} / {why.strip()}")
        await asyncio.sleep(1)
    _, why = await podman("exec", name, "python", "-m", "bot", "health")
    say(f"{name}: health check {command.strip()} passes: {why.strip()}")


async def check_not_root(name: str) -> None:
    _, pid = await podman("inspect", "--format", "{{.State.Pid}}", name)
    status = Path(f"/proc/{pid.strip()}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None
    ids = {int(u) for u in uids.group(1).split()}
    expect(ids == {BOT_UID}, f"the bot process runs as uid(s) {sorted(ids)}, not {BOT_UID}")
    say(f"{name}: the bot process (host pid {pid.strip()}) runs as uid {BOT_UID}")


async def check_data(service: Service) -> None:
    data = await host_data_dir(service)
    db = data / "bot.sqlite3"
    expect(db.is_file(), f"no database in the volume ({sorted(p.name for p in data.iterdir())})")
    mode, owner = stat.S_IMODE(db.stat().st_mode), db.stat().st_uid
    expect(mode == 0o600 and owner == BOT_UID, f"the database is mode {mode:o}, owner {owner}")
    folder_mode = stat.S_IMODE(data.stat().st_mode)
    expect(folder_mode == 0o700, f"/data is mode {folder_mode:o}")
    kv = data / "bot.sqlite3.kv"
    if kv.exists():
        expect(stat.S_IMODE(kv.stat().st_mode) == 0o700, f"the KV folder is mode {stat.S_IMODE(kv.stat().st_mode):o}")
    say(f"{service.name}: {db} is mode 600, uid {BOT_UID}; the data folder is 700; contents {sorted(p.name for p in data.iterdir())}")


def bind_mount_service(work: Path) -> Service:
    """The bot as the README's `docker run` would start it, /data a host folder given to UID 1000."""
    data = work / "data"
    data.mkdir(mode=0o700)
    os.chown(data, BOT_UID, BOT_UID)
    env = {**SMALL, "LLAMA_N_PREDICT": "400", "DISCORD_TOKEN": "{DISCORD_TOKEN}", "DISCORD_API_BASE": "{DISCORD_API_BASE}", "DISCORD_GATEWAY_URL": "{DISCORD_GATEWAY_URL}"}
    args = ["--network=host", "--stop-timeout=45", f"--volume={data}:/data", *(f"--env={k}={v}" for k, v in env.items())]
    return Service("smoke-bot", args, ["python", "-m", "bot", "run"], 45.0, data_dir=data, stop_while_writing=True)


def duration(text: str) -> float:
    """Compose's durations: 45s, 1m30s, 2m."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(text).strip())
    if not parts or not any(parts.groups()):
        raise SmokeFailure(f"cannot read the duration {text!r}")
    return int(parts.group(1) or 0) * 60 + float(parts.group(2) or 0)


def compose_service(work: Path, compose_file: Path, image: str) -> Service:
    """compose.yaml's bot service as `podman run` arguments, in a project folder of its own."""
    spec = yaml.safe_load(compose_file.read_text())
    bot = spec["services"]["bot"]
    expect(bot.get("image") == image, f"compose.yaml's image is {bot.get('image')!r}, the script built {image!r}")
    expect(bot.get("restart") == "unless-stopped", f"restart: {bot.get('restart')!r}")
    command = bot["command"]
    expect(command == ["python", "-m", "bot", "run"], f"command: {command!r}")
    project = work / "compose"
    project.mkdir()
    # The user's .env: the token and addresses of this run's local Discord API.
    dot_env = {**SMALL, "DISCORD_TOKEN": "{DISCORD_TOKEN}", "DISCORD_API_BASE": "{DISCORD_API_BASE}", "DISCORD_GATEWAY_URL": "{DISCORD_GATEWAY_URL}"}
    files = {}
    args = ["--network=host", f"--restart={bot['restart']}"]  # compose's own network is a bridge; the fake is on the host
    grace = duration(bot["stop_grace_period"])
    args.append(f"--stop-timeout={grace:.0f}")
    volume = None
    for entry in bot["volumes"]:
        source, target, *options = entry.split(":")
        if source.startswith((".", "/")):
            host = (project / source).resolve()
            host.mkdir(parents=True, exist_ok=True)
            source = str(host)
        else:
            expect(source in spec.get("volumes", {}), f"volume {source!r} is not declared under volumes:")
            volume = f"smoke-{source}"
            source = volume
        args.append(f"--volume={':'.join([source, target, *options])}")
    expect(volume is not None, "compose.yaml mounts no named volume at /data")
    env_files = bot["env_file"] if isinstance(bot["env_file"], list) else [bot["env_file"]]
    for env_file in env_files:
        files[project / env_file] = "".join(f"{k}={v}\n" for k, v in dot_env.items())
        args.append(f"--env-file={project / env_file}")
    environment = bot.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(e.split("=", 1) for e in environment)
    args += [f"--env={k}={v}" for k, v in environment.items()]
    return Service("smoke-compose", args, command, grace, volume=volume, files=files)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="llamabot")
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the volumes")
    args = parser.parse_args()
    try:
        await check_image(args.image)
        await terminal_chat(args.image)
        await serve_and_stop(args.image, bind_mount_service(args.work))
        service = compose_service(args.work, ROOT / "compose.yaml", args.image)
        await serve_and_stop(args.image, service)
    except (SmokeFailure, TimeoutError) as exc:  # the fake's waits raise TimeoutError
        say(f"FAILED: {exc}")
        return 1
    say("all container checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
