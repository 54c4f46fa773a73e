"""The benchmarks' output: the machine line, the command, CSV, markdown tables, reports and plots.

One look per method (:data:`STYLES`) and one label (:data:`LABELS`) in every table and plot; every
figure carries a footer naming the model, dtype, machine and date that made it.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from .harness import Built

LABELS = {
    "streaming": "StreamingLLM (this library)",
    "recompute": "sliding window + re-computation",
    "dense": "dense attention",
    "window": "window attention (no sinks)",
    "hf-recompute": "transformers: re-encode window",
    "hf-dense": "transformers: growing cache",
    "attention-sinks": "attention_sinks 0.4.0 (transformers 4.34)",
    "onnx": "ONNX export on onnxruntime (CPU)",
    "recall": "StreamingLLM + recall of evicted blocks",
}
STYLES = {  # colour, marker, line style: one look per method in every plot
    "streaming": ("#d62728", "o", "-"),
    "recompute": ("#1f77b4", "s", "-"),
    "dense": ("#7f7f7f", "^", "-"),
    "window": ("#2ca02c", "v", "-"),
    "hf-recompute": ("#0b3d66", "s", ":"),
    "hf-dense": ("#222222", "^", ":"),
    "attention-sinks": ("#9467bd", "D", "--"),
    "onnx": ("#ff7f0e", "P", "--"),
    "recall": ("#8c564b", "*", "-"),
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def command(name: str, argv: Sequence[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", f"bench.{name}", *map(shlex.quote, argv)])


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_csv(path: Path, rows: Iterable[dict], fields: Sequence[str] | None = None) -> None:
    rows = list(rows)
    fields = list(fields or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(r.get(k)) for k in fields})


def cell(v, digits: int = 6):
    """A value as a CSV/markdown cell: floats to ``digits`` significant digits, NaN and None empty."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return "" if v is None else v


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Path, title: str, cmd: str, built: Built, body: str) -> str:
    text = (f"### {title}\n\n`{cmd}`\n\n- machine: {machine(built.device)}\n- date: {today()}\n"
            f"- model: {built.source}, {str(built.dtype).removeprefix('torch.')}, backend {built.model.backend}\n\n{body}\n")
    path.write_text(text)
    return text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8, "legend.frameon": False})
    return plt


def log2_axis(ax, ticks: Sequence[int]) -> None:
    """Log x axis with exactly these tick labels."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def style(method: str) -> dict:
    color, marker, ls = STYLES.get(method, ("black", ".", "-"))
    return dict(color=color, marker=marker, linestyle=ls, label=LABELS.get(method, method))


def footer(built: Built, prefix: str = "") -> str:
    """The small print under every figure: what model, dtype, machine and date made it."""
    return f"{prefix}{built.source}, {str(built.dtype).removeprefix('torch.')}, {machine(built.device)}, {today()}"


def save_figure(fig, path: Path, footer: str) -> None:
    import textwrap

    width, height = fig.get_size_inches()
    lines = textwrap.wrap(footer, width=int(width * 19))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6.5, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, min(0.3, (0.05 + 0.13 * len(lines)) / height), 1, 1))
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def ms(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    v = seconds * 1e3
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
