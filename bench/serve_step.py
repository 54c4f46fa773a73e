"""The batched serving step in-process: the scheduler alone, no Triton, at several batch sizes.

For each batch size N, N new conversations submit one turn each at the same moment to a
:class:`~streaming_trt.serving.scheduler.Scheduler` with N slots; every turn feeds a prompt of
about ``--prompt-tokens`` tokens and generates ``--tokens`` greedy tokens. Reported per N:
generated tokens per second (all conversations together), time to first token p50/p99,
inter-token latency p50/p99, and the throughput relative to N = 1. ``--modes plain,recall`` runs
each level without and with recall (every conversation its own block store), interleaved
``--repeats`` times, medians reported side by side. What ``bench.serve`` measures
through a real tritonserver, without the server: on a GPU, the step with the Triton kernels and
the bucketed CUDA graphs.

    python -m bench.serve_step --batch-sizes 1,4,16                          # CPU, built-in model
    python -m bench.serve_step --batch-sizes 1,16 --modes plain,recall --window 64 --prompt-tokens 160 \
        --recall-block-size 16 --recall-top-k 4 --repeats 3                 # recall beside plain
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
from streaming_trt.runtime.recall import Recall


def arguments(argv=None):
    p = harness.parser("serve_step", __doc__)
    g = p.add_argument_group("serving")
    g.add_argument("--batch-sizes", default="1,4,16", help="conversations at once, comma-separated (default: %(default)s)")
    g.add_argument("--tokens", type=int, default=32, help="tokens generated per turn (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=48, help="about this many prompt tokens per turn (default: %(default)s)")
    g.add_argument("--sink-tokens", type=int, default=4, help="S (default: %(default)s)")
    g.add_argument("--window", type=int, default=252, help="W (default: %(default)s)")
    g.add_argument("--token-budget", type=int, default=None, help="the step's token budget (default: the scheduler's)")
    g.add_argument("--modes", default="plain", help="plain, recall or both, comma-separated (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=1, help="runs of each level and mode, interleaved; medians (default: %(default)s)")
    d = Recall()
    g.add_argument("--recall-top-k", type=int, default=d.top_k, help="recall mode: blocks recalled per layer (default: %(default)s)")
    g.add_argument("--recall-block-size", type=int, default=d.block_size, help="recall mode: tokens per block (default: %(default)s)")
    g.add_argument("--recall-chunk", type=int, default=d.chunk, help="recall mode: prompt chunk (default: %(default)s)")
    return p.parse_args(argv)


def recall_settings(args) -> Recall:
    """The Recall of the recall mode (its --recall-* flags)."""
    return Recall(top_k=args.recall_top_k, block_size=args.recall_block_size, chunk=args.recall_chunk)


def one_level(built, n: int, args, recall: Recall | None = None) -> dict:
    from streaming_trt.contract import Geometry
    from streaming_trt.runtime.sampling import SamplingParams
    from streaming_trt.serving.scheduler import Scheduler, TurnRequest
    from streaming_trt.serving.store import ConversationStore

    store = ConversationStore(built.model, Geometry(args.sink_tokens, args.window), tempfile.mkdtemp(prefix="serve-step-"),
                              host_bytes=1 << 40)
    sched = Scheduler(built.model, built.tokenizer, store, slots=n, token_budget=args.token_budget,
                      max_new_tokens_limit=max(4096, args.tokens), recall=recall)
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
    return {"mode": "plain" if recall is None else "recall", "batch": n, "tokens_per_s": sum(len(t) for t in times) / wall, "ttft_p50_ms": 1e3 * median(ttft),
            "ttft_p99_ms": 1e3 * quantile(ttft, 0.99), "itl_p50_ms": 1e3 * median(itl),
            "itl_p99_ms": 1e3 * quantile(itl, 0.99), "step_ms": 1e3 * median(itl)}


def run(args, argv=None) -> int:
    sizes = harness.int_list(args.batch_sizes, "--batch-sizes")
    built = harness.build(args)
    out = harness.out_dir(args, "serve_step")
    info(f"[serve_step] {built.source} on {built.device} ({built.dtype}), S + W = {args.sink_tokens} + {args.window}, "
         f"{args.tokens} tokens per turn, threads {args.threads}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("plain", "recall") for m in modes) or args.repeats < 1:
        raise SystemExit("--modes takes plain and/or recall; --repeats an integer >= 1")
    settings = {"plain": None, "recall": recall_settings(args)}
    for m in modes:
        one_level(built, 1, args, settings[m])  # warm-up: kernels compile, graphs are captured
    rows = []
    bar = harness.progress(len(sizes) * len(modes) * args.repeats, "levels", args.no_progress, unit="level")
    for n in sizes:
        runs = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:  # interleaved, so that the machine's load falls on every mode alike
                runs[m].append(one_level(built, n, args, settings[m]))
                bar.update(1)
        for m in modes:
            r = {k: (median([x[k] for x in runs[m]]) if isinstance(v, float) else v) for k, v in runs[m][0].items()}
            first = next((x for x in rows if x["mode"] == m), None)
            r["vs_batch_1"] = r["tokens_per_s"] / first["tokens_per_s"] if first else 1.0
            plain = next((x for x in rows if x["mode"] == "plain" and x["batch"] == n), None)
            r["vs_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else 1.0
            rows.append(r)
            info(f"[serve_step] {m:6s} batch {n:4d}: {r['tokens_per_s']:8.1f} tok/s ({r['vs_batch_1']:.2f}x batch 1, "
                 f"{r['vs_plain']:.2f}x plain)  TTFT p50 {r['ttft_p50_ms']:8.1f} ms p99 {r['ttft_p99_ms']:8.1f} ms  "
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
        for m in modes:
            mine = [r for r in rows if r["mode"] == m]
            a.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=m)
        a.legend()
        rows_p = [r for r in rows if r["mode"] == modes[0]]
        x = [r["batch"] for r in rows_p]
        a.set(xscale="log", xlabel="conversations in the batch", ylabel="generated tokens/s", title="throughput")
        b.plot(x, [r["itl_p50_ms"] for r in rows_p], "o-", label="ITL p50")
        b.plot(x, [r["itl_p99_ms"] for r in rows_p], "s--", label="ITL p99")
        b.plot(x, [r["ttft_p50_ms"] for r in rows_p], "^-", label="TTFT p50")
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
