"""One endless stream through a StreamingLLM session: latency and memory sampled along the way.

The stream reads a text (the built-in one by default, cycled) token by token through the decode
path, as generation does. At --samples points it records the per-token latency of the interval
(median, 10th and 90th percentile), the key/value cache bytes, the process memory (CUDA:
allocated and peak allocated bytes; CPU: resident set size) and the mean negative log-likelihood
of the text over the interval.

It fails loudly (exit 1, after writing what it measured) when:
  - a NaN or infinite logit appears, or
  - memory grows: the cache changes size, or process memory rises more than --mem-tolerance above
    its baseline: the highest level among the first samples after --settle tokens (a tenth of them,
    at least 3), so that the allocator's wobble around each chunk's logits is not taken for growth.
It reports, and warns about, latency that drifts (end against start) without failing on it: on a
shared CPU latency is noisy, memory is not.
"""
from __future__ import annotations

import sys
import time

import torch

from streaming_trt.contract import Geometry

from . import baselines, harness, report
from .harness import CheckFailed, UserError

EPILOG = """examples:
  python -m bench.endless                          # built-in model, CPU, a few minutes
  python -m bench.endless --tokens 4000000 --device cuda
  python -m bench.endless --model path/to/checkpoint --device cuda --tokens 1000000 --cache 2048
"""


def arguments(argv):
    p = harness.parser("endless", __doc__, EPILOG)
    g = p.add_argument_group("stream")
    g.add_argument("--tokens", type=int, metavar="N", help="length of the stream (default: 30000 on CPU, 100000 on CUDA)")
    g.add_argument("--cache", type=int, metavar="N", default=1024, help="cache size C = sinks + window (default: %(default)s)")
    g.add_argument("--sink-tokens", type=int, metavar="N", default=4, help="S (default: %(default)s)")
    g.add_argument("--chunk", type=int, metavar="N", default=1, help="tokens per feed call; 1 is the decode path (default: %(default)s)")
    g.add_argument("--text", metavar="FILE", help="text to stream, cycled (default: the built-in text)")
    g.add_argument("--samples", type=int, metavar="N", default=100, help="points at which to sample (default: %(default)s)")
    g.add_argument("--settle", type=int, metavar="N", default=1000,
                   help="tokens after which memory is taken as the baseline (default: %(default)s)")
    g.add_argument("--mem-tolerance", type=float, metavar="MIB",
                   help="MiB that process memory may rise above the baseline (default: 16 on CPU (RSS), 1 on CUDA)")
    return p.parse_args(argv)


def validate(args):
    cuda = harness.resolve_device(args.device).type == "cuda"
    args.tokens = (100_000 if cuda else 30_000) if args.tokens is None else args.tokens
    for flag in ("tokens", "cache", "chunk", "samples"):
        harness.positive("--" + flag.replace("_", "-"), getattr(args, flag))
    harness.positive("--sink-tokens", args.sink_tokens, 0)
    harness.positive("--settle", args.settle, 0)
    Geometry.with_capacity(args.cache, args.sink_tokens)  # --cache must exceed --sink-tokens
    if args.settle >= args.tokens:
        raise UserError(f"--settle ({args.settle}) must be smaller than --tokens ({args.tokens})")
    if args.mem_tolerance is None:
        args.mem_tolerance = 1.0 if cuda else 16.0
    if args.mem_tolerance < 0:
        raise UserError(f"--mem-tolerance must be >= 0, got {args.mem_tolerance}")


class Sampler:
    """Per-interval statistics; nothing grows with the stream's length."""

    def __init__(self):
        self.latencies: list[float] = []
        self.nll = 0.0
        self.count = 0

    def take(self) -> tuple[list[float], float]:
        lat, nll = self.latencies, self.nll / max(self.count, 1)
        self.latencies, self.nll, self.count = [], 0.0, 0
        return lat, nll


def memory(device: torch.device) -> dict:
    if device.type == "cuda":
        m = dict(cuda_allocated_bytes=torch.cuda.memory_allocated(device),
                 cuda_peak_bytes=torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return m
    return dict(rss_bytes=harness.rss_bytes())


def run(args, argv=None, wrap_session=None) -> dict:
    """``wrap_session``: optional callable applied to the session before streaming (tests inject
    leaks and NaNs through it)."""
    validate(args)
    out = harness.out_dir(args, "endless")
    built = harness.build(args)
    dev = built.device
    text, text_name = harness.load_text_ids(args.text, built.tokenizer, min(args.tokens + 1, 1 << 20))
    text = text.clamp(max=built.config.vocab_size - 1)
    s, w = baselines.cache_shape("streaming", args.cache, args.sink_tokens)
    session = built.model.session(sink_tokens=s, window=w, max_chunk=max(args.chunk, 1))
    if wrap_session is not None:
        session = wrap_session(session)
    harness.info(f"[bench.endless] {built.source}, {str(built.dtype).removeprefix('torch.')} on {dev}; {args.tokens} tokens "
           f"of {text_name}, cache {args.cache} (S={s}, W={w}), {args.chunk} token(s) per feed")
    every = max(args.chunk, -(-args.tokens // args.samples))
    mem_key = "cuda_allocated_bytes" if dev.type == "cuda" else "rss_bytes"
    tol = args.mem_tolerance * 2**20
    rows, baseline, failure = [], None, None
    early = []  # samples after --settle that set the baseline
    n_early = max(3, args.samples // 10)
    sampler = Sampler()
    cache_bytes0 = session.cache.nbytes()
    bar = harness.progress(args.tokens, "endless", args.no_progress)
    start = time.perf_counter()
    pos, n_text, next_sample = 0, text.shape[0], every
    try:
        while pos < args.tokens:
            k = min(args.chunk, args.tokens - pos)
            idx = torch.arange(pos, pos + k + 1) % n_text
            ids, targets = text[idx[:-1]], text[idx[1:]]
            harness.sync(dev)
            t0 = time.perf_counter()
            logits = session.feed(ids.view(1, -1))[0]
            harness.sync(dev)
            seconds = time.perf_counter() - t0
            if not bool(torch.isfinite(logits).all()):
                bad = (~torch.isfinite(logits)).any(-1).nonzero()
                raise CheckFailed(f"NaN or infinite logits at token {pos + int(bad[0])} of the stream")
            sampler.latencies.append(seconds / k)
            sampler.nll += float(harness.nll_of(logits, targets).sum())
            sampler.count += k
            pos += k
            bar.update(k)
            if pos >= next_sample or pos >= args.tokens:
                next_sample += every
                lat, nll = sampler.take()
                row = dict(tokens=pos, median_ms=1e3 * harness.median(lat), p10_ms=1e3 * harness.quantile(lat, 0.1),
                           p90_ms=1e3 * harness.quantile(lat, 0.9), cache_bytes=session.cache.nbytes(), nll=nll,
                           elapsed_s=time.perf_counter() - start, **memory(dev))
                rows.append(row)
                if row["cache_bytes"] != cache_bytes0:
                    raise CheckFailed(f"the key/value cache changed size from {cache_bytes0} to {row['cache_bytes']} "
                                      f"bytes at token {pos}")
                if baseline is None and pos >= args.settle:
                    early.append(row)
                    if len(early) == n_early or pos >= args.tokens:
                        baseline = max(early, key=lambda r: r[mem_key])
                elif baseline is not None and row[mem_key] > baseline[mem_key] + tol:
                    raise CheckFailed(
                        f"memory grew: {mem_key.replace('_bytes', '')} {report.human_bytes(row[mem_key])} at token {pos} "
                        f"against {report.human_bytes(baseline[mem_key])} at token {baseline['tokens']} "
                        f"(+{report.human_bytes(row[mem_key] - baseline[mem_key])} > tolerance {args.mem_tolerance:g} MiB)")
    except CheckFailed as e:
        failure = str(e)
    finally:
        bar.close()
    return finish(args, argv, built, rows, baseline, failure, out, text_name, mem_key, (s, w))


def finish(args, argv, built, rows, baseline, failure, out, text_name, mem_key, shape) -> dict:
    fields = ["tokens", "median_ms", "p10_ms", "p90_ms", "cache_bytes", mem_key] + \
        (["cuda_peak_bytes"] if mem_key.startswith("cuda") else []) + ["nll", "elapsed_s"]
    report.write_csv(out / "endless.csv", rows, fields)
    after = [r for r in rows if r["tokens"] >= args.settle]
    # latency drift: the middle value of the last few samples against the first few (one sample is
    # at the mercy of whatever else the machine was doing then)
    k = max(1, min(5, len(after) // 4))
    drift = (harness.median([r["median_ms"] for r in after[-k:]]) / harness.median([r["median_ms"] for r in after[:k]])
             if len(after) > 1 else float("nan"))
    mem_growth = after[-1][mem_key] - after[0][mem_key] if len(after) > 1 else float("nan")
    lat_after = [r["median_ms"] for r in after]
    body = (f"{rows[-1]['tokens'] if rows else 0} of {args.tokens} tokens of {text_name}, cache {args.cache} tokens "
            f"(S={shape[0]}, W={shape[1]}), {args.chunk} token(s) per feed, {len(rows)} samples.\n\n")
    if after:
        def span(key, fmt):
            values = [r[key] for r in after]
            return f"{fmt(min(values))} - {fmt(max(values))}"

        mb = report.human_bytes
        mem_name = mem_key.replace("_bytes", "").replace("_", " ")
        body += report.markdown_table(
            ["", f"at token {after[0]['tokens']}", f"at token {after[-1]['tokens']}",
             f"end against start" + (f" (median of {k} samples each)" if k > 1 else ""),
             f"range over the {len(after)} samples"],
            [["median ms/token", f"{after[0]['median_ms']:.2f}", f"{after[-1]['median_ms']:.2f}", f"{drift:.2f}x",
              span("median_ms", lambda v: f"{v:.2f}")],
             ["key/value cache", mb(after[0]["cache_bytes"]), mb(after[-1]["cache_bytes"]),
              f"{after[-1]['cache_bytes'] - after[0]['cache_bytes']:+d} B", span("cache_bytes", mb)],
             [mem_name, mb(after[0][mem_key]), mb(after[-1][mem_key]),
              f"{'+' if mem_growth >= 0 else '-'}{mb(abs(mem_growth))}", span(mem_key, mb)],
             ["mean NLL of the interval", f"{after[0]['nll']:.3f}", f"{after[-1]['nll']:.3f}",
              f"{after[-1]['nll'] - after[0]['nll']:+.3f}", span("nll", lambda v: f"{v:.3f}")]])
    verdict = f"FAILED: {failure}" if failure else (
        f"PASSED: no NaN, the cache kept its {report.human_bytes(rows[-1]['cache_bytes'])} and "
        f"{mem_key.replace('_bytes', '').replace('_', ' ')} stayed within {args.mem_tolerance:g} MiB of its baseline "
        f"({report.human_bytes(baseline[mem_key]) + ', the highest of the first samples, at token ' + str(baseline['tokens']) if baseline else '-'})")
    body += f"\n\n**{verdict}**"
    if drift == drift and drift > 1.5 and not failure:
        body += f"\n\nWarning: the median latency at the end is {drift:.2f}x the one at the start."
        harness.info(f"warning: latency drifted {drift:.2f}x from token {after[0]['tokens']} to the end")
    if built.random_weights:
        body += "\n\nThe model has random weights: the NLL column only shows that the logits stay finite and steady."
    cmd = report.command("endless", argv)
    markdown = report.write_report(out / "endless.md", "Endless stream", cmd, built, body)
    plot(rows, baseline, failure, args, built, mem_key, out / "endless.png")
    print(markdown)
    harness.info(f"[bench.endless] wrote {out / 'endless.csv'}, {out / 'endless.png'}, {out / 'endless.md'}")
    if failure:
        raise CheckFailed(failure)
    return dict(rows=rows, baseline=baseline, out=out, drift=drift)


def plot(rows, baseline, failure, args, built, mem_key, path) -> None:
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    x = [r["tokens"] for r in rows]
    color = report.STYLES["streaming"][0]
    ax = axes[0]
    ax.plot(x, [r["median_ms"] for r in rows], color=color, label="median of the interval")
    ax.fill_between(x, [r["p10_ms"] for r in rows], [r["p90_ms"] for r in rows], color=color, alpha=0.15,
                    linewidth=0, label="10th-90th percentile")
    ax.set(xlabel="tokens streamed", ylabel="ms per token", title="Per-token latency", ylim=(0, None))
    ax.legend()
    ax = axes[1]
    ax.plot(x, [r[mem_key] / 2**20 for r in rows], color=color,
            label="CUDA allocated" if mem_key.startswith("cuda") else "process RSS")
    if mem_key.startswith("cuda"):
        ax.plot(x, [r["cuda_peak_bytes"] / 2**20 for r in rows], color=color, linestyle=":", label="CUDA peak")
    if baseline is not None:
        ax.axhline((baseline[mem_key] + args.mem_tolerance * 2**20) / 2**20, color="#999999", linewidth=0.7,
                   linestyle=":", label=f"fail above (+{args.mem_tolerance:g} MiB)")
    ax.set(xlabel="tokens streamed", ylabel="process MiB", title="Memory", ylim=(0, None))
    twin = ax.twinx()
    twin.plot(x, [r["cache_bytes"] / 2**20 for r in rows], color="black", linestyle="--", label="key/value cache (right)")
    twin.set(ylabel="key/value cache MiB", ylim=(0, 1.2 * max([r["cache_bytes"] for r in rows] + [1]) / 2**20))
    twin.grid(False)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
    ax = axes[2]
    ax.plot(x, [r["nll"] for r in rows], color=color)
    ax.set(xlabel="tokens streamed", ylabel="mean NLL of the interval", title="Log-likelihood of the text",
           ylim=(0, 1.15 * max([r["nll"] for r in rows] + [1e-9])))
    for ax in axes:
        ax.axvline(args.cache, color="black", linewidth=0.6, linestyle="--")
        ax.text(args.cache, 0.02, " cache full", transform=ax.get_xaxis_transform(), fontsize=7)
        if baseline is not None:
            ax.axvline(baseline["tokens"], color="#999999", linewidth=0.6, linestyle=":")
            ax.text(baseline["tokens"], 0.08, " memory baseline", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="#555555")
    title = ("FAILED: " + failure) if failure else f"StreamingLLM, one stream of {x[-1] if x else 0} tokens, cache {args.cache}"
    fig.suptitle(title, color="#b00000" if failure else "black", fontsize=10)
    report.save_figure(fig, path, report.footer(built))


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
