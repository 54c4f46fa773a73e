"""Serving throughput and time to first token on a real tritonserver, with in-process figures beside.

For each concurrency level N (default 1, 8, 32, 64), N conversations run at once through the gRPC
client (one stream each), every one for ``--turns`` turns of ``--tokens`` greedy tokens. Reported:
generated tokens per second over the level (all conversations together) and p50 / p99 time to
first token of a turn (request sent -> first token received). The in-process row runs the same
turns one after another with ``Session`` in this process (the server also runs one turn at a
time: one model instance, so concurrency adds queueing, not parallelism).

    python -m bench.serve                       # built-in random model, CPU, about a minute
    python -m bench.serve --levels 1,8 --tokens 8

Writes bench/results/serve.csv and serve.png.
"""
from __future__ import annotations

import argparse
import csv
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def in_process(args, texts):
    """Tokens/s and TTFTs of the same turns run sequentially in this process."""
    from argparse import Namespace

    from streaming_trt import cli
    from streaming_trt.conversation import TurnEncoder
    from streaming_trt.generation import eos_ids, generate_tokens

    model, tok = cli.load(Namespace(model=args.model, dtype="float32", device="cpu", backend="auto", seed=0,
                                    threads=args.threads))
    turns, stop = TurnEncoder(tok), eos_ids(tok, model.config)
    ttft, tokens, t0 = [], 0, time.perf_counter()
    for conv in texts:
        session = model.session(args.sink_tokens, args.window)
        for i, text in enumerate(conv):
            start = time.perf_counter()
            ids = turns.first_turn(text) if i == 0 else turns.next_turn(text)
            last = None
            for n, token in enumerate(generate_tokens(session, ids, args.tokens, stop_token_ids=stop)):
                if n == 0:
                    ttft.append(time.perf_counter() - start)
                last, tokens = token, tokens + 1
            closing = turns.after_reply(last if last in stop else None)
            if closing:
                session.feed(closing, all_logits=False)
    return tokens / (time.perf_counter() - t0), ttft


def served(url, texts, args):
    from streaming_trt.client import Client

    ttft, counts, errors = [], [], []
    lock = threading.Lock()

    def worker(c, conv_texts):
        try:
            with Client(url, timeout=600) as client:
                conv = client.conversation(10_000 + c)
                for text in conv_texts:
                    start, n = time.perf_counter(), 0
                    for _ in conv.tokens(text, max_tokens=args.tokens):
                        if n == 0:
                            with lock:
                                ttft.append(time.perf_counter() - start)
                        n += 1
                    with lock:
                        counts.append(n)
                conv.end()
        except Exception as e:  # reported after the level
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c, t)) for c, t in enumerate(texts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} conversations failed, first: {errors[0]}")
    return sum(counts) / (time.perf_counter() - t0), ttft


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:random", help="as for `python -m streaming_trt.serve`")
    p.add_argument("--levels", default="1,8,32,64", help="concurrent conversations, comma-separated")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument("--threads", type=int, default=None, help="torch threads, server and in-process alike")
    p.add_argument("--out", default=str(RESULTS), help="directory for serve.csv and serve.png")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    from streaming_trt.serving.repo import TritonServer, find_tritonserver, write_repo

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    conf = {"model": args.model, "dtype": "float32", "device": "cpu", "backend": "auto", "seed": 0,
            "sink_tokens": args.sink_tokens, "window": args.window, "session_dir": str(work / "sessions"),
            "max_resident": max(levels), "max_new_tokens": args.tokens, "max_new_tokens_limit": 4096,
            "max_input_bytes": 1 << 20, "threads": args.threads}
    write_repo(work / "repo", conf)
    server = TritonServer(work / "repo", "127.0.0.1", _port(), _port(), find_tritonserver(), work)
    rows = []
    try:
        server.wait_ready(300)
        url = f"127.0.0.1:{server.grpc_port}"

        def texts(n):
            return [[f"conversation {c}, turn {t}: tell me more." for t in range(args.turns)] for c in range(n)]

        served(url, texts(2), args)  # warm-up
        tps, ttft = in_process(args, texts(8))
        rows.append(("in-process", 1, tps, _pct(ttft, 0.5) * 1e3, _pct(ttft, 0.99) * 1e3))
        print(f"in-process        : {tps:7.1f} tok/s  TTFT p50 {rows[-1][3]:7.1f} ms  p99 {rows[-1][4]:7.1f} ms")
        for n in levels:
            tps, ttft = served(url, texts(n), args)
            rows.append(("triton", n, tps, _pct(ttft, 0.5) * 1e3, _pct(ttft, 0.99) * 1e3))
            print(f"triton, {n:3d} convs : {tps:7.1f} tok/s  TTFT p50 {rows[-1][3]:7.1f} ms  p99 {rows[-1][4]:7.1f} ms",
                  flush=True)
    finally:
        server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "concurrency", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms"])
        w.writerows([(a, b, f"{c:.1f}", f"{d:.1f}", f"{e:.1f}") for a, b, c, d, e in rows])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [r for r in rows if r[0] == "triton"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot([r[1] for r in tr], [r[2] for r in tr], "o-", label="tritonserver (gRPC)")
        a.axhline(rows[0][2], ls="--", c="gray", label="in-process, sequential")
        a.set(xscale="log", xlabel="concurrent conversations", ylabel="generated tokens/s", title="throughput")
        b.plot([r[1] for r in tr], [r[3] for r in tr], "o-", label="p50")
        b.plot([r[1] for r in tr], [r[4] for r in tr], "s-", label="p99")
        b.axhline(rows[0][3], ls="--", c="gray", label="in-process p50")
        b.set(xscale="log", yscale="log", xlabel="concurrent conversations", ylabel="ms", title="time to first token")
        for ax in (a, b):
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "serve.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"wrote {out / 'serve.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
