"""StreamEval (StreamingLLM paper, section 4.4 and Table 7), rebuilt from its description (its code
was never released): LongEval-style lines streamed into one cache, with questions along the way.

A sample is one stream: an instruction, then lines ``line i: REGISTER_CONTENT is <n>`` with ``n``
uniform in 1..50000; after every 10th line a question asks for the line ``--distance`` lines back
(20 in the paper). The answer is decoded greedily into the stream itself (it stays in the cache,
as in a conversation), and the last integer of the decoded answer is scored. 100 questions per
sample by default.

Methods: ``dense`` (no eviction; only while the stream fits the model's trained length),
``window`` (0 + cache), ``streaming`` (S + W = cache) and ``recall`` (StreamingLLM + recall of
evicted blocks, ``streaming_trt.Recall``).

The model gate: dense accuracy at distance 20 within the trained length, on ``--gate-queries``
questions, comes first; a model below 70% cannot do the task at all, and is reported as failing the
gate, not scored (SmolLM2-135M fails it). ``--distances 20,40,...`` gives the paper's Table 7:
accuracy by line distance, inside and beyond the cache.

    nice -n 10 python -m bench.streameval --threads 1 --model DIR --distances 20,40,60,80
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

INTRO = ("Below is a record of numbered lines. Every line ends with its REGISTER_CONTENT, a number between angle "
         "brackets. Remember the REGISTER_CONTENT of every line: questions about them will come along the way.\n")
LINE = "line {i}: REGISTER_CONTENT is <{n}>\n"
QUESTION = "Question: what is the REGISTER_CONTENT in line {j}? Answer: the REGISTER_CONTENT in line {j} is <"
METHODS = ("dense", "window", "streaming", "recall")
GATE = 0.7


def stream_events(seed: int, queries: int, distance: int, every: int = 10):
    """``("line", i, n)`` and ``("query", j, n_j)`` in stream order."""
    rng = random.Random(seed)
    values = []
    i = 0
    asked = 0
    while asked < queries:
        n = rng.randint(1, 50000)
        values.append(n)
        yield "line", i, n
        if i % every == every - 1 and i - distance >= 0:
            yield "query", i - distance, values[i - distance]
            asked += 1
        i += 1


def last_int(text: str) -> int | None:
    found = re.findall(r"\d+", text)
    return int(found[-1]) if found else None


def open_session(model, method: str, args):
    import streaming_trt as st

    if method == "dense":
        return model.session(sink_tokens=0, window=model.config.max_position_embeddings or 1 << 20)
    if method == "window":
        return model.session(sink_tokens=0, window=args.cache)
    recall = st.Recall(scorer=args.scorer) if method == "recall" else None
    return model.session(sink_tokens=args.sink_tokens, window=args.cache - args.sink_tokens, recall=recall)


def run_stream(model, tokenizer, method: str, args, seed: int, distance: int, queries: int) -> list[dict]:
    """One sample; for ``dense`` it stops before the stream passes the trained length."""
    limit = model.config.max_position_embeddings or 1 << 62
    s = open_session(model, method, args)
    s.feed(list(tokenizer.encode(INTRO)), all_logits=False)
    rows = []
    pending: list[int] = []
    for kind, i, n in stream_events(seed, queries, distance):
        if kind == "line":
            pending += list(tokenizer.encode(LINE.format(i=i, n=n)))
            continue
        q = list(tokenizer.encode(QUESTION.format(j=i)))
        if method == "dense" and s.seen[0] + len(pending) + len(q) + args.max_answer + 2 > limit:
            break
        s.feed(pending + q, all_logits=False)
        pending = []
        out: list[int] = []
        for _ in range(args.max_answer):  # the answer goes into the stream as it is decoded
            nxt = int(s.last_logits[0].argmax())
            out.append(nxt)
            s.feed([nxt], all_logits=False)
            text = tokenizer.decode(out)
            if ">" in text or "\n" in text:
                break
        got = last_int(tokenizer.decode(out).split(">")[0])
        rows.append(dict(method=method, sample=seed, distance=distance, query=len(rows), line=i, stream_tokens=s.seen[0],
                         answer=got, truth=n, correct=int(got == n)))
        pending = list(tokenizer.encode(">\n")) if ">" not in tokenizer.decode(out) else list(tokenizer.encode("\n"))
    return rows


def accuracy(rows) -> float:
    return sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")


def arguments(argv):
    p = argparse.ArgumentParser(prog="python -m bench.streameval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=1, help="streams per method and distance (default: %(default)s)")
    p.add_argument("--queries", type=int, default=100, help="questions per sample (default: %(default)s)")
    p.add_argument("--distances", default="20", help="lines back each question asks for, comma-separated "
                                                     "(default: %(default)s; the paper's Table 7 varies it)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--cache", type=int, default=512, help="sink tokens + window (default: %(default)s)")
    p.add_argument("--scorer", default="bounds", choices=("bounds", "representative"), help="recall's block scorer")
    p.add_argument("--gate-queries", type=int, default=20,
                   help="dense questions at distance 20 that decide the gate (default: %(default)s)")
    p.add_argument("--gate", type=float, default=GATE,
                   help="the least dense accuracy at distance 20 a model must reach to be scored (default: %(default)s)")
    p.add_argument("--max-answer", type=int, default=10, help="tokens decoded per answer (default: %(default)s)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    args.distances = [int(x) for x in args.distances.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in args.methods) or min(args.samples, args.queries, args.threads) < 1:
        p.error(f"--methods from {', '.join(METHODS)}; --samples, --queries, --threads >= 1")
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    from bench import report
    from streaming_trt.loading.catalog import open_model

    model, tokenizer = open_model(args.model)
    name = args.model or "SmolLM2-135M-Instruct"
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.streameval " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    gate_rows = run_stream(model, tokenizer, "dense", args, seed=0, distance=20, queries=args.gate_queries)
    gate = accuracy(gate_rows)
    print(f"[bench.streameval] gate: dense accuracy at distance 20 = {gate:.2f} on {len(gate_rows)} questions "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    report.write_csv(RESULTS / f"streameval_gate{args.tag}.csv", gate_rows)
    if gate < args.gate:
        text = (f"{cmd}\n\n{name} FAILS the model gate: dense attention answers {sum(r['correct'] for r in gate_rows)} "
                f"of {len(gate_rows)} questions at distance 20 ({gate:.0%} < {args.gate:.0%}) within its trained length, so "
                f"it cannot do the task with every token visible and its StreamEval accuracy is not scored.")
        (RESULTS / f"streameval{args.tag}.md").write_text(text + "\n")
        print(text)
        return 0
    rows = []
    for distance in args.distances:
        for method in args.methods:
            for sample in range(args.samples):
                rows += run_stream(model, tokenizer, method, args, seed=1 + sample, distance=distance, queries=args.queries)
                print(f"[bench.streameval] {method} distance {distance} sample {sample}: "
                      f"{accuracy([r for r in rows if r['method'] == method and r['distance'] == distance]):.2f}",
                      file=sys.stderr, flush=True)
                report.write_csv(RESULTS / f"streameval{args.tag}.csv", rows)
    table = report.markdown_table(
        ["method"] + [f"{d} lines back" for d in args.distances],
        [[m] + [f"{accuracy([r for r in rows if r['method'] == m and r['distance'] == d]):.2f}" for d in args.distances]
         for m in args.methods])
    quarters = []
    for m in args.methods:
        mine = [r for r in rows if r["method"] == m and r["distance"] == args.distances[0]]
        q = max(1, args.queries // 4)
        quarters.append([m] + [f"{accuracy([r for r in mine if lo <= r['query'] < lo + q]):.2f}"
                               for lo in range(0, args.queries, q)][:4])
    along = report.markdown_table(["method", "questions 1-25%", "25-50%", "50-75%", "75-100%"], quarters)
    text = (f"{cmd}\n\n{name}: gate passed (dense {gate:.2f} at distance 20). Cache {args.sink_tokens}+"
            f"{args.cache - args.sink_tokens}; dense stops at the trained length.\n\nAccuracy by line distance "
            f"(Table 7):\n\n{table}\n\nAlong the stream (distance {args.distances[0]}):\n\n{along}\n")
    (RESULTS / f"streameval{args.tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
