"""Soak: one server, many clients, some of them hostile, for minutes (issue 26).

Starts ``python -m streaming_trt.cli.serve --model builtin:random`` with its OpenAI gateway on
loopback, then runs ``--clients`` concurrent clients for ``--minutes``: ``--clients`` minus
``--abusive`` valid ones, each holding greedy multi-turn conversations (streamed, the whole history
resent every turn as OpenAI clients do), and ``--abusive`` ones sending, at random, malformed JSON,
oversized bodies, headers a byte at a time (slow loris), streams they never read, streams they
drop after three chunks, NaN / out-of-range parameters and replies under 16 stop strings of 1024
characters. It prints:

- valid turns completed and failed (target: 0 failed; a failure is any non-200, an error inside
  the stream, or a stream without its end);
- conversations lost or forked (target: 0): a turn served by another conversation than the one
  the conversation started on (the gateway's ``x-streaming-trt-conversation`` header), a continuation
  that fed more than its one new message (``usage.prompt_tokens`` above the first turn's), and, for
  up to ``--check`` conversations, replies that differ from the same conversation run in-process, greedy;
- 5xx answers to valid requests (target: 0);
- peak RSS of the server's processes against its budget (RSS once ready + ``--host-memory`` +
  256 MiB of buffers) and peak bytes in the session directory against ``--disk-budget``;
- p99 inter-token latency (gap between two streamed chunks) of valid turns; with ``--baseline`` the
  same valid clients run first alone for the same time, and the ratio is printed (target <= 1.5).

    python -m bench.soak                       # 64 clients (32 abusive), 10 minutes, + baseline
    python -m bench.soak --minutes 0.2 --clients 4 --abusive 2 --no-baseline
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serve import _pct, _port, proc_field, process_tree

SINK, WINDOW, TOKENS = 4, 124, 12
MAX_BODY = 64 * 1024
ABUSES = ("malformed", "oversized", "slow_headers", "never_reading", "cancelled", "bad_numbers", "stop_heavy")


class Server:
    """``python -m streaming_trt.cli.serve --model builtin:random`` with the gateway, on loopback."""

    def __init__(self, work: Path, args):
        self.port, self.sessions = _port(), work / "sessions"
        self.cmd = [sys.executable, "-m", "streaming_trt.cli.serve", "--model", "builtin:random", "--threads",
                    str(args.threads), "--sink-tokens", str(SINK), "--window", str(WINDOW), "--max-new-tokens",
                    str(TOKENS), "--grpc-port", str(_port()), "--openai-port", str(self.port), "--session-dir",
                    str(self.sessions), "--host-memory", str(args.host_memory), "--disk-budget", str(args.disk_budget),
                    "--max-input-bytes", str(MAX_BODY), "--max-tokens-limit", "2048"]
        self.log = open(work / "serve.log", "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start; see {work / 'serve.log'}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident bytes of the server and every process under it."""
        return sum(1024 * proc_field(p, "status", "VmRSS:") for p in process_tree(self.proc.pid))

    def disk(self) -> int:
        total = 0
        for path in self.sessions.rglob("*"):
            try:
                total += path.stat().st_blocks * 512
            except OSError:
                continue
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# ----------------------------------------------------------------------------------- clients
def request(port: int, body: bytes, timeout: float = 300.0, rcvbuf: int | None = None):
    """POST /v1/chat/completions; returns the open connection and its response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if rcvbuf:
        conn.connect()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.completed = self.failed = self.server_errors = self.forked = 0
        self.gaps: list[float] = []
        self.failures: list[str] = []
        self.abuse: dict[str, dict[int, int]] = {k: {} for k in ABUSES}
        self.conversations: list[tuple[list[str], list[str]]] = []  # (user texts, replies) of whole conversations

    def fail(self, why: str, status: int | None = None) -> None:
        with self.lock:
            self.failed += 1
            self.server_errors += status is not None and status >= 500
            if len(self.failures) < 20:
                self.failures.append(why)


def stream_turn(port: int, messages: list[dict], tally: Tally):
    """One valid streamed turn; returns (reply text, conversation id, prompt tokens) or None (failed)."""
    body = json.dumps({"messages": messages, "max_tokens": TOKENS, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    try:
        conn, r = request(port, body)
    except OSError as e:
        tally.fail(f"connection: {e}")
        return None
    try:
        if r.status != 200:
            tally.fail(f"status {r.status}: {r.read()[:200]!r}", r.status)
            return None
        cid, text, usage, done, gaps, last = r.headers.get("x-streaming-trt-conversation"), "", None, False, [], None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                tally.fail(f"in-stream error: {event['error']}", 500 if event["error"].get("type") == "server_error" else None)
                return None
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last, text = now, text + piece
        if not done or usage is None:
            tally.fail("stream ended without [DONE] or usage")
            return None
        with tally.lock:
            tally.completed += 1
            tally.gaps += gaps
        return text, cid, usage["prompt_tokens"]
    except (OSError, ValueError) as e:
        tally.fail(f"reading the stream: {type(e).__name__}: {e}")
        return None
    finally:
        conn.close()


def valid_client(port: int, index: int, turns: int, deadline: float, tally: Tally) -> None:
    words = ["sky", "blue", "cat", "runs", "42", "zeta", "lamp", "ok?", "moon", "rain"]
    rng, n = random.Random(index), 0
    while time.monotonic() < deadline:
        n += 1
        texts, replies, messages, cid, first_prompt = [], [], [], None, None
        for t in range(turns):
            if time.monotonic() >= deadline:
                break
            texts.append(f"v{index}.{n} t{t} " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))))
            messages = messages + [{"role": "user", "content": texts[-1]}]
            got = stream_turn(port, messages, tally)
            if got is None:
                texts.pop()
                break
            reply, served_by, prompt = got
            if t == 0:
                cid, first_prompt = served_by, prompt
            elif served_by != cid or prompt > len(texts[-1]) + first_prompt - len(texts[0]) + 8:
                # another conversation, or more fed than the new message (characters: one token each) and the
                # template around it (measured on the first turn): the history fed again
                with tally.lock:
                    tally.forked += 1
                    tally.failures.append(f"forked: turn {t} of {cid} served by {served_by}, {prompt} prompt tokens")
                break
            replies.append(reply)
            messages = messages + [{"role": "assistant", "content": reply}]
        else:
            with tally.lock:
                tally.conversations.append((texts, replies))


def abusive_client(port: int, index: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(1000 + index)
    while time.monotonic() < deadline:
        kind = rng.choice(ABUSES)
        try:
            status = abuse(port, kind, rng, deadline)
        except OSError:
            status = -1  # the server closed the connection (what slow and oversized clients deserve)
        with tally.lock:
            tally.abuse[kind][status] = tally.abuse[kind].get(status, 0) + 1
        time.sleep(0.05)


def abuse(port: int, kind: str, rng: random.Random, deadline: float) -> int:
    """One hostile request; returns the HTTP status, 0 when the client let go first, -1 when the server closed."""
    user = [{"role": "user", "content": f"abuse {rng.random()}"}]
    if kind == "malformed":
        conn, r = request(port, b'{"messages": [{"role": "user", "content": "x"')
    elif kind == "bad_numbers":
        name, value = rng.choice([("temperature", "NaN"), ("top_p", "5e-324"), ("repetition_penalty", "1e-300"),
                                  ("max_tokens", "9" * 5000), ("temperature", "Infinity"), ("seed", str(1 << 64))])
        conn, r = request(port, ('{"messages": %s, "temperature": 1, "%s": %s}' % (json.dumps(user), name, value)).encode())
    elif kind == "oversized":
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (4 << 20) + b'{"messages": "' + b"x" * 65536)
            head = sock.recv(64)
            return int(head.split()[1]) if head.startswith(b"HTTP/1.1") else -1
        finally:
            sock.close()
    elif kind == "slow_headers":
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for _ in range(40):  # a header byte every 0.5 s, for up to 20 s (or the end of the run)
                if time.monotonic() > deadline:
                    return 0
                sock.sendall(b"X")
                try:
                    if sock.recv(64) == b"":
                        return -1
                except socket.timeout:
                    pass
                time.sleep(0.5)
            return 0
        finally:
            sock.close()
    elif kind == "never_reading":
        body = json.dumps({"messages": user, "max_tokens": 2048, "temperature": 1, "stream": True}).encode()
        conn, r = request(port, body, rcvbuf=4096)
        time.sleep(max(0.0, min(40.0, deadline - time.monotonic())))  # longer than the gateway's send limit (30 s)
        conn.close()
        return r.status
    elif kind == "cancelled":
        body = json.dumps({"messages": user, "max_tokens": 512, "temperature": 1, "stream": True}).encode()
        conn, r = request(port, body)
        if r.status == 200:
            for _ in range(3):
                r.readline()
        conn.close()
        return r.status
    else:  # stop_heavy
        stops = ["".join(rng.choice("ab ") for _ in range(1024)) for _ in range(16)]
        body = json.dumps({"messages": user, "max_tokens": 64, "temperature": 1, "stop": stops}).encode()
        conn, r = request(port, body)
    try:
        r.read()
        return r.status
    finally:
        conn.close()


# ----------------------------------------------------------------------------------- one run
def run(args, abusive: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    server = Server(work, args)
    tally, peak = Tally(), {"rss": 0, "disk": 0}
    try:
        valid = args.clients - args.abusive
        stream_turn(server.port, [{"role": "user", "content": "warm-up"}], Tally())
        rss_budget = server.rss() + args.host_memory + (256 << 20)
        deadline = time.monotonic() + args.minutes * 60
        stop = threading.Event()

        def watch():
            while not stop.wait(1.0):
                peak["rss"], peak["disk"] = max(peak["rss"], server.rss()), max(peak["disk"], server.disk())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=valid_client, args=(server.port, i, args.turns, deadline, tally), daemon=True)
                   for i in range(valid)]
        threads += [threading.Thread(target=abusive_client, args=(server.port, i, deadline, tally), daemon=True)
                    for i in range(abusive)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.minutes * 60 + 120)
        stop.set()
        watcher.join(5)
        alive = server.alive()
    finally:
        server.stop()
    mismatched, checked = check(tally.conversations[: args.check]) if args.check else (0, 0)
    return {"abusive_clients": abusive, "valid_clients": args.clients - args.abusive, "alive": alive,
            "valid_turns_completed": tally.completed, "valid_turns_failed": tally.failed,
            "conversations_forked": tally.forked, "conversations_checked": checked,
            "conversations_mismatched": mismatched, "valid_5xx": tally.server_errors,
            "peak_rss": peak["rss"], "rss_budget": rss_budget, "peak_disk": peak["disk"],
            "disk_budget": args.disk_budget, "itl_p50_ms": 1e3 * _pct(tally.gaps, 0.5),
            "itl_p99_ms": 1e3 * _pct(tally.gaps, 0.99), "abuse": tally.abuse, "failures": tally.failures,
            "command": " ".join(server.cmd)}


def check(conversations) -> tuple[int, int]:
    """How many of ``conversations`` (user texts, replies) differ from the same conversation run in-process,
    greedy, through the same Conversation the server's scheduler uses."""
    import torch

    from streaming_trt.loading.catalog import open_model
    from streaming_trt.runtime.chat import Chat
    from streaming_trt.runtime.generation import eos_ids
    from streaming_trt.runtime.sampling import Sampler, SamplingParams

    torch.set_num_threads(1)  # as the server runs
    model, tok = open_model("builtin:random", announce=False)
    mismatched = 0
    for texts, replies in conversations:
        conv, session = Chat(tok, eos_ids(tok, model.config)), model.session(SINK, WINDOW)
        for text, reply in zip(texts, replies):
            pieces = conv.reply(session, [{"role": "user", "content": text}], TOKENS,
                                Sampler(SamplingParams(temperature=0.0)))
            if "".join(piece for _, piece in pieces) != reply:
                mismatched += 1
                break
    return mismatched, len(conversations)


def report(r: dict, base: dict | None) -> None:
    mib = 2 ** 20
    print(f"  server alive at the end: {r['alive']}")
    print(f"  valid turns completed {r['valid_turns_completed']}, failed {r['valid_turns_failed']} (target 0)")
    print(f"  conversations forked or lost {r['conversations_forked']} (target 0); replies checked against the "
          f"in-process greedy run: {r['conversations_checked']} conversations, {r['conversations_mismatched']} differ "
          "(target 0)")
    print(f"  5xx to valid requests {r['valid_5xx']} (target 0)")
    print(f"  peak RSS {r['peak_rss'] / mib:.0f} MiB (budget {r['rss_budget'] / mib:.0f} MiB); peak disk "
          f"{r['peak_disk'] / mib:.1f} MiB (budget {r['disk_budget'] / mib:.0f} MiB)")
    line = f"  inter-token latency of valid turns: p50 {r['itl_p50_ms']:.1f} ms, p99 {r['itl_p99_ms']:.1f} ms"
    if base is not None:
        line += f"; alone p99 {base['itl_p99_ms']:.1f} ms: {r['itl_p99_ms'] / base['itl_p99_ms']:.2f}x (target <= 1.5x)"
    print(line)
    if r["abusive_clients"]:
        print("  abusive requests by kind, {status: count} (-1: closed by the server, 0: let go by the client):")
        for kind, statuses in r["abuse"].items():
            print(f"    {kind:14s} {dict(sorted(statuses.items()))}")
    for why in r["failures"][:10]:
        print(f"  failure: {why}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (and of the baseline run)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients, valid and abusive")
    p.add_argument("--abusive", type=int, default=32, help="how many of the clients are abusive")
    p.add_argument("--turns", type=int, default=4, help="turns per valid conversation")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--host-memory", type=int, default=256 << 20, help="the server's --host-memory, bytes")
    p.add_argument("--disk-budget", type=int, default=256 << 20, help="the server's --disk-budget, bytes")
    p.add_argument("--check", type=int, default=16, help="conversations checked against an in-process run")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="first run the valid clients alone, for the latency ratio")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if not 0 <= args.abusive < args.clients:
        p.error("--abusive must be in [0, --clients)")
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    results = {}
    print(f"soak: {args.clients} clients ({args.abusive} abusive), {args.minutes:g} min, builtin:random, "
          f"S + W = {SINK} + {WINDOW}, {TOKENS} tokens per turn, {args.threads} server thread(s)", flush=True)
    if args.baseline:
        results["baseline"] = run(args, 0, work / "baseline")
        print("baseline (valid clients alone):")
        report(results["baseline"], None)
    results["soak"] = run(args, args.abusive, work / "soak")
    print("soak (valid and abusive clients):")
    report(results["soak"], results.get("baseline"))
    print(f"server command: {results['soak']['command']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    r = results["soak"]
    ok = (r["alive"] and r["valid_turns_failed"] == 0 and r["conversations_forked"] == 0 and r["valid_5xx"] == 0
          and r["conversations_mismatched"] == 0 and r["peak_rss"] <= r["rss_budget"]
          and r["peak_disk"] <= r["disk_budget"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
