"""What a finished turn costs to persist: the conversation journal against the whole-state rewrite.

``--conversations`` conversations of ``--turns`` turns each run in-process on a one-row
:class:`~streaming_trt.engine.BatchRunner` (the server's feed path), one after the other; a turn feeds about ``--turn-tokens`` tokens (between half and 1.5 times that, seeded: a
prompt and its reply, whose values do not matter to persistence). After every turn the state is
persisted both ways, their order alternating from turn to turn:

- ``journal``: through a :class:`~streaming_trt.serving.store.ConversationStore` (``put`` then
  ``save``, what the server's writer thread does): one fsynced record of the slots the turn wrote,
  plus the background compactions it triggers (counted when they finish);
- ``full``: the whole state rewritten, :meth:`~streaming_trt.engine.StreamState.save` (atomic,
  fsynced), what every turn cost before the journal.

Reported: bytes written per turn both ways (journal: records + compactions, from the journal's
counters, checked against ``/proc/self/io`` write calls), the ratio to the turn's tokens x
per-token K/V bytes, and the median milliseconds the turn waits. At the end the journal's file is
loaded and compared tensor for tensor with the live state.

    python -m bench.persist                                   # built-in model, 4 + 1020
    python -m bench.persist --model smollm2 --threads 2       # the default model (SmolLM2-135M)

Writes persist.csv to --out (default runs/persist/).
"""
from __future__ import annotations

import csv
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness
from bench.harness import info, median


def arguments(argv=None):
    p = harness.parser("persist", __doc__)
    g = p.add_argument_group("conversations")
    g.add_argument("--conversations", type=int, default=2, help="conversations (default: %(default)s)")
    g.add_argument("--turns", type=int, default=20, help="turns per conversation (default: %(default)s)")
    g.add_argument("--turn-tokens", type=int, default=64, help="mean tokens per turn (default: %(default)s)")
    g.add_argument("--sink-tokens", type=int, default=4, help="S (default: %(default)s)")
    g.add_argument("--window", type=int, default=1020, help="W (default: %(default)s)")
    g.add_argument("--compact-ratio", type=float, default=1.0,
                   help="the journal compacts when its records exceed this many caches (default: %(default)s)")
    g.add_argument("--dir", help="where the files go (default: a temporary folder; fsync costs depend on it)")
    return p.parse_args(argv)


def write_calls() -> int:
    """Bytes this process has passed to write() so far (``wchar`` of /proc/self/io; 0 without it)."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def same_state(a, b) -> bool:
    def raw(t):
        return t.detach().cpu().contiguous().view(torch.uint8)

    return (a.seen == b.seen and torch.equal(raw(a.keys), raw(b.keys)) and torch.equal(raw(a.values), raw(b.values))
            and torch.equal(raw(a.last_logits), raw(b.last_logits)))


def run(args, argv=None) -> int:
    for flag in ("conversations", "turns", "turn_tokens"):
        harness.positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    from streaming_trt.contract import Geometry
    from streaming_trt.engine import BatchRunner
    from streaming_trt.serving.store import ConversationStore

    built = harness.build(args, need_tokenizer=False)
    model, c = built.model, built.model.config
    geometry = Geometry(args.sink_tokens, args.window)
    per_token = geometry.cache_bytes(c.num_layers, 1, c.num_kv_heads, c.head_dim, built.dtype) // geometry.capacity
    root = Path(args.dir or tempfile.mkdtemp(prefix="persist-"))
    store = ConversationStore(model, geometry, root / "journal", host_bytes=1 << 40)
    store.journal.compact_ratio = args.compact_ratio
    (root / "full").mkdir(parents=True, exist_ok=True)
    out = harness.out_dir(args, "persist")
    info(f"[persist] {built.source}, S + W = {args.sink_tokens} + {args.window} ({built.dtype}), "
         f"{per_token} K/V bytes per token, whole state {store.journal.snapshot_bytes / 2**20:.1f} MiB; "
         f"{args.conversations} conversations x {args.turns} turns of ~{args.turn_tokens} tokens; "
         f"threads {args.threads}; files in {root}")
    rng = random.Random(args.seed)
    rows = []
    for conv in range(args.conversations):
        cid = conv + 1
        runner, state = BatchRunner(model, geometry, slots=1), None
        runner.reset(0)
        for turn in range(args.turns):
            n = rng.randint(max(1, args.turn_tokens // 2), max(1, args.turn_tokens * 3 // 2))
            runner.prefill(0, [rng.randrange(c.vocab_size) for _ in range(n)])
            state = runner.save(0, into=state)
            row = {"conversation": cid, "turn": turn + 1, "tokens": n, "seen": state.seen}
            ways = ["journal", "full"] if (conv + turn) % 2 == 0 else ["full", "journal"]
            for way in ways:
                wchar, start = write_calls(), time.perf_counter()
                if way == "journal":
                    appended = store.journal.appended
                    store.put(cid, state)
                    store.save(cid)
                    row["journal_record_bytes"] = store.journal.appended - appended
                else:
                    state.save(root / "full" / f"{cid}.session")
                    row["full_bytes"] = (root / "full" / f"{cid}.session").stat().st_size
                row[f"{way}_ms"] = 1e3 * (time.perf_counter() - start)
                row[f"{way}_write_calls"] = write_calls() - wchar
            rows.append(row)
        store.journal.join()
        if not same_state(store.journal.load(cid), state):
            raise AssertionError(f"conversation {cid}: the journal's file does not restore the live state")
    store.journal.join()
    turns = len(rows)
    tokens = sum(r["tokens"] for r in rows)
    journal_total = store.journal.appended + store.journal.compacted
    full_total = sum(r["full_bytes"] for r in rows)
    floor = tokens * per_token / turns  # mean turn tokens x per-token K/V bytes
    summary = {
        "turns": turns, "mean_turn_tokens": tokens / turns, "kv_bytes_per_token": per_token,
        "journal_bytes_per_turn": journal_total / turns, "journal_record_bytes_per_turn": store.journal.appended / turns,
        "journal_compactions": store.journal.compactions, "full_bytes_per_turn": full_total / turns,
        "journal_vs_turn_kv": journal_total / turns / floor, "full_vs_turn_kv": full_total / turns / floor,
        "journal_ms_p50": median([r["journal_ms"] for r in rows]), "full_ms_p50": median([r["full_ms"] for r in rows]),
    }
    info(f"[persist] bytes per turn: journal {summary['journal_bytes_per_turn'] / 2**20:.2f} MiB "
         f"(records {summary['journal_record_bytes_per_turn'] / 2**20:.2f} MiB + {store.journal.compactions} "
         f"compactions) = {summary['journal_vs_turn_kv']:.2f}x the turn's K/V; full rewrite "
         f"{summary['full_bytes_per_turn'] / 2**20:.2f} MiB = {summary['full_vs_turn_kv']:.1f}x")
    info(f"[persist] the turn waits (median): journal {summary['journal_ms_p50']:.1f} ms, full rewrite "
         f"{summary['full_ms_p50']:.1f} ms; restored states equal the live ones bit for bit")
    with open(out / "persist.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    with open(out / "persist_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary))
        w.writeheader()
        w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in summary.items()})
    info(f"[persist] wrote {out / 'persist.csv'} and {out / 'persist_summary.csv'}")
    return 0


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
