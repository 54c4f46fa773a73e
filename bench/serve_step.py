"""The batched serving step in-process: the scheduler alone, no Triton, at several batch sizes.

For each batch size N, N new conversations submit one turn each at the same moment to a
:class:`~streaming_trt.serving.scheduler.Scheduler` with N slots; every turn feeds a prompt of
about ``--prompt-tokens`` tokens and generates ``--tokens`` greedy tokens. Reported per N:
generated tokens per second (all conversations together), time to first token p50/p99,
inter-token latency p50/p99, and the throughput relative to N = 1. What ``bench.serve`` measures
through a real tritonserver, without the server: on a GPU, the step with the Triton kernels and
the bucketed CUDA graphs.

    python -m bench.serve_step --batch-sizes 1,4,16                          # CPU, built-in model
    python -m bench.serve_step --preset llama-1b --device cuda --batch-sizes 1,8,64,256

Writes serve_step.csv and serve_step.png to --out (default runs/serve_step/).
"""
from __future__ import annotations

import csv
import sys
import tempfile
import threading
import time

from bench import harness
from bench.harness import info, median, quantile


def arguments(argv=None):
    p = harness.parser("serve_step", __doc__)
    g = p.add_argument_group("serving")
    g.add_argument("--batch-sizes", default="1,4,16", help="conversations at once, comma-separated (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=32, help="tokens generated per turn (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=48, help="about this many prompt tokens per turn (default: %(default)s)")
    g.add_argument("--sink-tokens", type=int, default=4, help="S (default: %(default)s)")
    g.add_argument("--window", type=int, default=252, help="W (default: %(default)s)")
    g.add_argument("--token-budget", type=int, default=None, help="the step's token budget (default: the scheduler's)")
    return p.parse_args(argv)


def one_level(built, n: int, args) -> dict:
    from streaming_trt.contract import Geometry
    from streaming_trt.sampling import SamplingParams
    from streaming_trt.serving.scheduler import Scheduler, TurnRequest
    from streaming_trt.serving.store import ConversationStore

    store = ConversationStore(built.model, Geometry(args.sink_tokens, args.window), tempfile.mkdtemp(prefix="serve-step-"),
                              host_bytes=1 << 40)
    sched = Scheduler(built.model, built.tokenizer, store, slots=n, token_budget=args.token_budget,
                      max_new_tokens_limit=max(4096, args.tokens))
    words = "the sea was calm and the ship sailed on through the night ".split()
    text = " ".join(words[i % len(words)] for i in range(max(1, args.prompt_tokens)))
    times = [[] for _ in range(n)]
    finished, errors, lock = threading.Event(), [], threading.Lock()
    left = [n]

    def on_done(result, error):  # called from the scheduler's threads: never block them
        if error is not None:
            errors.append(error)
        with lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    start = time.perf_counter()
    for c in range(n):
        sched.submit(TurnRequest(c + 1, [{"role": "user", "content": text}], start=True, max_tokens=args.tokens,
                                 sampling=SamplingParams(temperature=0.0),
                                 on_token=lambda e, c=c: times[c].append(time.perf_counter()), on_done=on_done))
    finished.wait()
    wall = time.perf_counter() - start
    sched.close()
    if errors:
        raise RuntimeError(f"{len(errors)} turns failed, first: {errors[0]}")
    ttft = [t[0] - start for t in times if t]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    return {"batch": n, "tokens_per_s": sum(len(t) for t in times) / wall, "ttft_p50_ms": 1e3 * median(ttft),
            "ttft_p99_ms": 1e3 * quantile(ttft, 0.99), "itl_p50_ms": 1e3 * median(itl),
            "itl_p99_ms": 1e3 * quantile(itl, 0.99), "step_ms": 1e3 * median(itl)}


def run(args, argv=None) -> int:
    sizes = harness.int_list(args.batch_sizes, "--batch-sizes")
    built = harness.build(args)
    out = harness.out_dir(args, "serve_step")
    info(f"[serve_step] {built.source} on {built.device} ({built.dtype}), S + W = {args.sink_tokens} + {args.window}, "
         f"{args.tokens} tokens per turn, threads {args.threads}")
    one_level(built, 1, args)  # warm-up: kernels compile, graphs are captured
    rows = []
    bar = harness.progress(len(sizes), "batch sizes", args.no_progress, unit="level")
    for n in sizes:
        r = one_level(built, n, args)
        bar.update(1)
        r["vs_batch_1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(r)
        info(f"[serve_step] batch {n:4d}: {r['tokens_per_s']:8.1f} tok/s ({r['vs_batch_1']:.2f}x batch 1)  "
             f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms p99 {r['ttft_p99_ms']:8.1f} ms  "
             f"ITL p50 {r['itl_p50_ms']:7.1f} ms p99 {r['itl_p99_ms']:7.1f} ms")
    with open(out / "serve_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        x = [r["batch"] for r in rows]
        a.plot(x, [r["tokens_per_s"] for r in rows], "o-")
        a.set(xscale="log", xlabel="conversations in the batch", ylabel="generated tokens/s", title="throughput")
        b.plot(x, [r["itl_p50_ms"] for r in rows], "o-", label="ITL p50")
        b.plot(x, [r["itl_p99_ms"] for r in rows], "s--", label="ITL p99")
        b.plot(x, [r["ttft_p50_ms"] for r in rows], "^-", label="TTFT p50")
        b.set(xscale="log", yscale="log", xlabel="conversations in the batch", ylabel="ms", title="latency")
        b.legend()
        fig.suptitle(f"{built.source}, {built.device}")
        fig.tight_layout()
        fig.savefig(out / "serve_step.png", dpi=110)
    except ImportError:
        info("matplotlib missing: no plot")
    bar.close()
    info(f"[serve_step] wrote {out / 'serve_step.csv'}")
    return 0


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
