"""``python -m bench.serve --dynamo``: the project's gateway against NVIDIA Dynamo's frontend over one
and two ``serve --dynamo`` workers, and the failover gap (bench/serve.py's docstring)."""
from __future__ import annotations

import csv
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serve import RESULTS, _pct, _port


class Deployment:
    """Processes bound to 127.0.0.1 serving the OpenAI API on ``port``; logs in ``work``."""

    def __init__(self, name: str, work: Path):
        self.name, self.work, self.port = name, work, _port()
        self.work.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(work / "kv"), PYTHONUNBUFFERED="1",
                        DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1", DYN_EVENT_PLANE_HOST="127.0.0.1")
        self.session = name != "gateway"  # Dynamo: the X-Dynamo-Session-ID header names the conversation

    def start(self, key: str, *args: str) -> None:
        log = open(self.work / f"{key}.log", "w")
        self.procs[key] = subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)

    def log(self, key: str) -> str:
        return (self.work / f"{key}.log").read_text(errors="replace")

    def wait(self, keys, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not all("[streaming-trt] ready" in self.log(k) for k in keys):
            for k, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name}/{k} exited:\n{self.log(k)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve_flags(args, sessions: Path) -> list[str]:
    return ["-m", "streaming_trt.cli.serve", "--model", args.model, "--threads", "1", "--sink-tokens", str(args.sink_tokens),
            "--window", str(args.window), "--slots", "16", "--session-dir", str(sessions), "--disk-budget", "unlimited",
            "--seed", "0", "--max-new-tokens", str(args.tokens)] + (
               ["--token-budget", str(args.token_budget)] if args.token_budget else [])


def gateway(args, work: Path) -> Deployment:
    d = Deployment("gateway", work / "gateway")
    d.start("server", *serve_flags(args, d.work / "sessions"), "--grpc-port", str(_port()), "--openai-port", str(d.port))
    return d


def dynamo(args, work: Path, workers: int) -> Deployment:
    d = Deployment(f"dynamo-{workers}", work / f"dynamo-{workers}")
    d.start("frontend", "-m", "dynamo.frontend", "--discovery-backend", "file", "--http-host", "127.0.0.1",
            "--http-port", str(d.port), "--router-mode", "round-robin", "--router-session-affinity-ttl-secs", "600")
    for w in range(workers):
        d.start(f"worker{w}", *serve_flags(args, d.work / "sessions"), "--dynamo", "--discovery-backend", "file",
                "--dynamo-namespace", f"bench{workers}")
    return d


def chat(d: Deployment, messages, tokens: int, session: str, on_token=lambda: None) -> tuple[str, float, int]:
    """One streaming turn: (reply text, seconds to the first token, tokens). Raises on any error."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=600)
    headers = {"content-type": "application/json"}
    if d.session:
        headers["x-dynamo-session-id"] = session
    body = {"model": "streaming-trt", "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        text, first, count, usage = [], None, 0, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("error"):
                raise RuntimeError(str(chunk["error"]))
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - start
                        on_token()
                    text.append(piece)
                    count += 1
        if first is None:
            raise RuntimeError("no token received")
        return "".join(text), first, usage if usage is not None else count
    finally:
        conn.close()


def level(d: Deployment, n: int, args, tag: str) -> dict:
    ttft, counts, errors = [], [], []
    lock = threading.Lock()
    go = threading.Barrier(n)

    def conversation(c):
        messages = []
        try:
            go.wait()
            for t in range(args.turns):
                messages.append({"role": "user", "content": f"conversation {tag}-{c}, turn {t}: tell me more about the sea."})
                text, first, count = chat(d, messages, args.tokens, f"{tag}-{c}")
                messages.append({"role": "assistant", "content": text})
                with lock:
                    ttft.append(first)
                    counts.append(count)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{d.name}: {len(errors)} of {n} conversations failed, first: {errors[0]}")
    wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(counts) / wall, "ttft_p50_ms": _pct(ttft, 0.5) * 1e3, "ttft_p99_ms": _pct(ttft, 0.99) * 1e3,
            "seconds": wall}


def failover(d: Deployment, args, n: int = 4) -> dict:
    """``n`` conversations keep taking turns on the two-worker deployment; worker0 is SIGKILLed; the
    gap per affected conversation is from the kill to its next token (the resent turn's first)."""
    from streaming_trt.serving.conversations import session_conversation as session_cid
    from streaming_trt.serving.dynamo import history_path

    state = {c: {"messages": [], "turns": 0} for c in range(n)}
    killed_at: list[float] = []
    next_token: dict[int, float] = {}
    stop = threading.Event()
    errors = []

    def conversation(c):
        s = state[c]
        while not stop.is_set():
            s["messages"].append({"role": "user", "content": f"failover {c}, turn {s['turns']}: and then?"})
            while True:
                sent = time.monotonic()

                def seen():  # a token of a request sent after the kill (one sent before may still arrive)
                    if killed_at and sent > killed_at[0] and c not in next_token:
                        next_token[c] = time.monotonic()
                try:
                    text, _, _ = chat(d, s["messages"], args.tokens, f"failover-{c}", on_token=seen)
                    break
                except Exception as e:
                    if not killed_at or time.monotonic() - killed_at[0] > 120:
                        errors.append(f"{type(e).__name__}: {e}")
                        return
                    time.sleep(0.1)
            s["messages"].append({"role": "assistant", "content": text})
            s["turns"] += 1

    threads = [threading.Thread(target=conversation, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    while min(s["turns"] for s in state.values()) < 2 and not errors:
        time.sleep(0.1)
    victim = d.procs["worker0"].pid
    owners = {c: json.loads(history_path(d.work / "sessions", session_cid(f"failover-{c}")).read_text())
              ["writer"].rsplit(":", 1)[1] for c in range(n)}
    affected = [c for c in range(n) if owners[c] == str(victim)]
    time.sleep(0.2)  # into the next turn
    d.procs["worker0"].send_signal(signal.SIGKILL)
    killed_at.append(time.monotonic())
    deadline = time.monotonic() + 120
    while any(c not in next_token for c in affected) and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(300)
    if errors:
        raise RuntimeError(f"failover: {errors[0]}")
    gaps = [next_token[c] - killed_at[0] for c in affected if c in next_token]
    return {"affected": len(affected), "gap_max_s": max(gaps) if gaps else float("nan"),
            "gap_min_s": min(gaps) if gaps else float("nan"), "unserved": len(affected) - len(gaps)}


def run(args) -> int:
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-dynamo-"))
    deployments = [gateway(args, work), dynamo(args, work, 1), dynamo(args, work, 2)]
    rows = []
    try:
        for d in deployments:  # one at a time: two cores here
            d.wait([k for k in d.procs if k != "frontend"])
            time.sleep(3.0)  # the frontend discovers the workers
            level(d, 2, argparse_namespace(args, turns=1, tokens=4), "warm")
        print(f"model {args.model}, S + W = {args.sink_tokens} + {args.window}, {args.turns} turns x {args.tokens} "
              f"tokens, 1 thread per worker", flush=True)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r_i in range(args.repeats):  # rounds of every level, the deployments' order alternating
            for i, n in enumerate(levels):
                for d in (deployments if (i + r_i) % 2 == 0 else deployments[::-1]):
                    r = level(d, n, args, f"{d.name}-{n}-{r_i}")
                    runs.setdefault((d.name, n), []).append(r)
                    print(f"round {r_i} {d.name:9s} {n:3d} convs: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 "
                          f"{r['ttft_p50_ms']:8.0f} ms p99 {r['ttft_p99_ms']:8.0f} ms", flush=True)
        print(f"medians over {args.repeats} rounds:")
        for (name, n), rs in runs.items():
            r = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            rows.append({"deployment": name, "concurrency": n, **r})
            print(f"{name:9s} {n:3d} convs: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.0f} ms "
                  f"p99 {r['ttft_p99_ms']:8.0f} ms", flush=True)
        f = failover(deployments[2], args)
        print(f"failover (dynamo-2, 4 conversations, SIGKILL of one worker): {f['affected']} affected, gap to the next "
              f"token max {f['gap_max_s']:.1f} s, min {f['gap_min_s']:.1f} s, {f['unserved']} never served", flush=True)
    finally:
        for d in deployments:
            d.stop()
    out = Path(args.out) if args.out else RESULTS / f"serve-dynamo-{args.model.replace('builtin:', '').replace('/', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve_dynamo.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    (out / "failover.json").write_text(json.dumps(f, indent=1))
    print(f"wrote {out / 'serve_dynamo.csv'} and {out / 'failover.json'}")
    return 0


def argparse_namespace(args, **overrides):
    import argparse

    return argparse.Namespace(**{**vars(args), **overrides})
