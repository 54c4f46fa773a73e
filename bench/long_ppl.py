"""Perplexity over one long text for StreamingLLM, re-computation, dense and window attention.

The protocol of the paper's PG19 evaluation: the text is one stream; every token's negative
log-likelihood is taken from the logits of the token before it, and the running perplexity
exp(mean NLL so far) is plotted against the tokens read.

  streaming     this library, S sink tokens + a window (capacity --cache)
  recompute     sliding window with re-computation: each scored token's A(t) re-encoded from scratch
                by the runtime (every --recompute-stride-th token once the cache is full; all tokens
                before that come from one causal pass, which is what re-encoding gives there)
  dense         this library with a window holding the whole text
  window        window attention, no sinks, a window of --cache
  hf-recompute  transformers' own model re-encoding A(t) (same tokens as recompute)
  hf-dense      transformers' own model with its growing cache

Chunked feeding is what makes this quick: the contract says feeding a stream in chunks gives the
same logits as token by token. Before relying on it, the script feeds a prefix longer than the
cache both ways for every chunk-fed method of the runtime and stops (exit 1) if they differ; it
also checks that transformers' references compute the same function as their runtime twins.

With more than one layer, re-computation is NOT the same function as the streaming cache (its
window's deeper-layer keys are re-derived from the truncated context), so it is its own line.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

from streaming_trt.contract import Geometry

from . import baselines, harness, report
from .report import LABELS
from .harness import CheckFailed, UserError

EPILOG = """examples:
  python -m bench.long_ppl                                  # built-in model and text, CPU, a few minutes
  python -m bench.long_ppl --text book.txt --tokens 20000 --cache 1024 --methods streaming,window,dense
  python -m bench.long_ppl --model path/to/Llama-2-7b-hf --device cuda --text pg19-book.txt --tokens 65536
"""

CHUNKED = ("streaming", "window", "dense", "hf-dense")


def arguments(argv):
    p = harness.parser("long_ppl", __doc__, EPILOG)
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the built-in text, bench/data/builtin_text.txt)")
    g.add_argument("--tokens", type=int, metavar="N", help="tokens of the text to read (default: 5000 on CPU, 20000 on CUDA)")
    g.add_argument("--cache", type=int, metavar="N", help="cache size C of streaming, window and re-computation "
                                             "(default: 256 on CPU, 1024 on CUDA)")
    g.add_argument("--sink-tokens", type=int, metavar="N", default=4, help="S of streaming and re-computation (default: %(default)s)")
    g.add_argument("--methods", metavar="LIST", default=",".join(baselines.DEFAULT_METHODS), help="comma-separated, from: " + ", ".join(baselines.DEFAULT_METHODS))
    g.add_argument("--chunk", type=int, metavar="N", default=128,
                   help="tokens per feed call of streaming, window, dense and hf-dense (1: token by token) "
                        "(default: %(default)s)")
    g.add_argument("--recompute-stride", type=int, metavar="N", default=4,
                   help="re-computation methods score every K-th token once the cache is full (1: every token) "
                        "(default: %(default)s)")
    g.add_argument("--check-tokens", type=int, metavar="N",
                   help="prefix fed token by token to check chunked feeding (default: C + chunk + 17; must exceed C; "
                        "0 skips the check, e.g. for a real model on a busy CPU: tests/test_real_model.py checks "
                        "chunked = token by token on the real model)")
    g.add_argument("--recall", choices=("bounds", "representative"), default=None,
                   help="also run StreamingLLM + recall of evicted tokens (streaming_trt.Recall with this scorer, "
                        "its default blocks) at the same cache, as the method `recall`")
    g.add_argument("--recall-positions", choices=("rank", "fixed"), default="rank",
                   help="recall's position rule: the contract's ranks or InfLLM's one distance (default: %(default)s)")
    return p.parse_args(argv)


def validate(args):
    cuda = harness.resolve_device(args.device).type == "cuda"
    methods = harness.method_list(args.methods, baselines.DEFAULT_METHODS)
    args.tokens = (20000 if cuda else 5000) if args.tokens is None else args.tokens
    args.cache = args.cache or (1024 if cuda else 256)
    for flag in ("tokens", "cache", "chunk", "recompute_stride"):
        harness.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    harness.positive("--sink-tokens", args.sink_tokens, 0)
    harness.positive("--tokens", args.tokens, 2)
    Geometry.with_capacity(args.cache, args.sink_tokens)  # --cache must exceed --sink-tokens
    if args.check_tokens is None:
        args.check_tokens = min(args.tokens, args.cache + args.chunk + 17)
    elif args.check_tokens == 0:
        pass  # no chunking check (slow models on a busy CPU); the report says so
    elif args.check_tokens <= min(args.cache, args.tokens - 1):
        raise UserError(f"--check-tokens ({args.check_tokens}) must exceed the cache size ({args.cache}) so that "
                        f"the check sees tokens evicted")
    args.check_tokens = min(args.check_tokens, args.tokens)
    if getattr(args, "recall", None) and "recall" not in methods:
        methods.append("recall")
    return methods


def chunked_stream(method: str, built, args, n_tokens: int):
    """A fresh stream of a chunk-fed method."""
    if method == "recall":  # chunks of at most Recall.chunk: each selects its own blocks
        from streaming_trt.runtime.recall import Recall

        s, w = baselines.cache_shape("streaming", args.cache, args.sink_tokens)
        return baselines.RuntimeStream("recall", built.model, s, w, args.chunk, recall=Recall(scorer=args.recall, positions=args.recall_positions))
    if method == "hf-dense":
        return baselines.HFDenseStream(built.hf(), built.device, args.chunk)
    if method == "dense":
        return baselines.RuntimeStream("dense", built.model, 0, max(n_tokens, 1), args.chunk)
    s, w = baselines.cache_shape(method, args.cache, args.sink_tokens)
    return baselines.RuntimeStream(method, built.model, s, w, args.chunk)


def feed_all(stream, ids: torch.Tensor, chunk: int, bar=None) -> torch.Tensor:
    """Logits [n, vocab] (on the CPU, float32) of every token of ``ids``, fed ``chunk`` at a time."""
    out = []
    for lo in range(0, ids.shape[0], chunk):
        out.append(stream.feed(ids[lo : lo + chunk]).float().cpu())
        if bar is not None:
            bar.update(min(chunk, ids.shape[0] - lo))
    return torch.cat(out)


def check_chunking(make_stream, ids: torch.Tensor, chunk: int, tol: float, name: str, bar=None) -> float:
    """Feed ``ids`` token by token and in chunks of ``chunk`` to two fresh streams; raise
    CheckFailed if the logits differ. Returns the error found (relative to the largest logit)."""
    one = feed_all(make_stream(), ids, 1, bar)
    many = feed_all(make_stream(), ids, chunk)
    err = harness.max_rel_error(many, one)
    if not err <= tol:
        bad = ((many - one).abs().amax(-1) > tol * max(one.abs().max().item(), 1.0)).nonzero()
        first = int(bad[0]) if len(bad) else -1
        raise CheckFailed(
            f"{name}: feeding {ids.shape[0]} tokens in chunks of {chunk} gives other logits than token by token "
            f"(relative error {err:.3g} > {tol:g}, first at token {first}); chunked feeding cannot be trusted, so no "
            f"perplexity is reported (use --chunk 1 to evaluate token by token)")
    return err


def recompute_scores(method: str, built, args, ids: torch.Tensor, bar=None) -> tuple[list[int], list[float]]:
    """NLLs of re-computation at the tokens it scores: all t < C from one causal pass (A(t) is the
    whole prefix there), then every stride-th t with A(t) re-encoded from scratch."""
    n, cap = ids.shape[0], args.cache
    s, w = baselines.cache_shape(method, cap, args.sink_tokens)
    if method == "recompute":
        stream = baselines.RecomputeStream(built.model, s, w, max_chunk=max(cap, 1))
        first = lambda x: stream.session.feed(x.view(1, -1).to(built.device))[0]  # noqa: E731
    else:
        stream = baselines.HFRecomputeStream(built.hf(), s, w, built.device)
        hf = built.hf()

        def first(x):
            with torch.inference_mode():
                return hf(input_ids=x.view(1, -1).to(built.device), use_cache=False).logits[0].float()

    head = min(cap, n - 1)
    logits = first(ids[:head]).float().cpu()
    tokens = list(range(head))
    nll = harness.nll_of(logits, ids[1 : head + 1]).tolist()
    if bar is not None:
        bar.update(head)
    ids_list = ids.tolist()
    for t in range(cap, n - 1, args.recompute_stride):
        window = ids_list[:s] + ids_list[max(s, t - w + 1) : t + 1]
        logit = stream.encode(window).float().cpu()
        nll.append(harness.nll_of(logit.view(1, -1), ids[t + 1 : t + 2]).item())
        tokens.append(t)
        if bar is not None:
            bar.update(1)
    return tokens, nll


def scored_count(method: str, args) -> int:
    n = args.tokens - 1
    if method in baselines.SLOW_METHODS:
        head = min(args.cache, n)
        return head + len(range(args.cache, args.tokens - 1, args.recompute_stride))
    return n


def run(args, argv=None, methods_override: dict | None = None) -> dict:
    """``methods_override``: name -> callable returning a fresh stream, replacing a chunk-fed
    method (tests use it to hand the check a broken method)."""
    methods = validate(args)
    out = harness.out_dir(args, "long_ppl")
    built = harness.build(args)
    ids, text_name = harness.load_text_ids(args.text, built.tokenizer, args.tokens)
    ids = ids.clamp(max=built.config.vocab_size - 1)
    n = ids.shape[0]
    tol = harness.tolerance(built.dtype)
    harness.info(f"[bench.long_ppl] {built.source}, {str(built.dtype).removeprefix('torch.')} on {built.device}; "
           f"{n} tokens of {text_name}; cache {args.cache} (S={args.sink_tokens}); methods {', '.join(methods)}")
    if built.random_weights:
        harness.info("[bench.long_ppl] note: random weights, so these perplexities only exercise the pipeline")
    if n > built.config.max_position_embeddings and "dense" in methods:
        harness.info(f"[bench.long_ppl] note: dense attention goes past the model's max_position_embeddings "
               f"({built.config.max_position_embeddings}) after that many tokens")
    overrides = methods_override or {}

    def maker(m, length):
        return overrides[m] if m in overrides else (lambda: chunked_stream(m, built, args, length))

    # 1. the chunking claim, checked on a prefix longer than the cache
    checks = {}
    prefix = ids[: args.check_tokens]
    to_check = [m for m in methods if m in ("streaming", "window", "dense")] if args.chunk > 1 and args.check_tokens else []
    total = len(to_check) * prefix.shape[0] + sum(scored_count(m, args) for m in methods)
    bar = harness.progress(total, "long_ppl", args.no_progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="capacity sink_tokens")
        for m in to_check:
            bar.set_description(f"check {m}")
            checks[m] = check_chunking(maker(m, n), prefix, args.chunk, tol, f"{m} ({LABELS[m]})", bar)
        # transformers' references must compute their runtime twins' functions
        if "hf-dense" in methods and "dense" in methods:
            a = feed_all(maker("dense", n)(), prefix, args.chunk)
            b = feed_all(baselines.HFDenseStream(built.hf(), built.device, args.chunk), prefix, args.chunk)
            checks["hf-dense"] = harness.assert_close(a, b, tol, "hf-dense against dense on the check prefix")
        if "hf-recompute" in methods and "recompute" in methods and n - 1 > args.cache:
            s, w = baselines.cache_shape("recompute", args.cache, args.sink_tokens)
            t = n - 2
            window = ids[:s].tolist() + ids[max(s, t - w + 1) : t + 1].tolist()
            a = baselines.RecomputeStream(built.model, s, w, max_chunk=args.cache).encode(window)
            b = baselines.HFRecomputeStream(built.hf(), s, w, built.device).encode(window)
            checks["hf-recompute"] = harness.assert_close(a.view(1, -1), b.view(1, -1), tol,
                                                    "hf-recompute against recompute on one window")

        # 2. the evaluation
        scores: dict[str, tuple[list[int], list[float]]] = {}
        for m in methods:
            bar.set_description(m)
            if m in baselines.SLOW_METHODS:
                scores[m] = recompute_scores(m, built, args, ids, bar)
            else:
                scores[m] = (list(range(n - 1)), harness.stream_nll(maker(m, n)(), ids, args.chunk, bar).tolist())
            if not all(math.isfinite(v) for v in scores[m][1]):
                raise CheckFailed(f"{m}: a NaN or infinite log-likelihood appeared")
    bar.close()

    rows, summary = [], []
    for m in methods:
        tokens, nll = scores[m]
        total_nll = 0.0
        for i, (t, v) in enumerate(zip(tokens, nll)):
            total_nll += v
            rows.append(dict(method=m, token=t + 1, nll=v, running_ppl=math.exp(total_nll / (i + 1))))
        summary.append(summarize(m, tokens, nll, args, checks.get(m)))
    report.write_csv(out / "long_ppl.csv", rows, ["method", "token", "nll", "running_ppl"])
    report.write_csv(out / "long_ppl_summary.csv", summary,
                ["method", "tokens_scored", "ppl", "ppl_before_eviction", "ppl_after_eviction", "ppl_last_1000",
                 "check_error"])
    cmd = report.command("long_ppl", argv)
    body = report_body(summary, args, built, text_name, n, checks)
    markdown = report.write_report(out / "long_ppl.md", "Long-text perplexity", cmd, built, body)
    plot(scores, methods, args, built, n, text_name, out / "long_ppl.png")
    print(markdown)
    harness.info(f"[bench.long_ppl] wrote {out / 'long_ppl.csv'}, {out / 'long_ppl_summary.csv'}, {out / 'long_ppl.png'}, "
           f"{out / 'long_ppl.md'}")
    return dict(summary=summary, checks=checks, out=out, scores=scores)


def _ppl(values) -> float:
    values = list(values)
    return math.exp(sum(values) / len(values)) if values else float("nan")


def summarize(m, tokens, nll, args, check) -> dict:
    pairs = list(zip(tokens, nll))
    last = pairs[-1][0] if pairs else 0
    return dict(
        method=m, tokens_scored=len(pairs), ppl=_ppl(nll),
        ppl_before_eviction=_ppl(v for t, v in pairs if t < args.cache),
        ppl_after_eviction=_ppl(v for t, v in pairs if t >= args.cache),
        ppl_last_1000=_ppl(v for t, v in pairs if t > last - 1000),
        check_error=check,
    )


def report_body(summary, args, built, text_name, n, checks) -> str:
    def f(v):
        return "-" if v is None or v != v else f"{v:.2f}"

    header = ["method", "tokens scored", "perplexity", f"tokens < {args.cache}", f"tokens >= {args.cache}", "last 1000"]
    rows = [[f"{LABELS[r['method']]} (`{r['method']}`)", r["tokens_scored"], f(r["ppl"]), f(r["ppl_before_eviction"]),
             f(r["ppl_after_eviction"]), f(r["ppl_last_1000"])] for r in summary]
    text = (f"{n} tokens of {text_name}; cache {args.cache} tokens (streaming: {args.sink_tokens} sinks + "
            f"{args.cache - args.sink_tokens}; window: 0 + {args.cache}; dense: all); fed in chunks of {args.chunk}"
            + (f"; re-computation scores every {args.recompute_stride}th token once the cache is full"
               if any(m in baselines.SLOW_METHODS for m in (r["method"] for r in summary)) else "") + ".\n\n"
            + report.markdown_table(header, rows))
    if checks:
        lines = [f"- {m}: max relative logit difference {v:.2g}" for m, v in checks.items()]
        text += (f"\n\nSelf-checks passed (tolerance {harness.tolerance(built.dtype):g}): chunked (size {args.chunk}) against "
                 f"token-by-token feeding on the first {args.check_tokens} tokens for the runtime's chunk-fed methods, "
                 f"and transformers' references against their runtime twins:\n" + "\n".join(lines))
    if args.chunk == 1:
        text += "\n\nFed token by token (--chunk 1): no chunked feeding to check."
    if built.random_weights:
        text += ("\n\n**The model has random weights: these perplexities only show that the pipeline runs; they say "
                 "nothing about how well any method models text.**")
    if built.config.num_layers > 1:
        text += ("\n\nRe-computation differs from streaming once tokens are evicted: with "
                 f"{built.config.num_layers} layers it re-derives the window's deeper-layer keys from the truncated "
                 "context, so it is a different function (the contract's equality holds for one layer only).")
    return text


def plot(scores, methods, args, built, n, text_name, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    smooth = max(32, n // 40)
    skip = min(64, n // 4)  # the running mean of the first few tokens swings too widely to share an axis
    lows, highs = [], []
    # transformers' twins compute the same functions: drawn last, dotted, over their runtime twins
    for m in sorted(methods, key=lambda m: m.startswith("hf-")):
        tokens, nll = scores[m]
        x = [t + 1 for t in tokens]
        run, total = [], 0.0
        for i, v in enumerate(nll):
            total += v
            run.append(math.exp(total / (i + 1)))
        st = report.style(m)
        st.pop("marker")
        hf = m.startswith("hf-")
        if hf:
            st["label"] += " (same function as its twin)"
        axes[0].plot(x, run, linewidth=1.6 if hf else 1.3, **st)
        tail = [v for t, v in zip(x, run) if t > skip]
        if tail:
            lows.append(min(tail))
            highs.append(max(tail))
        # moving average of NLL over the last `span` tokens of the text (strided methods: wider,
        # so that each point averages as many scored tokens)
        span = smooth * (args.recompute_stride if m in baselines.SLOW_METHODS else 1)
        avg_x, avg_y, window, acc, lo = [], [], [], 0.0, 0
        for t, v in zip(x, nll):
            window.append((t, v))
            acc += v
            while window[lo][0] <= t - span:
                acc -= window[lo][1]
                lo += 1
            avg_x.append(t)
            avg_y.append(acc / (len(window) - lo))
        axes[1].plot(avg_x, avg_y, linewidth=1.2 if hf else 0.9, alpha=0.9, **st)
    for ax in axes:
        ax.axvline(args.cache, color="black", linewidth=0.7, linestyle="--")
        ax.text(args.cache, 1.0, f" cache full ({args.cache})", transform=ax.get_xaxis_transform(), fontsize=7,
                va="top")
        mpe = built.config.max_position_embeddings
        if mpe < n:
            ax.axvline(mpe, color="#7f7f7f", linewidth=0.7, linestyle=":")
            ax.text(mpe, 1.0, f" model's max\n positions ({mpe})", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", color="#555555")
        ax.set_xlabel("tokens read")
    axes[0].set(ylabel="running perplexity", title="Running perplexity, exp(mean NLL so far)")
    if lows:
        pad = 0.08 * (max(highs) - min(lows)) + 1e-6
        axes[0].set_ylim(min(lows) - pad, max(highs) + pad)
    axes[1].set(ylabel=f"mean NLL over the last {smooth} tokens", title="Local negative log-likelihood")
    axes[0].legend()
    note = "RANDOM WEIGHTS: exercises the pipeline only. " if built.random_weights else ""
    if built.config.num_layers > 1 and any(m in methods for m in baselines.SLOW_METHODS):
        note += "Re-computation is a different function from streaming for >1 layer (see RESULTS.md). "
    report.save_figure(fig, path, report.footer(built, f"{note}{n} tokens of {text_name}; "))


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
