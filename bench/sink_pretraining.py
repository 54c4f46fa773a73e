"""Table 3 of the StreamingLLM paper in small: models pre-trained here with and without a sink.

Reads run folders of ``python -m streaming_trt.cli.train`` (one per variant), streams each model over
the held-out part of its training text with the runtime at S + (C - S) for S in 0, 1, 2, 4 (C = the
training context), and writes:

- ``table3.csv``: perplexity per variant and S, with the training figures (steps, tokens, losses);
- ``figure2.png``: per variant, the mean attention on token 0 per layer over training (from each
  run's ``attention_mass.csv``; for a sink-token model token 0 is the sink token), and the share
  of the learned sink term for sink-logit and zero-sink models;
- a copy of each run's ``log.csv``, ``attention_mass.csv``, ``loss.png`` and ``attention_mass.png``.

Example (bench/RESULTS.md): ``python -m bench.sink_pretraining --runs /work/train-runs``.
"""
from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from streaming_trt.contract import UserError

from . import harness

VARIANTS = ("vanilla", "sink-token", "zero-sink", "sink-logits")
SINKS = (0, 1, 2, 4)


def arguments(argv=None):
    p = harness.argparse.ArgumentParser(prog="python -m bench.sink_pretraining", description=__doc__.split("\n\n")[0],
                                        formatter_class=harness.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/train", help="folder holding one run folder per variant (default: %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="run folders to read (default: %(default)s)")
    p.add_argument("--sinks", default="0,1,2,4", help="sink token counts S of the table (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=0, help="held-out tokens to stream (0: all) (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=128, help="tokens fed per call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")
    p.add_argument("--out", default="bench/results/sink_pretraining", help="output folder (default: %(default)s)")
    return p.parse_args(argv)


def heldout_ids(folder: Path, settings: dict, tokens: int) -> torch.Tensor:
    """The held-out ids of a run: the same split of the same text as training, its own tokenizer."""
    from streaming_trt.train import data

    text, _ = data.read_text(settings["text"])
    _, held = data.split_text(text, settings["heldout"])
    ids = data.encode(data.load_tokenizer(folder), held)
    return ids[:tokens] if tokens else ids


class _Stream:
    """A one-stream session as :func:`bench.harness.stream_nll` reads it: ``feed(ids [n]) -> [n, vocab]``."""

    def __init__(self, session):
        self.session = session

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.session.feed(ids)[0]


def strongest_heads(folder: Path, config: dict, settings: dict, ids: torch.Tensor, samples: int = 16) -> dict:
    """Per layer, the one head that gives key 0 (and the sink term) the most attention from the
    second half of the queries of ``samples`` held-out windows, as ``"a/b/c/d"`` strings, and the
    even-spread level: a sink head would stand far above it."""
    from streaming_trt.runtime.config import ModelConfig
    from streaming_trt.train import data, files, forward, new_model

    model = new_model(ModelConfig.from_hf_dict(config), 0)
    model.load_state_dict(files.load_state(folder)["model"])
    probe = data.fixed_windows(ids, samples, settings["context"], model.config.sink_token_id)
    with torch.no_grad():
        _, mass = forward(model.eval(), probe[:, :-1], measure=True)
    top = lambda per_layer: "/".join(f"{max(heads):.4f}" for heads in per_layer)  # noqa: E731
    return {"late_even_spread": round(mass.uniform_late, 4), "late_top_head_token0": top(mass.token0_late),
            "late_top_head_sink_term": top(mass.sink_term_late)}


def evaluate(folder: Path, sinks: list[int], tokens: int, chunk: int) -> dict:
    import streaming_trt as st
    from streaming_trt.train import files

    state = files.load_state(folder)
    settings, state_config = state["settings"], state["config"]
    del state
    log = files.read_rows(folder / "log.csv")
    mass = files.read_rows(folder / "attention_mass.csv")
    if not log:
        raise UserError(f"{folder}: no log.csv; is it a run folder of python -m streaming_trt.cli.train?")
    model = st.load_model(folder, backend="torch")
    ids = heldout_ids(folder, settings, tokens)
    late = strongest_heads(folder, state_config, settings, ids)
    capacity = settings["context"]
    row = {"variant": settings["variant"], "steps": int(log[-1]["step"]), "tokens_trained": int(log[-1]["tokens"]),
           "train_minutes": round(float(log[-1]["seconds"]) / 60, 1),
           "train_loss_first": float(log[0]["loss"]),
           "train_loss_last10": round(sum(float(r["loss"]) for r in log[-10:]) / len(log[-10:]), 4),
           "heldout_loss": float(mass[-1]["heldout_loss"]), "eval_tokens": int(ids.numel()), "capacity": capacity,
           **late}
    began = time.perf_counter()
    for s in sinks:
        session = model.session(sink_tokens=s, window=capacity - s, max_chunk=chunk)
        nll = harness.stream_nll(_Stream(session), ids, chunk)
        row[f"ppl_{s}+{capacity - s}"] = round(math.exp(float(nll.mean())), 3)
    row["eval_seconds"] = round(time.perf_counter() - began, 1)
    return row


def figure(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from streaming_trt.train import files

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False, sharey=True)
    for ax, (variant, folder) in zip(axes[0], runs.items()):
        rows = files.read_rows(folder / "attention_mass.csv")
        for layer in sorted({int(r["layer"]) for r in rows}):
            mine = [r for r in rows if int(r["layer"]) == layer]
            x = [int(r["tokens"]) / 1e6 for r in mine]
            line, = ax.plot(x, [float(r["token0"]) for r in mine], label=f"layer {layer}: token 0")
            if variant in ("zero-sink", "sink-logits"):
                ax.plot(x, [float(r["sink_term"]) for r in mine], ls=":", color=line.get_color(),
                        label=f"layer {layer}: sink term")
        ax.axhline(float(rows[0]["uniform"]), color="k", ls="--", lw=0.8, label="even spread")
        ax.set(title=variant, xlabel="training tokens (millions)")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("mean attention weight (held-out samples)")
    fig.tight_layout()
    fig.savefig(out / "figure2.png", dpi=120)
    plt.close(fig)


def run(args, argv=None) -> None:
    torch.set_num_threads(max(1, args.threads))
    try:
        sinks = sorted({int(x) for x in args.sinks.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--sinks takes comma-separated integers, got {args.sinks!r}") from None
    if not sinks or sinks[0] < 0:
        raise UserError(f"--sinks takes integers >= 0, got {args.sinks!r}")
    harness.positive("--chunk", args.chunk)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runs = {v: Path(args.runs) / v for v in variants}
    for v, folder in runs.items():
        if not (folder / "train_state.pt").is_file():
            raise UserError(f"--runs {args.runs}: no run folder {folder} (train it with python -m streaming_trt.cli.train "
                            f"--variant {v} --out {folder})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v, folder in runs.items():
        harness.info(f"{v}: streaming the held-out text at S = {', '.join(map(str, sinks))}")
        rows.append(evaluate(folder, sinks, args.tokens, args.chunk))
        harness.info(f"  {rows[-1]}")
        copy = out / v
        copy.mkdir(exist_ok=True)
        for name in ("log.csv", "attention_mass.csv", "loss.png", "attention_mass.png"):
            if (folder / name).is_file():
                shutil.copy(folder / name, copy / name)
    with (out / "table3.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    figure(runs, out)
    cols = [k for k in rows[0] if k.startswith("ppl_")]
    print("| model | steps | tokens | train loss (last 10) | " + " | ".join(c[4:] for c in cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['tokens_trained']:,} | {r['train_loss_last10']:.3f} | "
              + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
