"""llama.cpp's own server, for the bench's side-by-side rows.

It is built from the llama.cpp inside the llama-cpp-python sdist of the version the
bot runs (so both use the same kernels), with the same AMX-off flags as the README's
install line, once: the build (about 12 minutes on 2 cores) is kept under
~/.cache/llamabot/, never in the repository. `python -m bench.llama_server` builds it
ahead of a bench run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


class Unavailable(RuntimeError):
    """llama-server cannot be built or started here; the message says why, in one line."""


def cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamabot" / f"llama-server-{version}"


def llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def binary(version: str | None = None) -> Path:
    """The built llama-server (building it first if needed; raises Unavailable)."""
    version = version or llama_cpp_version()
    folder = cache_dir(version)
    exe = folder / "bin" / "llama-server"
    if exe.is_file():
        return exe
    if shutil.which("cmake") is None:
        raise Unavailable("cmake is not installed, so llama-server cannot be built")
    folder.mkdir(parents=True, exist_ok=True)
    logfile = folder / "build.log"
    with tempfile.TemporaryDirectory(dir=folder) as tmp, logfile.open("w") as out:
        print(f"building llama-server {version} (about 12 minutes; log: {logfile})...", file=sys.stderr)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={version}", "-d", tmp],
                check=True, stdout=out, stderr=subprocess.STDOUT, timeout=900,
            )
            [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            build = Path(tmp) / "build"
            subprocess.run(
                [
                    "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_FLAGS={NO_AMX}",
                    f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
                ],
                check=True, stdout=out, stderr=subprocess.STDOUT, timeout=900,
            )
            subprocess.run(
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(len(os.sched_getaffinity(0)))],
                check=True, stdout=out, stderr=subprocess.STDOUT, timeout=7200,
            )
            built = next(build.glob("**/bin/llama-server"))
        except (subprocess.SubprocessError, OSError, ValueError, StopIteration, tarfile.TarError) as exc:
            raise Unavailable(f"llama-server could not be built ({type(exc).__name__}; see {logfile})") from None
        exe.parent.mkdir(exist_ok=True)
        shutil.copy2(built, exe)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(model: Path, args: Sequence[str], *, timeout: float = 120) -> Iterator[str]:
    """Start llama-server on a free local port with `args`; yields its base URL."""
    exe = binary()
    port = free_port()
    cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *args]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    tail = out.read().decode(errors="replace").strip().splitlines()[-1:]
                    raise Unavailable(f"llama-server exited at start: {tail[0] if tail else proc.returncode}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable("llama-server did not become ready")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def complete(url: str, prompt: list[int], *, n_predict: int = 1, cache_prompt: bool = True, timeout: float = 600) -> dict:
    """One /completion request with the prompt as token ids, greedy (as the bench asks the
    bot: the same tokens, ending at the same end of turn)."""
    body = json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0, "cache_prompt": cache_prompt}).encode()
    request = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    try:
        print(binary())
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
