"""Serving on a real tritonserver: the batched scheduler against the serial server, side by side.

Two servers run at once on the same model: ``serial`` (``--slots 1``: one turn at a time, what the
server did before continuous batching) and ``batched`` (``--slots`` = the largest level, at most 64).
For each concurrency level N the two are measured one after the other (their order alternating
between levels): N conversations start together through the gRPC client, each runs ``--turns``
turns of ``--tokens`` greedy tokens. Reported per server and level:

- generated tokens per second over the level (all conversations together);
- time to first token (TTFT, request sent -> first token received), p50 and p99 over the turns;
- inter-token latency (ITL, the gap between consecutive tokens of a reply), p50 and p99;
- ``turn_alone``: the mean time of one whole turn at level 1 on the batched server, the yardstick
  of the targets in docs/serving.md;
- ``written_per_turn``: bytes the server's processes passed to write() during the level, per turn
  (``wchar`` of /proc/<pid>/io over the tritonserver and its backend: the session files, whose
  per-turn records and compactions dominate, and the server's log).

    python -m bench.serve                                   # built-in random model, a few minutes
    python -m bench.serve --model builtin:smollm2 --levels 1,8,16 --tokens 32 --threads 2
    python -m bench.serve --model builtin:smollm2 --servers batched --levels 1,16 --repeats 3 --threads 2 --recall

``--repeats`` runs the levels that many times, interleaved (1, 16, 1, 16, ...), and the summary
takes each level's medians; ``--recall`` (and its flags) gives every conversation a block store.

Writes serve.csv and serve.png to --out (default bench/results/serve-<model>).

``--dynamo``: the OpenAI API of three deployments on the same model, one thread per worker, each
conversation a streaming chat (the whole history sent every turn): the project's gateway
(tritonserver + ``--openai-port``), and ``python -m dynamo.frontend`` (file discovery, session
affinity) in front of one and of two ``serve --dynamo`` workers sharing one --session-dir. Per
deployment and level: throughput, TTFT p50/p99. Then the failover gap: conversations keep taking
turns on the two-worker deployment, one worker is SIGKILLed, and the gap is the time from the kill
to the next token each affected conversation receives (clients resend the turn at once).

    python -m bench.serve --dynamo --levels 1,8,16 --turns 2 --tokens 16 --repeats 3
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from streaming_trt.cli import common

RESULTS = Path(__file__).parent / "results"


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def process_tree(pid: int) -> list[int]:
    """Process ``pid`` and its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def proc_field(pid: int, file: str, key: str) -> int:
    """The first number of line ``key`` in ``/proc/<pid>/<file>`` (0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def written(pid: int) -> int:
    """Bytes process ``pid`` and its descendants have passed to write() so far (0 where /proc cannot tell)."""
    return sum(proc_field(p, "io", "wchar:") for p in process_tree(pid))


def texts(n: int, turns: int, first: int) -> list[list[str]]:
    return [[f"conversation {first + c}, turn {t}: tell me more about the sea." for t in range(turns)]
            for c in range(n)]


def level(url: str, n: int, args, first_id: int) -> dict:
    """N conversations at once on the server at ``url``; their figures."""
    from streaming_trt.serving.client import Client

    ttft, itl, turn_s, counts, errors = [], [], [], [], []
    lock = threading.Lock()
    go = threading.Barrier(n)

    def worker(c, conv_texts):
        try:
            with Client(url, timeout=1800) as client:
                conv = client.conversation(first_id + c)
                go.wait()
                for text in conv_texts:
                    start = last = time.perf_counter()
                    gaps, count = [], 0
                    for _ in conv.tokens(text, max_tokens=args.tokens, temperature=0.0):
                        now = time.perf_counter()
                        if count == 0:
                            first = now - start
                        else:
                            gaps.append(now - last)
                        last, count = now, count + 1
                    with lock:
                        ttft.append(first)
                        itl.extend(gaps)
                        turn_s.append(time.perf_counter() - start)
                        counts.append(count)
                conv.end()
        except Exception as e:  # reported after the level
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c, t)) for c, t in enumerate(texts(n, args.turns, first_id))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} conversations failed, first: {errors[0]}")
    wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(counts) / wall, "ttft_p50_ms": _pct(ttft, 0.5) * 1e3,
            "ttft_p99_ms": _pct(ttft, 0.99) * 1e3, "itl_p50_ms": _pct(itl, 0.5) * 1e3,
            "itl_p99_ms": _pct(itl, 0.99) * 1e3, "turn_ms": statistics.mean(turn_s) * 1e3, "seconds": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:random", help="as for `python -m streaming_trt.cli.serve`")
    p.add_argument("--levels", default="1,8,16,32,64", help="concurrent conversations, comma-separated")
    p.add_argument("--turns", type=int, default=2, help="turns per conversation")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=252)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    p.add_argument("--token-budget", type=int, default=None, help="the batched step's token budget (serve's default)")
    p.add_argument("--servers", default="serial,batched", help="which servers to measure")
    p.add_argument("--serial-max-level", type=int, default=None,
                   help="skip the serial server above this level (it needs levels x turns x tokens / its tok/s)")
    p.add_argument("--repeats", type=int, default=1, help="runs of the levels, interleaved; the summary takes medians")
    p.add_argument("--out", default=None, help="directory for serve.csv and serve.png")
    p.add_argument("--dynamo", action="store_true",
                   help="compare the project's gateway with NVIDIA Dynamo's frontend over one and two workers, and "
                        "measure the failover gap (see above)")
    common.add_recall_flags(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.dynamo:
        from bench.serve_dynamo import run

        return run(args)
    recall = common.recall_from_flags(args)
    levels = [int(x) for x in args.levels.split(",")] * args.repeats
    kinds = args.servers.split(",")
    from streaming_trt.serving.repo import TritonServer, find_tritonserver, write_repo

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    servers = {}
    try:
        for kind in kinds:
            conf = {"model": args.model, "dtype": "float32", "device": "cpu", "backend": "auto", "seed": 0,
                    "sink_tokens": args.sink_tokens, "window": args.window, "session_dir": str(work / kind / "s"),
                    "slots": 1 if kind == "serial" else min(64, max(levels)), "slot_memory": None,
                    "token_budget": args.token_budget, "max_queue": 1024, "host_memory": 8 << 30, "disk_budget": None,
                    "idle_ttl": None, "max_new_tokens": args.tokens, "max_new_tokens_limit": 4096,
                    "max_input_bytes": 1 << 20, "threads": args.threads,
                    "recall": None if recall is None else dataclasses.asdict(recall)}
            write_repo(work / kind / "repo", conf)
            servers[kind] = TritonServer(work / kind / "repo", "127.0.0.1", _port(), _port(), find_tritonserver(),
                                         work / kind)
        for s in servers.values():
            s.wait_ready(600)
        urls = {k: f"127.0.0.1:{s.grpc_port}" for k, s in servers.items()}
        for k in kinds:  # warm-up
            level(urls[k], 2, argparse.Namespace(turns=1, tokens=4), 1)
        rows, cid = [], 100
        print(f"model {args.model}, S + W = {args.sink_tokens} + {args.window}, {args.turns} turns x {args.tokens} "
              f"tokens, threads {args.threads}, recall {recall}", flush=True)
        for i, n in enumerate(levels):
            for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                if kind == "serial" and args.serial_max_level is not None and n > args.serial_max_level:
                    continue
                before = written(servers[kind].proc.pid)
                r = level(urls[kind], n, args, cid)
                r["written_per_turn"] = (written(servers[kind].proc.pid) - before) / (n * args.turns)
                cid += n
                rows.append({"server": kind, "concurrency": n, **r})
                print(f"{kind:8s} {n:3d} convs: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.0f} ms "
                      f"p99 {r['ttft_p99_ms']:8.0f} ms  ITL p50 {r['itl_p50_ms']:6.0f} ms p99 {r['itl_p99_ms']:6.0f} ms  "
                      f"turn {r['turn_ms']:7.0f} ms  written {r['written_per_turn'] / 2**20:.2f} MiB/turn", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    out = Path(args.out) if args.out else RESULTS / f"serve-{args.model.replace('builtin:', '').replace('/', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    summary(rows)
    plot(rows, out / "serve.png", args)
    print(f"wrote {out / 'serve.csv'}")
    return 0


def medians(rows) -> dict:
    """Each (server, concurrency)'s figures, medians over its runs."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["server"], r["concurrency"]), []).append(r)
    return {key: {k: (statistics.median([x[k] for x in rs]) if isinstance(v, float) else v) for k, v in rs[0].items()}
            for key, rs in runs.items()}


def summary(rows) -> None:
    """The targets of docs/serving.md, as ratios of figures measured in this run (medians over
    the runs of a level)."""
    by = medians(rows)
    alone = by.get(("batched", 1))
    if alone is None:
        return
    if len(rows) > len(by):
        for (kind, n), r in sorted(by.items(), key=lambda x: (x[0][1], x[0][0])):
            print(f"median {kind:8s} {n:3d} convs: {r['tokens_per_s']:7.1f} tok/s  TTFT p99 {r['ttft_p99_ms']:8.0f} ms  "
                  f"ITL p50 {r['itl_p50_ms']:6.0f} ms p99 {r['itl_p99_ms']:6.0f} ms  "
                  f"written {r['written_per_turn'] / 2**20:.2f} MiB/turn")
    for n in sorted({r["concurrency"] for r in rows if r["concurrency"] > 1}):
        b = by.get(("batched", n))
        if b is None:
            continue
        line = (f"batched at {n}: throughput {b['tokens_per_s'] / alone['tokens_per_s']:.2f}x one conversation's, "
                f"TTFT p99 {b['ttft_p99_ms'] / alone['turn_ms']:.2f}x one whole turn alone, "
                f"ITL p99 {b['itl_p99_ms'] / alone['itl_p99_ms']:.2f}x one conversation's")
        s = by.get(("serial", n))
        if s is not None:
            line += f", {b['tokens_per_s'] / s['tokens_per_s']:.2f}x the serial server's throughput"
        print(line)


def plot(rows, path: Path, args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    rows = sorted(medians(rows).values(), key=lambda r: r["concurrency"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind, style in (("serial", "s--"), ("batched", "o-")):
        rs = [r for r in rows if r["server"] == kind]
        if not rs:
            continue
        x = [r["concurrency"] for r in rs]
        axes[0].plot(x, [r["tokens_per_s"] for r in rs], style, label=kind)
        axes[1].plot(x, [r["ttft_p50_ms"] for r in rs], style, label=f"{kind} p50")
        axes[1].plot(x, [r["ttft_p99_ms"] for r in rs], style, alpha=0.5, label=f"{kind} p99")
        axes[2].plot(x, [r["itl_p50_ms"] for r in rs], style, label=f"{kind} p50")
        axes[2].plot(x, [r["itl_p99_ms"] for r in rs], style, alpha=0.5, label=f"{kind} p99")
    axes[0].set(xscale="log", xlabel="concurrent conversations", ylabel="generated tokens/s", title="throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent conversations", ylabel="ms", title="time to first token")
    axes[2].set(xscale="log", yscale="log", xlabel="concurrent conversations", ylabel="ms",
                title="inter-token latency")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}: {args.turns} turns x {args.tokens} tokens per conversation, "
                 f"S + W = {args.sink_tokens} + {args.window}, threads {args.threads}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
