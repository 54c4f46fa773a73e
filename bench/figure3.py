"""The paper's Figure 3 in small: perplexity along one long text for dense attention, window
attention, sliding window with re-computation and StreamingLLM, one panel per cache size.

It draws what ``bench.long_ppl`` runs wrote (their ``long_ppl.csv``: per scored token its NLL), so
each method can be run on its own, in parallel or at another time, on the same model and text:

  python -m bench.long_ppl --model smollm2 --text austen:pride --tokens 5000 --cache 256 \\
      --methods streaming,window,recompute --recompute-stride 250 --check-tokens 0 --out runs/ppl256
  python -m bench.long_ppl --model smollm2 --text austen:pride --tokens 5000 --cache 1024 \\
      --methods streaming,window,recompute --recompute-stride 1000 --check-tokens 0 --out runs/ppl1024
  python -m bench.long_ppl --model smollm2 --text austen:pride --tokens 6000 --methods dense \\
      --check-tokens 0 --out runs/dense        # dense does not depend on the cache size
  python -m bench.figure3 --run 256=runs/ppl256 --run 1024=runs/ppl1024 --dense runs/dense

Per panel: the running perplexity (exp of the mean NLL of tokens 1..t) and the local perplexity
(exp of the mean NLL over the last ``--local`` tokens; re-computation, scored on a strided subset
of tokens because it costs O(C^2) per token, shows its scored points). The table gives each
method's perplexity over the tokens after the cache is full, on the tokens every method scored.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from . import report
from .harness import UserError, out_dir, run_main


def arguments(argv):
    p = argparse.ArgumentParser(prog="python -m bench.figure3", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", metavar="C=DIR", required=True,
                   help="a bench.long_ppl output folder and its cache size (repeat per cache)")
    p.add_argument("--dense", metavar="DIR", help="a bench.long_ppl folder with the dense method (drawn in every panel)")
    p.add_argument("--local", type=int, default=256, help="tokens of the local perplexity window (default: %(default)s)")
    p.add_argument("--title", default="", help="text added to the figure's title (model, text)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/figure3/)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; nothing long runs here")
    return p.parse_args(argv)


def read(folder: str) -> dict[str, tuple[list[int], list[float]]]:
    path = Path(folder) / "long_ppl.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); run bench.long_ppl --out {folder} first") from None
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        t, v = out.setdefault(r["method"], ([], []))
        t.append(int(r["token"]))
        v.append(float(r["nll"]))
    return out


def run(args, argv=None) -> int:
    panels = []
    for spec in args.run:
        cap, _, folder = spec.partition("=")
        if not cap.isdigit() or not folder:
            raise UserError(f"--run takes C=DIR, got {spec!r}")
        panels.append((int(cap), read(folder)))
    dense = read(args.dense).get("dense") if args.dense else None
    if args.dense and dense is None:
        raise UserError(f"--dense {args.dense}: its long_ppl.csv has no dense method")
    out = out_dir(args, "figure3")
    rows, body = [], []
    for cap, methods in panels:
        if dense:
            methods = dict(methods, dense=dense)
        # the tokens every method scored, after the cache is full
        common = None
        for t, _ in methods.values():
            s = {x for x in t if x > cap}
            common = s if common is None else common & s
        for m, (t, v) in methods.items():
            pick = [nll for x, nll in zip(t, v) if x in common]
            rows.append(dict(cache=cap, method=m, tokens_scored=len(pick), ppl=math.exp(sum(pick) / len(pick)) if pick else float("nan"),
                             last_token=max(t)))
        common_n = len(common or ())
        body.append(f"Cache {cap}: perplexity on the {common_n} tokens after token {cap} that every method scored "
                    f"(up to token {max(common) if common else '-'}):\n\n"
                    + report.markdown_table(["method", "perplexity"], [[report.LABELS.get(r["method"], r["method"]), f"{r['ppl']:.2f}"]
                                                                  for r in rows if r["cache"] == cap]))
    report.write_csv(out / "figure3.csv", rows)
    plot(panels, dense, args, out / "figure3.png")
    text = (f"### Figure 3 in small\n\n`{report.command('figure3', argv)}`\n\n- date: {report.today()}\n\n" + "\n\n".join(body) + "\n")
    (out / "figure3.md").write_text(text)
    print(text)
    return 0


def plot(panels, dense, args, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 7), squeeze=False)
    for i, (cap, methods) in enumerate(panels):
        if dense:
            methods = dict(methods, dense=dense)
        for m in ("dense", "window", "recompute", "streaming"):
            if m not in methods:
                continue
            t, v = methods[m]
            run_ppl, total = [], 0.0
            for k, x in enumerate(v):
                total += x
                run_ppl.append(math.exp(total / (k + 1)))
            st = report.style(m)
            marker = st.pop("marker")
            sparse = len(t) < 200
            axes[0][i].plot(t, run_ppl, marker=marker if sparse else None, markersize=3, **st)
            if sparse:  # strided re-computation: each scored point
                axes[1][i].plot(t, [math.exp(x) for x in v], marker=marker, markersize=3, linewidth=0.8, **st)
            else:
                w = args.local
                loc, acc = [], 0.0
                for k, x in enumerate(v):
                    acc += x - (v[k - w] if k >= w else 0.0)
                    loc.append(math.exp(acc / min(k + 1, w)))
                axes[1][i].plot(t, loc, **st)
        for row, what in ((0, "running perplexity"), (1, f"local perplexity (last {args.local} tokens)")):
            ax = axes[row][i]
            ax.axvline(cap, color="#555555", linestyle=":", linewidth=0.8)
            ax.set(yscale="log", xlabel="token of the text", ylabel=what, title=f"cache {cap} {args.title}".strip())
        axes[0][i].legend()
    report.save_figure(fig, path, "running perplexity and local perplexity; re-computation scored on a strided subset")


def main(argv=None) -> int:
    return run_main(lambda: run(arguments(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
