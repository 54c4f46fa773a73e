"""Per-token decode latency and memory of StreamingLLM against its baselines, at several cache sizes.

Every method decodes one token at a time with a cache of C tokens (C = 256 ... 4096):

  streaming     this library: S sink tokens + a window of C - S, evicting as it goes
  recompute     sliding window with re-computation on the same model and kernels: per token, a
                fresh session re-encodes the C tokens of A(t) (the contract's baseline)
  dense         this library with a window that holds the whole text (C tokens so far)
  window        window attention: no sinks, a window of C
  hf-recompute  transformers' own model re-encoding the C tokens for every token
  hf-dense      transformers' own model with its ordinary growing cache, C tokens so far

Methods are timed in turn, token by token, at each cache size, so that background load hits them
alike; each figure is the median over the timed tokens that follow the warm-up tokens. Ratios are
to streaming at the same cache size.

Memory: on CUDA, peak = weights + the method's own cache + the most its step allocated on top
(torch.cuda.max_memory_allocated); on CPU only the key/value bytes each method keeps between
tokens are reported (activations are not counted there).
"""
from __future__ import annotations

import gc
import os
import sys

import torch

from . import baselines, harness, report
from .report import LABELS
from .harness import UserError

PAPER = {  # StreamingLLM paper, Llama-2-7B, per-token ms: (re-computation, streaming)
    256: (63.0, 31.0),
    4096: (1411.0, 65.0),
}
PAPER_HEADLINE = 22.2

EPILOG = """examples:
  python -m bench.latency                                   # built-in model, CPU, a few minutes
  python -m bench.latency --cache-sizes 256,1024 --methods streaming,recompute
  python -m bench.latency --preset llama2-7b --device cuda  # the paper's setting (bfloat16)
  python -m bench.latency --model path/to/checkpoint --device cuda
"""


def arguments(argv):
    p = harness.parser("latency", __doc__, EPILOG)
    g = p.add_argument_group("benchmark")
    g.add_argument("--cache-sizes", metavar="LIST", default="256,512,1024,2048,4096", help="cache sizes C (default: %(default)s)")
    g.add_argument("--methods", metavar="LIST",
                   help="comma-separated, from: " + ", ".join(baselines.METHODS) + " (default: all but attention-sinks, "
                        "which is added when --sinks-python is given)")
    g.add_argument("--sinks-python", metavar="PYTHON", default=os.environ.get("STREAMING_TRT_SINKS_PYTHON"),
                   help="the Python of an environment with attention_sinks 0.4.0 and transformers 4.34 (they "
                        "cannot share this one's transformers 5); runs the attention-sinks peer there, "
                        "interleaved with the others on the same weights; see python -m bench.peer_sinks "
                        "(default: $STREAMING_TRT_SINKS_PYTHON)")
    g.add_argument("--sink-tokens", type=int, metavar="N", default=4, help="S of streaming and re-computation (default: %(default)s)")
    g.add_argument("--tokens", type=int, metavar="N", help="timed tokens per point for the O(C) methods (default: 48 on CPU, 100 on CUDA)")
    g.add_argument("--slow-tokens", type=int, metavar="N",
                   help="timed tokens per point for the two re-computation methods (default: 3 on CPU, 10 on CUDA)")
    g.add_argument("--warmup", type=int, metavar="N", default=4,
                   help="untimed tokens per point before timing (re-computation methods: 1) (default: %(default)s)")
    g.add_argument("--runs", type=int, metavar="N", default=1,
                   help="repeat the interleaved measurement N times per cache size; the figure is the median of "
                        "the N per-run medians, and the table shows their range (default: %(default)s)")
    g.add_argument("--slow-budget", type=float, metavar="SECONDS", default=60.0,
                   help="seconds: a re-computation method stops timing at a cache size once its timed tokens "
                        "took this long and at least 2 were timed (default: %(default)s)")
    g.add_argument("--fill", default="random", choices=["random", "prefill"],
                   help="how the runtime's caches reach C tokens: 'random' writes random keys/values and sets "
                        "the token count (attention time does not depend on the values), 'prefill' feeds real "
                        "tokens (slow on CPU) (default: %(default)s)")
    g.add_argument("--max-chunk", type=int, metavar="N", default=512,
                   help="the runtime sessions' max_chunk (re-computation's one feed call is split in these) "
                        "(default: %(default)s)")
    return p.parse_args(argv)


def validate(args):
    cuda = harness.resolve_device(args.device).type == "cuda"
    sizes = harness.int_list(args.cache_sizes, "--cache-sizes")
    if args.methods is None:
        args.methods = ",".join(baselines.DEFAULT_METHODS + (("attention-sinks",) if args.sinks_python else ()))
    methods = harness.method_list(args.methods)
    if "attention-sinks" in methods and not args.sinks_python:
        raise UserError("--methods attention-sinks needs --sinks-python PYTHON (an environment with "
                        "attention_sinks and transformers 4.34; see python -m bench.peer_sinks)")
    harness.positive("--sink-tokens", args.sink_tokens, 0)
    for flag in ("tokens", "slow_tokens", "max_chunk", "runs"):
        harness.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    harness.positive("--warmup", args.warmup, 0)
    if args.slow_budget <= 0:
        raise UserError(f"--slow-budget must be > 0, got {args.slow_budget}")
    args.tokens = args.tokens or (100 if cuda else 48)
    args.slow_tokens = args.slow_tokens or (10 if cuda else 3)
    if any(c <= args.sink_tokens for c in sizes) and set(methods) & {"streaming", "recompute", "hf-recompute"}:
        raise UserError(f"every cache size must exceed --sink-tokens ({args.sink_tokens}), got {args.cache_sizes}")
    return sorted(set(sizes)), methods


class Point:
    """One method at one cache size: its stream, its plan, its samples."""

    def __init__(self, method: str, stream, warmup: int, timed: int, slow: bool):
        self.method, self.stream, self.warmup, self.timed, self.slow = method, stream, warmup, timed, slow
        self.samples: list[float] = []
        self.extra: list[int] = []
        self.done_warmup = 0
        self.cut = False

    @property
    def finished(self) -> bool:
        return self.cut or (self.done_warmup >= self.warmup and len(self.samples) >= self.timed)


def make_stream(method: str, capacity: int, args, built, planned: int, rng: torch.Generator):
    """The method's stream, brought to the state where its next token attends to ``capacity`` keys."""
    model, dev = built.model, built.device
    random_ids = lambda n: torch.randint(0, min(built.config.vocab_size, 100), (n,), generator=rng)  # noqa: E731
    if method in ("streaming", "window"):
        s, w = baselines.cache_shape(method, capacity, args.sink_tokens)
        stream = baselines.RuntimeStream(method, model, s, w, args.max_chunk)
        past = 2 * capacity + 3  # tokens already evicted: the steady state of an endless stream
        if args.fill == "random":
            stream.fill_random(past, seed=args.seed)
        else:
            stream.feed(random_ids(past))
    elif method == "dense":
        # the window holds every token this point will see: nothing is ever evicted
        stream = baselines.RuntimeStream(method, model, 0, capacity + planned, args.max_chunk)
        if args.fill == "random":
            stream.fill_random(capacity - 1, seed=args.seed)
        elif capacity > 1:
            stream.feed(random_ids(capacity - 1))
    elif method in ("recompute", "hf-recompute"):
        s, w = baselines.cache_shape(method, capacity, args.sink_tokens)
        if method == "recompute":
            stream = baselines.RecomputeStream(model, s, w, args.max_chunk)
        else:
            stream = baselines.HFRecomputeStream(built.hf(), s, w, dev)
        for t in random_ids(2 * capacity).tolist():
            stream.push(t)
    elif method == "hf-dense":
        stream = baselines.HFDenseStream(built.hf(), dev, args.max_chunk)
        if capacity > 1:
            stream.feed(random_ids(capacity - 1), keep_logits=False)
    elif method == "onnx":
        s, w = baselines.cache_shape("streaming", capacity, args.sink_tokens)
        stream = baselines.OnnxStream(model, s, w, threads=args.threads or None)
        stream.feed(random_ids(2 * capacity + 3))
    elif method == "attention-sinks":
        s, w = baselines.cache_shape("streaming", capacity, args.sink_tokens)
        stream = baselines.SinksPeerStream(args.sinks_python, built, s, w, fill=capacity + 3, seed=args.seed,
                                   threads=args.threads)
    else:  # pragma: no cover - method_list guards this
        raise UserError(f"unknown method {method}")
    return stream


def step(stream, token: torch.Tensor) -> None:
    if isinstance(stream, baselines.RecomputeStream):
        stream.encode(stream.push(int(token)))
    else:
        stream.feed(token)


def run(args, argv=None) -> dict:
    sizes, methods = validate(args)
    out = harness.out_dir(args, "latency")
    built = harness.build(args, need_tokenizer=False)
    cuda = built.device.type == "cuda"
    if max(sizes) > built.config.max_position_embeddings:
        harness.info(f"note: cache sizes above the model's max_position_embeddings ({built.config.max_position_embeddings}) "
               f"use positions it never saw; latency is still meaningful")
    harness.info(f"[bench.latency] {built.source}, {str(built.dtype).removeprefix('torch.')} on {built.device}; "
           f"methods {', '.join(methods)}; cache sizes {', '.join(map(str, sizes))}")
    if any(m.startswith("hf-") for m in methods):
        built.hf(strict=False)  # build and check it before timing anything
    bandwidth = harness.copy_bandwidth(built.device)
    per_token_kv = 2 * built.config.num_layers * built.config.num_kv_heads * built.config.head_dim * \
        torch.empty(0, dtype=built.dtype).element_size()
    weights_read = built.weight_bytes_read_per_token()

    def plan(method):
        slow = method in baselines.SLOW_METHODS
        return (1 if slow else args.warmup), (args.slow_tokens if slow else args.tokens), slow

    total = len(sizes) * args.runs * sum(sum(plan(m)[:2]) for m in methods)
    bar = harness.progress(total, "latency", args.no_progress)
    rng = torch.Generator().manual_seed(args.seed)
    rows = []
    for capacity in sizes:
        points = []
        for m in methods:
            warm, timed, slow = plan(m)
            bar.set_postfix_str(f"C={capacity} preparing {m}", refresh=False)
            stream = make_stream(m, capacity, args, built, (warm + timed) * args.runs, rng)
            points.append(Point(m, stream, warm, timed, slow))
        all_samples = {id(p): [] for p in points}
        run_medians = {id(p): [] for p in points}
        for _ in range(args.runs):  # each run: every method in turn, token by token (interleaved)
            for p in points:
                p.samples, p.done_warmup, p.cut = [], 0, False
            while not all(p.finished for p in points):
                for p in points:
                    if p.finished:
                        continue
                    bar.set_postfix_str(f"C={capacity} {p.method}", refresh=False)
                    token = torch.randint(0, min(built.config.vocab_size, 100), (1,), generator=rng)
                    if isinstance(p.stream, baselines.SinksPeerStream):  # the worker times its own model call
                        seconds, extra = p.stream.step(int(token)), None
                    else:
                        seconds, extra = harness.timed(lambda: step(p.stream, token), built.device)
                    if p.done_warmup < p.warmup:
                        p.done_warmup += 1
                    else:
                        p.samples.append(seconds)
                        if extra is not None:
                            p.extra.append(extra)
                    bar.update(1)
                    if p.slow and len(p.samples) >= min(2, p.timed) and sum(p.samples) >= args.slow_budget \
                            and len(p.samples) < p.timed:
                        bar.update(p.timed - len(p.samples))
                        p.cut = True
            for p in points:
                all_samples[id(p)] += p.samples
                run_medians[id(p)].append(harness.median(p.samples))
        for p in points:
            p.samples, medians = all_samples[id(p)], run_medians[id(p)]
            cache_bytes = p.stream.cache_bytes()
            decode = p.method in ("streaming", "dense", "window", "hf-dense", "attention-sinks", "onnx")
            floor = (weights_read + capacity * per_token_kv) / bandwidth if decode else float("nan")
            rows.append(dict(
                cache=capacity, method=p.method, label=LABELS[p.method],
                median_ms=1e3 * harness.median(medians), run_min_ms=1e3 * min(medians), run_max_ms=1e3 * max(medians),
                runs=len(medians), p25_ms=1e3 * harness.quantile(p.samples, 0.25),
                p75_ms=1e3 * harness.quantile(p.samples, 0.75), timed_tokens=len(p.samples), warmup_tokens=p.warmup,
                cache_bytes=cache_bytes,
                peak_bytes=(built.weight_bytes + cache_bytes + max(p.extra)) if p.extra else None,
                floor_ms=1e3 * floor,
            ))
        for p in points:
            if isinstance(p.stream, baselines.SinksPeerStream):
                p.stream.close()
        del points
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    bar.close()
    stream_ms = {r["cache"]: r["median_ms"] for r in rows if r["method"] == "streaming"}
    for r in rows:
        r["ratio_to_streaming"] = r["median_ms"] / stream_ms[r["cache"]] if r["cache"] in stream_ms else float("nan")
        r.update(device=str(built.device), dtype=str(built.dtype).removeprefix("torch."))
    fields = ["cache", "method", "median_ms", "run_min_ms", "run_max_ms", "runs", "p25_ms", "p75_ms", "ratio_to_streaming", "timed_tokens",
              "warmup_tokens", "cache_bytes", "peak_bytes", "floor_ms", "device", "dtype", "label"]
    report.write_csv(out / "latency.csv", rows, fields)
    cmd = report.command("latency", argv)
    markdown = report.write_report(out / "latency.md", "Latency", cmd, built,
                              tables(rows, sizes, methods, cuda, bandwidth, args))
    plot(rows, sizes, methods, out / "latency.png", built, cuda)
    print(markdown)
    harness.info(f"[bench.latency] wrote {out / 'latency.csv'}, {out / 'latency.png'}, {out / 'latency.md'}")
    return dict(rows=rows, out=out)


def tables(rows, sizes, methods, cuda, bandwidth, args) -> str:
    get = {(r["cache"], r["method"]): r for r in rows}
    has_stream = "streaming" in methods
    header = ["cache C"] + [f"{m} ms" + (" (x streaming)" if has_stream and m != "streaming" else "") for m in methods]
    body = []
    for c in sizes:
        cells = [str(c)]
        for m in methods:
            r = get[(c, m)]
            cell = report.ms(r["median_ms"] / 1e3)
            if has_stream and m != "streaming":
                cell += f" ({r['ratio_to_streaming']:.1f}x)"
            cells.append(cell)
        body.append(cells)
    text = ("Per-token latency, median over timed tokens"
            + (" (ratio to streaming at the same cache size)" if has_stream else "") + ":\n\n"
            + report.markdown_table(header, body))
    mem = "peak memory (weights + own cache + step's transient peak)" if cuda else \
        "key/value bytes held between tokens (CPU: activations not counted)"
    header = ["cache C"] + [m for m in methods]
    body = [[str(c)] + [report.human_bytes(get[(c, m)]["peak_bytes" if cuda else "cache_bytes"]) for m in methods]
            for c in sizes]
    text += f"\n\nMemory, {mem}:\n\n" + report.markdown_table(header, body)
    if has_stream:
        floor_rows = [[str(c), report.ms(get[(c, 'streaming')]["median_ms"] / 1e3),
                       f"{get[(c, 'streaming')]['floor_ms']:.3g}",
                       f"{get[(c, 'streaming')]['median_ms'] / get[(c, 'streaming')]['floor_ms']:.1f}x"] for c in sizes]
        text += (f"\n\nStreaming against the memory floor (weights + cache read once per token at the measured "
                 f"copy bandwidth, {bandwidth / 1e9:.1f} GB/s read+write):\n\n"
                 + report.markdown_table(["cache C", "streaming ms", "floor ms", "streaming / floor"], floor_rows))
    if has_stream and "recompute" in methods:
        big = sizes[-1]
        ratios = [get[(c, "recompute")]["ratio_to_streaming"] for c in sizes]
        growing = all(b > a for a, b in zip(ratios, ratios[1:]))
        text += (f"\n\nHeadline: re-computation / streaming = {ratios[-1]:.1f}x at cache {big} (paper, Llama-2-7B: "
                 f"{PAPER[4096][0]:.0f} / {PAPER[4096][1]:.0f} ms = {PAPER[4096][0] / PAPER[4096][1]:.1f}x at 4096, "
                 f"{PAPER_HEADLINE}x headline); streaming faster at every size: "
                 f"{'yes' if all(r > 1 for r in ratios) else 'NO'}; ratio growing with the cache: "
                 f"{'yes' if growing else 'NO'}.")
    peers = [m for m in ("hf-dense", "attention-sinks", "onnx", "recompute") if m in methods]
    if has_stream and peers:
        def rng(r):
            return f"{report.ms(r['median_ms'] / 1e3)} ({report.ms(r['run_min_ms'] / 1e3)}-{report.ms(r['run_max_ms'] / 1e3)})"

        header = ["cache C", "streaming ms (run range)"]
        for m in peers:
            target = {"hf-dense": "", "attention-sinks": " (target >= 2 at 4096)", "onnx": "",
                      "recompute": " (target >= 22.2 at 4096)"}[m]
            header += [f"{m} ms (run range)",
                       "streaming / hf-dense (target <= 1.0)" if m == "hf-dense" else f"{m} / streaming{target}"]
        body = []
        for c in sizes:
            st = get[(c, "streaming")]
            cells = [str(c), rng(st)]
            for m in peers:
                r = get[(c, m)]
                ratio = st["median_ms"] / r["median_ms"] if m == "hf-dense" else r["median_ms"] / st["median_ms"]
                cells += [rng(r), f"{ratio:.2f}x"]
            body.append(cells)
        text += (f"\n\nPeers on the same weights, per-token ratios (median of {args.runs} interleaved run"
                 f"{'s' if args.runs != 1 else ''}; each run's figure is the median over its timed tokens):\n\n"
                 + report.markdown_table(header, body))
    text += (f"\n\nTimed tokens per point: {args.tokens} (O(C) methods, after {args.warmup} warm-up tokens), "
             f"{args.slow_tokens} for re-computation (after 1 warm-up token; fewer once {args.slow_budget:g} s "
             f"were spent); runtime caches brought to C tokens by '{args.fill}' fill.")
    return text


def plot(rows, sizes, methods, path, built, cuda) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    get = {(r["cache"], r["method"]): r for r in rows}
    ax = axes[0]
    for m in methods:
        y = [get[(c, m)]["median_ms"] for c in sizes]
        lo = [get[(c, m)]["p25_ms"] for c in sizes]
        hi = [get[(c, m)]["p75_ms"] for c in sizes]
        ax.plot(sizes, y, **report.style(m))
        ax.fill_between(sizes, lo, hi, color=report.style(m)["color"], alpha=0.12, linewidth=0)
    ax.set(yscale="log", xlabel="cache size C (tokens)", ylabel="ms per token (median, band: 25-75%)",
           title="Per-token decode latency")
    report.log2_axis(ax, sizes)
    ax.legend()

    ax = axes[1]
    if "streaming" in methods:
        for m in methods:
            if m == "streaming":
                continue
            ax.plot(sizes, [get[(c, m)]["ratio_to_streaming"] for c in sizes], **report.style(m))
        ax.axhline(PAPER_HEADLINE, color="black", linewidth=0.8, linestyle="--")
        ax.text(sizes[-1], PAPER_HEADLINE * 0.85, f"paper's headline {PAPER_HEADLINE}x ", fontsize=7, ha="right",
                va="top")
        px = [c for c in sorted(PAPER) if sizes[0] <= c <= sizes[-1]]
        ax.plot(px, [PAPER[c][0] / PAPER[c][1] for c in px], color="black", marker="*", linestyle="none",
                markersize=9, label="paper, Llama-2-7B: re-computation / streaming")
        ax.axhline(1.0, color="#d62728", linewidth=0.8)
        ax.set(yscale="log", xlabel="cache size C (tokens)", ylabel="latency / streaming latency",
               title="Slow-down relative to StreamingLLM")
        report.log2_axis(ax, sizes)
        ax.legend()
    else:
        ax.set_axis_off()

    ax = axes[2]
    key = "peak_bytes" if cuda else "cache_bytes"
    for m in methods:
        y = [get[(c, m)][key] for c in sizes]
        if all(v is None or v == 0 for v in y):
            continue
        ax.plot(sizes, [(v or 0) / 2**20 for v in y], **report.style(m))
    ax.set(xlabel="cache size C (tokens)", ylabel="MiB",
           title="Peak memory (CUDA)" if cuda else "Key/value memory held between tokens")
    report.log2_axis(ax, sizes)
    ax.legend()
    report.save_figure(fig, path, report.footer(built))


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
