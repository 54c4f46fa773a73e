"""Pass-key retrieval: a 5-digit key hidden D tokens before the question, for dense attention,
window attention, StreamingLLM and StreamingLLM + recall (``streaming_trt.runtime.recall``).

The filler is this benchmark's own: sentences drawn by a seeded grammar (:func:`filler`), about
nothing in particular. Each trial is one stream: an instruction, some filler, the key sentence, then
filler up to the farthest distance; at each distance D the stream is forked, the question is fed so
that its last token lies D tokens after the key sentence's first, and up to 8 tokens are decoded
greedily; the first integer of the answer is scored. Dense attention is run only where the whole
prompt fits the model's trained length.

``--latency`` times decode steps of plain StreamingLLM and of recall (each scorer) at the same
cache, interleaved step by step after a common stream, and reports medians and memory (device-side
cache bytes, host block-store bytes).

    nice -n 10 python -m bench.passkey --threads 1 --trials 4
    nice -n 10 python -m bench.passkey --threads 1 --latency
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

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"

_WORDS = dict(
    who=["the farmer", "a small dog", "my neighbour", "the old clock", "a red bus", "the teacher", "a quiet river",
         "the baker", "an empty boat", "the green kite", "a tall tree", "the postman", "a wooden chair"],
    did=["walks past", "looks at", "waits near", "sings about", "rolls toward", "paints", "forgets", "carries",
         "follows", "hides behind", "leans on", "talks to", "dreams of"],
    what=["the hill", "a yellow door", "the market", "some apples", "the bridge", "a paper map", "the garden",
          "an open window", "the station", "a basket of bread", "the lake", "a blue cup", "the long road"],
    when=["in the morning", "after lunch", "every Sunday", "at noon", "before the rain", "late at night",
          "in spring", "on a cold day", "now and then", "all afternoon"],
)


def filler(rng: random.Random, sentences: int) -> str:
    """``sentences`` sentences of the benchmark's own irrelevant text."""
    out = []
    for _ in range(sentences):
        w = {k: rng.choice(v) for k, v in _WORDS.items()}
        form = rng.randrange(3)
        if form == 0:
            s = f"{w['who']} {w['did']} {w['what']} {w['when']}."
        elif form == 1:
            s = f"{w['when']}, {w['who']} {w['did']} {w['what']}."
        else:
            s = f"{w['who']} {w['did']} {w['what']}, and {rng.choice(_WORDS['who'])} {rng.choice(_WORDS['did'])} it too."
        out.append(s[0].upper() + s[1:])
    return " ".join(out)


def filler_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(" " + filler(rng, 40))
    return ids[:n]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


# -- forking a session ---------------------------------------------------------------------------

def snapshot(session) -> dict:
    c = session.cache
    state = dict(keys=c.keys.clone(), values=c.values.clone(), seen=c.seen.clone(), seen_host=list(c.seen_host),
                 last=None if session.last_logits is None else session.last_logits.clone())
    if session.recall is not None:
        state["recall"] = session.recall.state()
    return state


def restore(session, state: dict) -> None:
    c = session.cache
    c.keys.copy_(state["keys"])
    c.values.copy_(state["values"])
    c.seen.copy_(state["seen"])
    c.seen_host = list(state["seen_host"])
    session.last_logits = None if state["last"] is None else state["last"].clone()
    if session.recall is not None:
        session.recall.load_state(state["recall"])


def answer(session, tokenizer, question: list[int], max_new: int = 8) -> str:
    session.feed(question, all_logits=False)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(session.last_logits[0].argmax())
        out.append(nxt)
        text = tokenizer.decode(out)
        if re.search(r"\d+\D", text) or "\n" in text.strip(" "):
            break
        session.feed([nxt], all_logits=False)
    return tokenizer.decode(out)


def first_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


# -- methods -----------------------------------------------------------------------------------

METHODS = ("streaming", "recall-bounds", "recall-representative", "dense", "window")


def open_session(model, method: str, args, total: int):
    import streaming_trt as st

    sinks, cache = args.sink_tokens, args.cache
    if method == "dense":
        return model.session(sink_tokens=0, window=total + 16)
    if method == "window":
        return model.session(sink_tokens=0, window=cache)
    if method == "streaming":
        return model.session(sink_tokens=sinks, window=cache - sinks)
    scorer = method.split("-", 1)[1]
    recall = st.Recall(block_size=args.block_size, top_k=args.top_k, scorer=scorer, positions=args.positions)
    return model.session(sink_tokens=sinks, window=cache - sinks, recall=recall)


def run_accuracy(model, tokenizer, args, save=None) -> list[dict]:
    """Every trial and method; ``save(rows)`` after each (so a bounded run leaves its figures)."""
    limit = model.config.max_position_embeddings or 1 << 62
    rows = []
    needle_len = len(_encode(tokenizer, NEEDLE.format(key=12345)))
    q_ids = _encode(tokenizer, QUESTION)
    for trial in range(args.first_trial, args.first_trial + args.trials):
        rng = random.Random(1000 + trial)
        key = rng.randrange(10000, 100000)
        needle = _encode(tokenizer, NEEDLE.format(key=key))
        head = _encode(tokenizer, INTRO) + filler_ids(tokenizer, rng, args.prefix)
        longest = max(args.distances)
        body = filler_ids(tokenizer, rng, longest)
        for method in args.methods:
            cuts = [d - len(needle) - len(q_ids) for d in sorted(args.distances)]
            total = len(head) + len(needle) + max(cuts) + len(q_ids) + 8
            if method == "dense" and total > limit:
                cuts = [c for c in cuts if len(head) + len(needle) + c + len(q_ids) + 8 <= limit]
                total = len(head) + len(needle) + max(cuts, default=0) + len(q_ids) + 8
            if not cuts:
                continue
            t0 = time.perf_counter()
            s = open_session(model, method, args, total)
            s.feed(head + needle, all_logits=False)
            fed = 0
            for cut in cuts:
                if cut > fed:
                    s.feed(body[fed:cut], all_logits=False)
                    fed = cut
                state = snapshot(s)
                text = answer(s, tokenizer, q_ids)
                restore(s, state)
                got = first_int(text)
                d = cut + len(needle) + len(q_ids)
                rows.append(dict(method=method, distance=d, trial=trial, key=key, answer=got, correct=int(got == key),
                                 text=text.strip().replace("\n", " ")))
                print(f"trial {trial} {method:22s} D={d:5d} key={key} got={got} {'ok' if got == key else '--'}",
                      file=sys.stderr, flush=True)
            print(f"  [{method} trial {trial}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
            del s
            if save is not None:
                save(rows)
    return rows


def summarize(rows: list[dict], distances: list[int], methods) -> tuple[str, list[dict]]:
    from bench import report

    table, out = [], []
    for m in methods:
        line = [m]
        for d in distances:
            hits = [r["correct"] for r in rows if r["method"] == m and r["distance"] == d]
            line.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
            if hits:
                out.append(dict(method=m, distance=d, trials=len(hits), correct=sum(hits), accuracy=sum(hits) / len(hits)))
        table.append(line)
    return report.markdown_table(["method"] + [f"D={d}" for d in distances], table), out


def plot(summary: list[dict], methods, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    looks = ["o-", "s--", "^-.", "D:", "v-"]
    for i, m in enumerate(methods):  # nudged apart vertically: equal accuracies would hide each other
        pts = sorted((r["distance"], r["accuracy"] + 0.012 * (i - len(methods) / 2)) for r in summary if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), looks[i % len(looks)], label=m, ms=5)
    ax.axvline(args.cache, color="grey", ls=":", lw=1)
    ax.text(args.cache, 0.02, f" cache {args.sink_tokens}+{args.cache - args.sink_tokens}", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens from the key sentence to the question")
    ax.set_ylabel("pass-key accuracy")
    ax.set_ylim(-0.03, 1.03)
    trials = max((r["trials"] for r in summary), default=0)
    ax.set_title(f"Pass key, {args.model or 'SmolLM2-135M-Instruct'}, up to {trials} keys per point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- latency -----------------------------------------------------------------------------------

def run_latency(model, tokenizer, args) -> list[dict]:
    import streaming_trt as st

    rng = random.Random(7)
    ids = filler_ids(tokenizer, rng, args.latency_stream + args.steps + 8)
    sessions = {"streaming": model.session(sink_tokens=args.sink_tokens, window=args.cache - args.sink_tokens)}
    for scorer in ("bounds", "representative"):
        recall = st.Recall(block_size=args.block_size, top_k=args.top_k, scorer=scorer)
        sessions[f"recall-{scorer}"] = model.session(sink_tokens=args.sink_tokens, window=args.cache - args.sink_tokens,
                                                     recall=recall)
    for s in sessions.values():
        s.feed(ids[: args.latency_stream], all_logits=False)
    times = {m: [] for m in sessions}
    for i in range(args.steps):  # interleaved: one step of each, in turn
        tok = [ids[args.latency_stream + i]]
        for m, s in sessions.items():
            t0 = time.perf_counter()
            s.feed(tok, all_logits=False)
            times[m].append(time.perf_counter() - t0)
    rows = []
    for m, s in sessions.items():
        t = sorted(times[m])
        med = t[len(t) // 2]
        device = s.cache.nbytes() + (s.recall.device_bytes() if s.recall is not None else 0)
        host = s.recall.nbytes() if s.recall is not None else 0
        rows.append(dict(method=m, stream=args.latency_stream + args.steps, steps=args.steps, median_ms=med * 1e3,
                         p10_ms=t[len(t) // 10] * 1e3, p90_ms=t[9 * len(t) // 10] * 1e3, device_bytes=device,
                         host_bytes=host, threads=torch.get_num_threads()))
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio"] = r["median_ms"] / base
    return rows


def arguments(argv):
    p = argparse.ArgumentParser(prog="python -m bench.passkey", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--trials", type=int, default=4, help="streams (keys) per method (default: %(default)s)")
    p.add_argument("--first-trial", type=int, default=0, help="seed of the first trial (to extend a run) (default: %(default)s)")
    p.add_argument("--distances", default="256,1024,1536,2048,3072,4096",
                   help="tokens from the key sentence to the question, comma-separated (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--cache", type=int, default=512, help="sink tokens + window of every cache but dense (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--positions", default="rank", choices=("rank", "fixed"),
                   help="recall's position rule: the contract's ranks, or InfLLM's one distance (default: %(default)s)")
    p.add_argument("--prefix", type=int, default=100, help="filler tokens before the key sentence (default: %(default)s)")
    p.add_argument("--latency", action="store_true", help="time decode steps instead of scoring accuracy")
    p.add_argument("--latency-stream", type=int, default=3000, help="tokens fed before timing (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="decode steps timed per method (default: %(default)s)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--replot", metavar="CSV,...", help="no run: merge these trial files (passkey_trials*.csv) into "
                                                        "the table, CSV and plot")
    args = p.parse_args(argv)
    args.distances = sorted(int(x) for x in args.distances.split(","))
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or args.trials < 1 or args.threads < 1 or args.cache <= args.sink_tokens:
        p.error(f"unknown methods {bad}" if bad else "--trials, --threads >= 1 and --cache > --sink-tokens")
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    from bench import report

    if args.replot:
        import csv

        rows = [dict(r, distance=int(r["distance"]), correct=int(r["correct"]))
                for f in args.replot.split(",") for r in csv.DictReader(open(f))]
        distances = sorted({r["distance"] for r in rows})
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        table, summary = summarize(rows, distances, methods)
        report.write_csv(RESULTS / f"passkey{args.tag}.csv", summary)
        plot(summary, methods, args, RESULTS / f"passkey{args.tag}.png")
        (RESULTS / f"passkey{args.tag}.md").write_text(f"merged from {args.replot}\n\n{table}\n")
        print(table)
        return 0
    from streaming_trt.loading.catalog import open_model

    model, tokenizer = open_model(args.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = "python -m bench.passkey " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.latency:
        rows = run_latency(model, tokenizer, args)
        report.write_csv(RESULTS / f"passkey_latency{args.tag}.csv", rows)
        table = report.markdown_table(
            ["method", "median ms/token", "p10-p90 ms", "x streaming", "device cache bytes", "host store bytes"],
            [[r["method"], f"{r['median_ms']:.1f}", f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}", f"{r['ratio']:.2f}",
              report.human_bytes(r["device_bytes"]), report.human_bytes(r["host_bytes"])] for r in rows])
        print(f"{cmd}\n{torch.get_num_threads()} torch thread(s); {args.steps} decode steps each, interleaved, "
              f"after {args.latency_stream} tokens\n\n{table}")
        return 0
    def save(rows):
        report.write_csv(RESULTS / f"passkey_trials{args.tag}.csv", rows)
        table, summary = summarize(rows, args.distances, args.methods)
        report.write_csv(RESULTS / f"passkey{args.tag}.csv", summary)
        plot(summary, args.methods, args, RESULTS / f"passkey{args.tag}.png")
        (RESULTS / f"passkey{args.tag}.md").write_text(f"{cmd}\n\n{table}\n")
        return table

    rows = run_accuracy(model, tokenizer, args, save)
    table = save(rows)
    print(f"{cmd}\ncache {args.sink_tokens}+{args.cache - args.sink_tokens}, recall B={args.block_size} k={args.top_k}; "
          f"{args.trials} trials\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
