"""Decode and prefill attention kernels against torch's scaled_dot_product_attention.

For each point (op, head layout, batch, capacity) every stream's cache is full and its ring has
wrapped (the steady state of a long stream). Three ways to get the same attention are timed:

  triton       streaming_trt.kernels: reads the sink + ring cache in place (keys stored rotated,
               queries rotated twice, nothing rotated in the kernel)
  sdpa         F.scaled_dot_product_attention on the same live keys and values, already gathered
               into token order (what a contiguous cache costs; the gather itself is not timed)
  sdpa+gather  the same, plus the gather into token order done per call in PyTorch

Decode is bandwidth-bound: its achieved bandwidth counts the live keys and values read (plus q and
the output) and is compared with the device's measured copy bandwidth (bytes read + written by a
1 GiB device-to-device copy). Target: >= 80% of it where batch x capacity >= 64k slots, and
faster than sdpa at every point. Prefill (a chunk of --chunk new tokens per stream over the full
cache) reports time and speedups.

On a GPU each call is timed alone with CUDA events, after flushing the L2 cache, and the median is
kept. ``--device cpu`` runs a tiny smoke version under the Triton interpreter (TRITON_INTERPRET=1):
it checks that the script and the comparisons work; its times mean nothing.

Every point also checks the kernel's output against the PyTorch reference (float32, first stream)
and the script exits 1 on a mismatch. The sdpa paths score the sinks with the text-position query
too, which does not change their cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from bench.harness import (CheckFailed, copy_bandwidth, info, int_list, out_dir, resolve_device, resolve_dtype,
                           script_main)
from bench.report import cell, command, markdown_table, write_csv
from streaming_trt.contract import Geometry, UserError

HEADS = {  # name -> (num_heads, num_kv_heads, head_dim)
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "tiny": (4, 2, 64),
}
SINK_TOKENS = 4
COPY_TARGET = 0.80  # decode bandwidth target, fraction of the copy bandwidth
TARGET_SLOTS = 64 * 1024  # ... where batch x capacity reaches this

EPILOG = """examples:
  python -m bench.kernels                       # on a GPU: the full grid of the issue, bfloat16
  python -m bench.kernels --ops decode --batch 1,8 --capacity 4096 --heads llama3-8b
  python -m bench.kernels --device cpu          # smoke run under the Triton interpreter (~1 min)
"""

FIELDS = [
    "op", "heads", "num_heads", "num_kv_heads", "head_dim", "batch", "capacity", "chunk", "dtype",
    "triton_ms", "sdpa_ms", "sdpa_gather_ms", "speedup_vs_sdpa", "speedup_vs_sdpa_gather",
    "bytes", "triton_gbps", "copy_gbps", "pct_of_copy", "meets_target", "max_abs_diff", "note",
]


def arguments(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]; cpu = interpreter smoke run (default: %(default)s)")
    p.add_argument("--ops", default="decode,prefill", help="comma-separated: decode, prefill (default: %(default)s)")
    p.add_argument("--heads", help="comma-separated head layouts from: " + ", ".join(HEADS)
                   + " (default: llama2-7b,llama3-8b on CUDA, tiny on CPU)")
    p.add_argument("--batch", help="comma-separated batch sizes (default: 1,8,64 on CUDA, 1,2 on CPU)")
    p.add_argument("--capacity", help="comma-separated cache capacities, sinks included "
                   "(default: 1024,4096,16384 on CUDA, 64,160 on CPU)")
    p.add_argument("--chunk", type=int, help="new tokens per stream for prefill (default: 512 on CUDA, 16 on CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    p.add_argument("--warmup", type=int, help="untimed calls per method and point (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--iters", type=int, help="timed calls per method and point (default: 20 on CUDA, 2 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help="output folder for kernels.csv and kernels.md (default: runs/kernels/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Inputs and the PyTorch paths
# --------------------------------------------------------------------------------------------------


def live_order(geometry: Geometry, seen: int, device) -> torch.Tensor:
    """Slots of the cache in token order for a stream that stored ``seen >= capacity`` tokens."""
    tokens = geometry.slot_tokens(torch.tensor([seen]))[0]
    return torch.argsort(tokens).to(device)


def sdpa(q, k, v, scale, mask=None):
    """q ``[b, h, n, d]``, k/v ``[b, kvh, m, d]``; grouped-query attention without copying kv."""
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    if group > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Point:
    """One (op, heads, batch, capacity) point: inputs and the three callables.

    The cache holds keys as the runtime stores them (rotated at their text position: random
    vectors stand in for them) and the queries come rotated twice (``q_text``, ``q_rank``), as
    the kernels take them. The sdpa paths score every key with ``q_text``: the same work, exact
    for window keys (softmax does not care about slot order); only the sink scores differ.
    """

    def __init__(self, op, heads, batch, capacity, chunk, dtype, device, seed):
        from streaming_trt import kernels

        num_heads, kv_heads, head_dim = HEADS[heads]
        self.op, self.heads, self.batch, self.capacity, self.chunk = op, heads, batch, capacity, chunk
        self.num_heads, self.kv_heads, self.head_dim, self.dtype = num_heads, kv_heads, head_dim, dtype
        self.geometry = geometry = Geometry(SINK_TOKENS, capacity - SINK_TOKENS)
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

        self.scale = head_dim**-0.5
        self.k_cache = randn(batch, kv_heads, capacity, head_dim)
        self.v_cache = randn(batch, kv_heads, capacity, head_dim)
        # Every stream full, ring wrapped a few times (steady state).
        seen = 3 * capacity + 17
        self.order = live_order(geometry, seen, device)
        if op == "decode":
            self.seen = torch.full((batch,), seen, dtype=torch.int32, device=device)
            self.q_text, self.q_rank = randn(batch, num_heads, head_dim), randn(batch, num_heads, head_dim)
            self.triton = lambda: kernels.decode_attention(self.q_text, self.q_rank, self.k_cache, self.v_cache,
                                                           self.seen, geometry, self.scale, full=True)
        else:
            self.start = torch.full((batch,), seen, dtype=torch.int32, device=device)
            self.lengths = torch.full((batch,), chunk, dtype=torch.int32, device=device)
            self.q_text = randn(batch, chunk, num_heads, head_dim)
            self.q_rank = randn(batch, chunk, num_heads, head_dim)
            self.k = randn(batch, chunk, kv_heads, head_dim)
            self.v = randn(batch, chunk, kv_heads, head_dim)
            self.triton = lambda: kernels.prefill_attention(self.q_text, self.q_rank, self.k, self.v, self.k_cache,
                                                            self.v_cache, self.start, self.lengths, geometry,
                                                            self.scale)
        self.pre = None  # inputs of the "sdpa" path, built outside the timing on first use

    def _gather(self):
        """The live slots in token order (what a cache without a ring layout would hold)."""
        k = self.k_cache.index_select(2, self.order)
        v = self.v_cache.index_select(2, self.order)
        if self.op == "decode":
            return self.q_text.unsqueeze(2), k, v, None
        s, w, n = self.geometry.sink_tokens, self.geometry.window, self.chunk
        dev = k.device
        # Row i sees the sinks, cached window key p (0-based, oldest first) when p >= i + 1, and
        # chunk rows i - w < j <= i.
        rows, p, j = torch.arange(n, device=dev), torch.arange(w, device=dev), torch.arange(n, device=dev)
        see_cache = p.view(1, -1) >= rows.view(-1, 1) + 1
        see_chunk = (j.view(1, -1) <= rows.view(-1, 1)) & (j.view(1, -1) > rows.view(-1, 1) - w)
        mask = torch.cat([torch.ones(n, s, dtype=torch.bool, device=dev), see_cache, see_chunk], 1)
        k = torch.cat([k, self.k.transpose(1, 2)], 2)
        v = torch.cat([v, self.v.transpose(1, 2)], 2)
        return self.q_text.transpose(1, 2), k, v, mask.view(1, 1, n, -1)

    def run_sdpa(self):
        if self.pre is None:
            self.pre = self._gather()
        q, k, v, mask = self.pre
        return sdpa(q, k, v, self.scale, mask)

    def run_sdpa_gather(self):
        q, k, v, mask = self._gather()
        return sdpa(q, k, v, self.scale, mask)

    def live_bytes(self) -> int:
        """Bytes decode must move: live keys and values, q in, output out."""
        e = torch.finfo(self.dtype).bits // 8
        kv = 2 * self.batch * self.kv_heads * self.capacity * self.head_dim * e
        return kv + 2 * self.batch * self.num_heads * self.head_dim * e

    def compare(self) -> float:
        """Max |triton - reference| (the PyTorch reference in float32, first stream only)."""
        from streaming_trt.kernels import reference

        out = self.triton().float()
        f = lambda x: x[:1].float()  # noqa: E731
        if self.op == "decode":
            ref = reference.decode_attention(f(self.q_text), f(self.q_rank), f(self.k_cache), f(self.v_cache),
                                             self.seen[:1], self.geometry, self.scale, full=True)
        else:
            ref = reference.prefill_attention(f(self.q_text), f(self.q_rank), f(self.k), f(self.v), f(self.k_cache),
                                              f(self.v_cache), self.start[:1], self.lengths[:1], self.geometry,
                                              self.scale)
        return (out[:1] - ref).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.flush_buf = torch.empty(max(2 * l2, 256 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn, warmup: int, iters: int) -> float:
        """Median milliseconds of one call."""
        for _ in range(warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            for _ in range(iters):
                self.flush_buf.zero_()  # evict the previous call's data from L2
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        else:
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    head = ["op", "heads", "batch", "capacity", "chunk", "triton ms", "sdpa ms", "sdpa+gather ms", "x sdpa",
            "x sdpa+gather", "GB/s", "% copy", "target"]
    keys = ["op", "heads", "batch", "capacity", "chunk", "triton_ms", "sdpa_ms", "sdpa_gather_ms", "speedup_vs_sdpa",
            "speedup_vs_sdpa_gather", "triton_gbps", "pct_of_copy", "meets_target"]
    return markdown_table(head, ([str(cell(r.get(k), 4)) or "-" for k in keys] for r in rows))


def run(args, argv) -> int:
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        # No triton backend for CPUs: the interpreter, set before the kernels are first imported.
        os.environ["TRITON_INTERPRET"] = "1"
    from streaming_trt import kernels

    if not kernels.triton_available():
        raise UserError("triton is not installed (pip install triton)")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or any(o not in ("decode", "prefill") for o in ops):
        raise UserError(f"--ops takes decode and/or prefill, got {args.ops!r}")
    heads = [h.strip() for h in (args.heads or ("llama2-7b,llama3-8b" if gpu else "tiny")).split(",") if h.strip()]
    if any(h not in HEADS for h in heads):
        raise UserError(f"--heads: choose from {', '.join(HEADS)}, got {args.heads!r}")
    batches = int_list(args.batch or ("1,8,64" if gpu else "1,2"), "--batch")
    capacities = int_list(args.capacity or ("1024,4096,16384" if gpu else "64,160"), "--capacity")
    if min(capacities) <= SINK_TOKENS:
        raise UserError(f"--capacity must exceed the {SINK_TOKENS} sink tokens")
    chunk = args.chunk if args.chunk is not None else (512 if gpu else 16)
    if chunk < 1:
        raise UserError("--chunk must be >= 1")
    dtype = resolve_dtype(args.dtype, device)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    iters = args.iters if args.iters is not None else (20 if gpu else 2)
    if warmup < 0 or iters < 1:
        raise UserError("--warmup must be >= 0 and --iters >= 1")
    out = out_dir(args, "kernels")

    from tqdm import tqdm

    timer = Timer(device)
    copy_bps = copy_bandwidth(device)
    machine = torch.cuda.get_device_name(device) if gpu else f"CPU, Triton interpreter ({os.cpu_count()} cores)"
    info(f"{machine}: copy bandwidth {copy_bps / 1e9:.0f} GB/s")
    points = [(op, h, b, c) for op in ops for h in heads for b in batches for c in capacities]
    rows, failures = [], []
    tol = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    bar = tqdm(points, desc="kernels", unit="pt", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for op, h, b, c in bar:
        bar.set_postfix_str(f"{op} {h} b={b} C={c}")
        row = dict(op=op, heads=h, num_heads=HEADS[h][0], num_kv_heads=HEADS[h][1], head_dim=HEADS[h][2], batch=b,
                   capacity=c, chunk=chunk if op == "prefill" else 1, dtype=str(dtype).removeprefix("torch."),
                   copy_gbps=copy_bps / 1e9)
        try:
            pt = Point(op, h, b, c, chunk, dtype, device, args.seed)
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
            torch.cuda.empty_cache()
            rows.append(row)
            continue
        try:
            row["max_abs_diff"] = diff = pt.compare()
        except torch.cuda.OutOfMemoryError:
            row["max_abs_diff"] = diff = float("nan")
            row["note"] = "check skipped: out of memory"
        if diff == diff and not diff <= tol:
            failures.append(f"{op} {h} b={b} C={c}: the kernel and the PyTorch path differ by {diff:.3g} > {tol:g}")
        notes = []
        for key, fn in (("triton_ms", pt.triton), ("sdpa_ms", pt.run_sdpa), ("sdpa_gather_ms", pt.run_sdpa_gather)):
            try:
                row[key] = timer(fn, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"{key.removesuffix('_ms')}: out of memory")
            pt.pre = None  # the gathered copy is only for "sdpa"
            if gpu:
                torch.cuda.empty_cache()
        row["note"] = "; ".join(([row["note"]] if row.get("note") else []) + notes)
        if "triton_ms" in row:
            for key, name in (("sdpa_ms", "speedup_vs_sdpa"), ("sdpa_gather_ms", "speedup_vs_sdpa_gather")):
                if key in row:
                    row[name] = row[key] / row["triton_ms"]
            if op == "decode":
                row["bytes"] = pt.live_bytes()
                row["triton_gbps"] = pt.live_bytes() / (row["triton_ms"] * 1e-3) / 1e9
                row["pct_of_copy"] = 100 * row["triton_gbps"] * 1e9 / copy_bps
                if b * c >= TARGET_SLOTS:
                    ok = row["pct_of_copy"] >= 100 * COPY_TARGET and row.get("speedup_vs_sdpa", 0) > 1
                    row["meets_target"] = "yes" if ok else "NO"
        del pt
        rows.append(row)
    bar.close()

    write_csv(out / "kernels.csv", rows, FIELDS)
    cmd = command("kernels", argv)
    report = (f"`{cmd}`\n\n- machine: {machine}, torch {torch.__version__}\n"
              f"- copy bandwidth: {copy_bps / 1e9:.0f} GB/s; dtype {row['dtype']}; {SINK_TOKENS} sink tokens; "
              f"median of {iters} calls after {warmup} warm-up\n\n{markdown(rows)}\n")
    (out / "kernels.md").write_text(report)
    print(report)
    info(f"wrote {out / 'kernels.csv'} and {out / 'kernels.md'}")
    if failures:
        raise CheckFailed("; ".join(failures))
    return 0


def main(argv=None) -> int:
    return script_main(arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
