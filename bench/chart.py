"""The benchmark as a picture: `python -m bench.chart` (needs the `chart` extra: matplotlib).

Reads a results file written by `python -m bench` (bench/RESULTS.md by default), takes the
last run in it that has the follow-up and channels-per-box rows, and draws them into
docs/performance.png: how long a follow-up in a long conversation takes to start (with the
engine's KV reuse, re-reading the history, and plain llama.cpp reading only the new message),
and the tokens per second each channel and the whole box get with 1 to 8 channels generating
at once. The chart's title names the CPU and model from that run's header line.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IN = HERE / "RESULTS.md"
DEFAULT_OUT = HERE.parent / "docs" / "performance.png"

FOLLOW_UP = re.compile(r"^\| Follow-up latency: .*?\| (\d+) ms vs (\d+) ms")
ONLY_NEW = re.compile(r"^\| Follow-up latency vs evaluating only the new message .*?\| (\d+) ms vs (\d+) ms")
CHANNELS = re.compile(r"^\| Channels per box: .*?\| ((?:\d+: \d+; )*\d+: \d+) tok/s")
HEADER = re.compile(r"^Measured (.+?) on (.+), (\d+) threads, model (\S+?), ")


@dataclass
class Run:
    """The rows of one benchmark run that the chart shows."""

    when: str
    cpu: str
    threads: int
    model: str
    with_reuse_ms: float | None = None
    without_reuse_ms: float | None = None
    only_new_ms: float | None = None
    per_channel: dict[int, float] | None = None  # channels generating at once -> tok/s each


def parse(text: str) -> list[Run]:
    """Every run in a results file, in order; a run starts at its `Measured ... on CPU` line."""
    runs: list[Run] = []
    run: Run | None = None  # rows belong to the run whose header came last, until the next heading
    for line in text.splitlines():
        if m := HEADER.match(line):
            run = Run(when=m.group(1), cpu=m.group(2), threads=int(m.group(3)), model=m.group(4))
            runs.append(run)
        elif line.startswith("#"):
            run = None
        elif run is None:
            continue
        elif m := FOLLOW_UP.match(line):
            run.with_reuse_ms, run.without_reuse_ms = float(m.group(1)), float(m.group(2))
        elif m := ONLY_NEW.match(line):
            run.only_new_ms = float(m.group(2))
        elif m := CHANNELS.match(line):
            run.per_channel = {int(n): float(v) for n, v in (cell.split(": ") for cell in m.group(1).split("; "))}
    return runs


def chosen(runs: list[Run]) -> Run:
    complete = [r for r in runs if r.with_reuse_ms and r.without_reuse_ms and r.per_channel]
    if not complete:
        raise SystemExit("error: no run in the results file has both the follow-up and the channels-per-box rows")
    return complete[-1]


def draw(run: Run, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    labels = ["with KV reuse\n(this engine)", "re-reading\nthe history"]
    values = [run.with_reuse_ms or 0.0, run.without_reuse_ms or 0.0]
    if run.only_new_ms:
        labels.insert(1, "only the new\nmessage (plain\nllama.cpp)")
        values.insert(1, run.only_new_ms)
    colors = ["#2a7ab9", "#c8553d", "#9ab8d6"] if run.only_new_ms else ["#2a7ab9", "#9ab8d6"]
    bars = left.bar(labels, values, color=colors)
    left.bar_label(bars, labels=[f"{v:,.0f} ms" for v in values], padding=3)
    left.set_ylabel("time to first token (ms, lower is better)")
    left.set_title("A follow-up in a long conversation\n(4 channels, ~1,450 tokens of history each)")
    left.set_ylim(0, max(values) * 1.18)

    ns = sorted(run.per_channel or {})
    each = [run.per_channel[n] for n in ns] if run.per_channel else []
    total = [n * v for n, v in zip(ns, each)]
    right.plot(ns, total, marker="o", color="#2a7ab9", label="the whole box")
    right.plot(ns, each, marker="o", color="#c8553d", label="each channel")
    for n, t, e in zip(ns, total, each):
        right.annotate(f"{t:.0f}", (n, t), textcoords="offset points", xytext=(0, 6), ha="center", color="#2a7ab9")
        right.annotate(f"{e:.0f}", (n, e), textcoords="offset points", xytext=(0, -14), ha="center", color="#c8553d")
    right.set_xscale("log", base=2)
    right.set_xticks(ns, [str(n) for n in ns])
    right.set_xlabel("channels generating at once (PARALLEL=8)")
    right.set_ylabel("generated tokens/s (higher is better)")
    right.set_title("Throughput as channels are added")
    right.set_ylim(0, max(total + each) * 1.2)
    right.legend(loc="upper left")

    fig.suptitle(f"python -m bench, {run.when}: {run.model}, {run.threads} threads\n{run.cpu}", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(DEFAULT_IN), help="a results file from python -m bench (default: bench/RESULTS.md)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the PNG to write (default: docs/performance.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: the chart needs matplotlib: pip install -e '.[chart]'", file=sys.stderr)
        return 2
    run = chosen(parse(Path(args.results).read_text()))
    draw(run, Path(args.out))
    print(f"wrote {args.out} from the run of {run.when} on {run.cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
