"""The paper's Figure 2 on a real model: where attention goes, layer by layer (attention sinks).

One forward pass of transformers' own model, built on the very tensors the runtime uses (a
``.gguf`` is dequantized by the runtime's loader), with eager attention and
``output_attentions=True``. For every layer it reports the share of attention that *late* queries
(the last ``--late`` positions of the ``--tokens``-token text) put on token 0 and on the first 4
tokens, averaged over heads and queries, next to what uniform attention would put there
(``1 / (q + 1)`` per key). A layer whose share on token 0 is far above uniform has an attention
sink. Heatmaps: the attention matrix of the first ``--heatmap-tokens`` tokens for a few layers,
averaged over heads and for one head (log colour scale, as the paper's figure).
"""
from __future__ import annotations

import sys

import torch

from . import harness, report
from .harness import UserError

EPILOG = """examples:
  python -m bench.attention_map --model smollm2                  # SmolLM2-135M-Instruct, Pride and Prejudice
  python -m bench.attention_map --model smollm2 --tokens 1024 --layers-shown 0,1,2,14,29
"""


def arguments(argv):
    p = harness.parser("attention_map", __doc__, EPILOG)
    g = p.add_argument_group("attention")
    g.add_argument("--text", metavar="FILE", default="austen:pride",
                   help="a UTF-8 file, austen:BOOK or austen:all (bench.text) (default: %(default)s)")
    g.add_argument("--tokens", type=int, metavar="N", default=512, help="length of the input (default: %(default)s)")
    g.add_argument("--late", type=int, metavar="N", default=128, help="late queries: the last N positions (default: %(default)s)")
    g.add_argument("--skip", type=int, metavar="N", default=2000,
                   help="start the input N tokens into the text (past the title page) (default: %(default)s)")
    g.add_argument("--layers-shown", metavar="LIST", help="layers for heatmaps (default: first 2, middle, last)")
    g.add_argument("--head", type=int, metavar="H", default=0, help="the one head shown in the heatmaps (default: %(default)s)")
    g.add_argument("--heatmap-tokens", type=int, metavar="N", default=24, help="heatmap size (default: %(default)s)")
    return p.parse_args(argv)


def run(args, argv=None) -> dict:
    for flag in ("tokens", "late", "heatmap_tokens"):
        harness.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    harness.positive("--skip", args.skip, 0)
    if args.late >= args.tokens or args.heatmap_tokens > args.tokens:
        raise UserError("--late and --heatmap-tokens must be smaller than --tokens")
    out = harness.out_dir(args, "attention_map")
    built = harness.build(args)
    cfg = built.config
    if not 0 <= args.head < cfg.num_heads:
        raise UserError(f"--head must be in 0..{cfg.num_heads - 1}")
    shown = (harness.int_list(args.layers_shown, "--layers-shown") if args.layers_shown else
             sorted({0, 1, cfg.num_layers // 2, cfg.num_layers - 1}))
    if max(shown) >= cfg.num_layers:
        raise UserError(f"--layers-shown: the model has layers 0..{cfg.num_layers - 1}")
    ids, text_name = harness.load_text_ids(args.text, built.tokenizer, args.skip + args.tokens)
    ids = ids[-args.tokens:].clamp(max=cfg.vocab_size - 1)
    hf = built.hf()  # checked against the runtime on a short input
    hf.set_attn_implementation("eager")
    bar = harness.progress(cfg.num_layers, "attention_map", args.no_progress, unit="layer")
    n, late = args.tokens, args.late
    q = torch.arange(n - late, n, dtype=torch.float64)
    uniform0 = float((1.0 / (q + 1)).mean())
    uniform4 = float((torch.clamp(4.0 / (q + 1), max=1.0)).mean())
    rows, maps = [], {}
    with torch.inference_mode():
        att = hf(input_ids=ids.view(1, -1).to(built.device), output_attentions=True).attentions
    for layer, a in enumerate(att):  # a: [1, heads, n, n] float
        a = a[0].double().cpu()
        lq = a[:, n - late :, :]  # [heads, late, n]
        per_head0 = lq[:, :, 0].mean(-1)
        rows.append(dict(layer=layer, share_token0=float(per_head0.mean()),
                         share_first4=float(lq[:, :, :4].sum(-1).mean()),
                         max_head_share_token0=float(per_head0.max()), uniform_token0=uniform0,
                         uniform_first4=uniform4))
        if layer in shown:
            k = args.heatmap_tokens
            maps[layer] = (a[:, :k, :k].mean(0), a[args.head, :k, :k])
        bar.update(1)
    bar.close()
    report.write_csv(out / "attention_map.csv", rows)
    sink_layers = [r["layer"] for r in rows if r["share_token0"] > 10 * uniform0]
    table = report.markdown_table(
        ["layer", "share on token 0", "share on tokens 0-3", "most sink-like head on token 0"],
        [[r["layer"], f"{r['share_token0']:.3f}", f"{r['share_first4']:.3f}", f"{r['max_head_share_token0']:.3f}"]
         for r in rows])
    body = (f"{n} tokens of {text_name} (from token {args.skip}); late queries: the last {late} positions; "
            f"uniform attention would put {uniform0:.4f} on token 0 and {uniform4:.4f} on tokens 0-3.\n\n"
            f"Layers with more than 10x the uniform share on token 0: {len(sink_layers)} of {cfg.num_layers} "
            f"({', '.join(map(str, sink_layers)) or 'none'}); mean over layers: "
            f"{sum(r['share_token0'] for r in rows) / len(rows):.3f} on token 0, "
            f"{sum(r['share_first4'] for r in rows) / len(rows):.3f} on tokens 0-3.\n\n{table}")
    markdown = report.write_report(out / "attention_map.md", "Attention sinks (paper Figure 2)",
                              report.command("attention_map", argv), built, body)
    plot(rows, maps, args, built, out / "attention_map.png", uniform0, uniform4)
    print(markdown)
    harness.info(f"[bench.attention_map] wrote {out / 'attention_map.csv'}, {out / 'attention_map.md'}, "
           f"{out / 'attention_map.png'}")
    return dict(rows=rows, out=out)


def plot(rows, maps, args, built, path, uniform0, uniform4) -> None:
    from matplotlib.colors import LogNorm

    plt = report.pyplot()
    cols = len(maps)
    fig = plt.figure(figsize=(max(10, 2.6 * cols), 8.2))
    grid = fig.add_gridspec(3, cols, height_ratios=[1.2, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["share_token0"] for r in rows], color="#d62728", marker="o", label="token 0")
    ax.plot(layers, [r["share_first4"] for r in rows], color="#1f77b4", marker="s", label="tokens 0-3")
    ax.axhline(uniform0, color="#d62728", linestyle=":", label="uniform, token 0")
    ax.axhline(uniform4, color="#1f77b4", linestyle=":", label="uniform, tokens 0-3")
    ax.set(xlabel="layer", ylabel="share of attention", ylim=(0, 1),
           title=f"Share of the last {args.late} queries' attention on the first tokens ({args.tokens}-token input)")
    ax.legend(ncol=4)
    for i, (layer, (mean, head)) in enumerate(sorted(maps.items())):
        for row, (m, what) in enumerate(((mean, "mean of heads"), (head, f"head {args.head}"))):
            a = fig.add_subplot(grid[row + 1, i])
            a.imshow(m.clamp(min=1e-4).numpy(), cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1))
            a.set_title(f"layer {layer}, {what}", fontsize=8)
            a.set_xlabel("key", fontsize=7)
            a.set_ylabel("query", fontsize=7)
            a.grid(False)
    report.save_figure(fig, path, report.footer(built))


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
