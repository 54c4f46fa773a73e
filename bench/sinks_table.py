"""The paper's Table 2 (how many sink tokens) and Table 6 (how large a cache) on real text.

Table 2: perplexity of StreamingLLM with S = 0, 1, 2, 4, 8 sink tokens (S = 0 is window attention)
at one cache size C (sinks included: window = C - S). Table 6: perplexity with 4 sink tokens at
caches C = 128 ... 2048. Every row is one runtime session fed the same text in chunks; a row's
perplexity is over the same scored tokens for every row of its table: the tokens from
``--score-from`` (default: the table's largest cache, so every row has started evicting) to the end.
The paper measures 400K tokens of PG19 with Llama-2/Falcon/Pythia/MPT; this is the same protocol,
smaller, with whatever model ``--model`` names.
"""
from __future__ import annotations

import math
import sys

import torch

from streaming_trt.contract import Geometry

from . import baselines, harness, report
from .harness import UserError

EPILOG = """examples:
  python -m bench.sinks_table --model smollm2 --text austen:pride --tokens 3072
  python -m bench.sinks_table --tables 2 --capacity 256 --sinks 0,1,2,4,8
"""


def arguments(argv):
    p = harness.parser("sinks_table", __doc__, EPILOG)
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", metavar="FILE", default="austen:pride",
                   help="a UTF-8 file, austen:BOOK or austen:all (bench.text) (default: %(default)s)")
    g.add_argument("--tokens", type=int, metavar="N", default=3072, help="tokens of the text (default: %(default)s)")
    g.add_argument("--tables", default="2,6", help="which tables: 2, 6 or 2,6 (default: %(default)s)")
    g.add_argument("--sinks", default="0,1,2,4,8", help="Table 2's sink counts (default: %(default)s)")
    g.add_argument("--capacity", type=int, default=256, help="Table 2's cache size C, sinks included (default: %(default)s)")
    g.add_argument("--capacities", default="128,256,512,1024,2048", help="Table 6's caches (default: %(default)s)")
    g.add_argument("--table6-sinks", type=int, default=4, help="Table 6's sink tokens (default: %(default)s)")
    g.add_argument("--score-from", type=int, metavar="T", help="score tokens T.. (default: the table's largest cache)")
    g.add_argument("--chunk", type=int, default=128, help="tokens per feed call (default: %(default)s)")
    return p.parse_args(argv)


def _sinks_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sinks takes comma-separated integers >= 0, got {text!r}") from None
    if not values or min(values) < 0:
        raise UserError(f"--sinks takes comma-separated integers >= 0, got {text!r}")
    return values


def nll(built, ids: torch.Tensor, geometry: Geometry, chunk: int, bar) -> torch.Tensor:
    """Per-token negative log-likelihood (float64 ``[n - 1]``) of ``ids [n]`` under one session."""
    stream = baselines.RuntimeStream("streaming", built.model, geometry.sink_tokens, geometry.window, max_chunk=chunk)
    return harness.stream_nll(stream, ids, chunk, bar)


def run(args, argv=None) -> dict:
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if not tables or any(t not in ("2", "6") for t in tables):
        raise UserError(f"--tables takes 2 and/or 6, got {args.tables!r}")
    sinks = _sinks_list(args.sinks)
    capacities = harness.int_list(args.capacities, "--capacities")
    for flag in ("tokens", "capacity", "chunk"):
        harness.positive("--" + flag, getattr(args, flag))
    harness.positive("--table6-sinks", args.table6_sinks, 0)
    plan = []  # (table, label value, geometry); Geometry.with_capacity refuses a capacity <= its sinks
    if "2" in tables:
        plan += [("2", s, Geometry.with_capacity(args.capacity, s)) for s in sinks]
    if "6" in tables:
        plan += [("6", c, Geometry.with_capacity(c, args.table6_sinks)) for c in capacities]
    need = max(args.capacity if "2" in tables else 0, max(capacities) if "6" in tables else 0)
    score_from = args.score_from if args.score_from is not None else need
    if args.tokens <= score_from + 1:
        raise UserError(f"--tokens {args.tokens} must exceed the first scored token ({score_from}) + 1")
    out = harness.out_dir(args, "sinks_table")
    built = harness.build(args)
    ids, text_name = harness.load_text_ids(args.text, built.tokenizer, args.tokens)
    ids = ids.clamp(max=built.config.vocab_size - 1)
    harness.info(f"[bench.sinks_table] {built.source}; {ids.shape[0]} tokens of {text_name}; {len(plan)} sessions; "
           f"scored tokens {score_from}..{ids.shape[0] - 1}")
    bar = harness.progress(len(plan) * (ids.shape[0] - 1), "sinks_table", args.no_progress)
    rows = []
    for table, value, g in plan:
        bar.set_postfix_str(f"table {table}: S={g.sink_tokens} C={g.capacity}", refresh=False)
        v = nll(built, ids, g, args.chunk, bar)
        scored = v[score_from:]
        rows.append(dict(table=table, sink_tokens=g.sink_tokens, capacity=g.capacity, window=g.window,
                         tokens_scored=scored.numel(),
                         ppl=math.exp(float(scored.mean()))))
    bar.close()
    report.write_csv(out / "sinks_table.csv", rows)
    body = []
    if "2" in tables:
        t2 = [r for r in rows if r["table"] == "2"]
        body.append(f"Table 2 (sink tokens, cache {args.capacity} sinks included; "
                    f"perplexity of tokens {score_from}..{ids.shape[0] - 1}):\n\n"
                    + report.markdown_table(["sink tokens S", "window", "perplexity"],
                                       [[r["sink_tokens"], r["window"], f"{r['ppl']:.2f}"] for r in t2]))
    if "6" in tables:
        t6 = [r for r in rows if r["table"] == "6"]
        body.append(f"Table 6 ({args.table6_sinks} sink tokens; perplexity of tokens "
                    f"{score_from}..{ids.shape[0] - 1}):\n\n"
                    + report.markdown_table(["cache C", "perplexity"], [[r["capacity"], f"{r['ppl']:.2f}"] for r in t6]))
    body.append(f"Text: {text_name}.")
    markdown = report.write_report(out / "sinks_table.md", "Sink tokens and cache size (paper Tables 2 and 6)",
                              report.command("sinks_table", argv), built, "\n\n".join(body))
    plot(rows, tables, out / "sinks_table.png", built)
    print(markdown)
    harness.info(f"[bench.sinks_table] wrote {out / 'sinks_table.csv'}, {out / 'sinks_table.md'}, {out / 'sinks_table.png'}")
    return dict(rows=rows, out=out)


def plot(rows, tables, path, built) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.6), squeeze=False)
    for ax, table in zip(axes[0], tables):
        rs = [r for r in rows if r["table"] == table]
        if table == "2":
            ax.bar([str(r["sink_tokens"]) for r in rs], [r["ppl"] for r in rs], color="#d62728")
            ax.set(xlabel="sink tokens S", ylabel="perplexity", title=f"Table 2: cache {rs[0]['capacity']}")
        else:
            ax.plot([r["capacity"] for r in rs], [r["ppl"] for r in rs], **report.style("streaming"))
            report.log2_axis(ax, [r["capacity"] for r in rs])
            ax.set(xlabel="cache size C", ylabel="perplexity", title=f"Table 6: {rs[0]['sink_tokens']} sink tokens")
    report.save_figure(fig, path, report.footer(built))


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
