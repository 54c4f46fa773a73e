"""The batched decode step, operator by operator: where a CPU spends one step of N streams.

A session of ``--rows`` streams holds ragged prompts (stream i: ``--prompt-tokens`` + 6 i tokens,
as the rows of a serving pool at different points of their turns), then decode steps of one token
per stream are timed (wall and the thread's CPU time, medians) and profiled with
``torch.profiler``: self time per operator per step, its share and its calls per step. One stream
is timed the same way for the ratio.

    python -m bench.step_profile --model smollm2 --threads 1 --rows 16

Writes step_profile.csv (the operator table) to --out (default runs/step_profile/).
"""
from __future__ import annotations

import csv
import statistics
import sys
import time

from bench import harness
from bench.harness import info


def arguments(argv=None):
    p = harness.parser("step_profile", __doc__)
    g = p.add_argument_group("step")
    g.add_argument("--rows", type=int, default=16, help="streams decoded together (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=40, help="tokens of the shortest stream (default: %(default)s)")
    g.add_argument("--steps", type=int, default=10, help="decode steps timed and profiled (default: %(default)s)")
    g.add_argument("--top", type=int, default=12, help="operators listed (default: %(default)s)")
    g.add_argument("--sink-tokens", type=int, default=4, help="S (default: %(default)s)")
    g.add_argument("--window", type=int, default=252, help="W (default: %(default)s)")
    return p.parse_args(argv)


def _session(model, rows: int, args):
    import torch

    session = model.session(sink_tokens=args.sink_tokens, window=args.window, batch=rows, max_chunk=64)
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(model.config.vocab_size, 1000)
    session.feed([torch.randint(0, vocab, (args.prompt_tokens + 6 * i,), generator=g).tolist() for i in range(rows)],
                 all_logits=False)
    return session, torch.randint(0, vocab, (rows, 1), generator=g)


def _timed(session, token, steps: int) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds of a decode step."""
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.thread_time()
        session.feed(token, all_logits=False)
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def run(args, argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    for name in ("--rows", "--prompt-tokens", "--steps", "--top"):
        harness.positive(name, getattr(args, name[2:].replace("-", "_")))
    built = harness.build(args, need_tokenizer=False)
    out = harness.out_dir(args, "step_profile")
    info(f"[step_profile] {built.source} on {built.device} ({built.dtype}), S + W = {args.sink_tokens} + "
         f"{args.window}, threads {args.threads}")
    times = {}
    for rows in sorted({1, args.rows}):
        session, token = _session(built.model, rows, args)
        _timed(session, token, 2)  # warm-up
        times[rows] = _timed(session, token, args.steps)
        info(f"[step_profile] {rows:3d} rows: step {times[rows][0]:7.1f} ms wall, {times[rows][1]:7.1f} ms thread CPU")
    info(f"[step_profile] {args.rows} rows / 1 row: {times[args.rows][0] / times[1][0]:.2f}x wall, "
         f"{times[args.rows][1] / times[1][1]:.2f}x thread CPU")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            session.feed(token, all_logits=False)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    table = [{"operator": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
              "share": e.self_cpu_time_total / total, "calls_per_step": e.count / args.steps} for e in events]
    info(f"[step_profile] {args.rows} rows, self time {total / 1e3 / args.steps:.1f} ms per step (profiled):")
    for r in table[: args.top]:
        info(f"  {r['operator']:28s} {r['ms_per_step']:8.2f} ms {100 * r['share']:5.1f}%  {r['calls_per_step']:6.1f} calls")
    with open(out / "step_profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in table])
    info(f"[step_profile] wrote {out / 'step_profile.csv'}")
    return 0


def main(argv=None) -> int:
    return harness.script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
