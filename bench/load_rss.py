"""What a model costs in RAM as the bot loads it: `python -m bench.load_rss [MODEL.gguf]`.

Loads the model the way the bot does (`LLAMA_N_CTX` tokens for each of `PARALLEL` slots,
the KV cache allocated and cleared by llama.cpp at load) and prints the process's resident
memory before and after. Without a model file, the bundled SmolLM2. The `KV_CACHE_MB` RAM
cache of saved conversations comes on top, as conversations are evicted from the slots.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from bot.config import bundled_model_path
from bot.engine.local import Engine, EngineOptions


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


async def measure(model: Path, n_ctx: int | None, parallel: int) -> str:
    before = rss_mib()
    # flash attention off: nothing to measure at load, and the KV cache is the same size either way
    engine = await Engine.load(model, EngineOptions(n_ctx=n_ctx, n_threads=len(os.sched_getaffinity(0)), parallel=parallel, flash_attn="off"))
    try:
        after = rss_mib()
        return (
            f"{model.name} ({model.stat().st_size / 2**20:.0f} MiB file): LLAMA_N_CTX {engine.n_ctx} x PARALLEL {parallel}; "
            f"resident memory {before:.0f} MiB before loading, {after:.0f} MiB after (+{after - before:.0f} MiB)"
        )
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_rss", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--ctx", type=int, help="LLAMA_N_CTX (default: 4096, or the model's trained context if smaller)")
    parser.add_argument("--parallel", type=int, default=4, help="PARALLEL (default: 4)")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else bundled_model_path()
    print(asyncio.run(measure(model, args.ctx, args.parallel)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
