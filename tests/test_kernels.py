"""Triton kernels against the float64 PyTorch references (``streaming_trt.kernels.reference``).

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with a
GPU the same tests run natively, and the whole grid runs in float16 and bfloat16 as well.

Every comparison feeds the reference the very inputs the kernel got (rounded to the kernel's
dtype, then widened to float64, with the rotary table the kernel used) so that the difference is
the kernel's arithmetic alone. Unwritten cache slots hold NaN, which must never leak.

Tolerances, on max |kernel - reference| over outputs of size ~1 (values and q/k ~ N(0, 1),
sm_scale = head_dim ** -0.5):

* float32: 1e-4 absolute + 1e-4 relative (tf32x3 dots on a GPU; ~1e-6 is typical);
* float16: 4e-3 + 4e-3 (rotated q/k and the probabilities are rounded to float16 for tl.dot);
* bfloat16: 2e-2 + 2e-2 (the same in bfloat16, 8x coarser; under the interpreter bfloat16 is
  upcast to float32 in the kernel and only the output is rounded).

A wrong position, a leaked NaN, a missed or extra key, or a lost sink logit all give errors of
order 0.1 to 1 at these sizes.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import zlib

import pytest
import torch

from streaming_trt.kernels import reference as R

triton = pytest.importorskip("triton")

import streaming_trt.kernels as K  # noqa: E402
from streaming_trt.kernels import _common  # noqa: E402
from streaming_trt.kernels import decode as decode_mod  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _version(text: str) -> tuple[int, int]:
    return tuple(int(x) for x in text.split(".")[:2])


# triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them for loop
# bounds, which numpy >= 2.4 refuses; the kernels themselves build and run on 3.6 GPUs.
pytestmark = pytest.mark.skipif(
    not ON_GPU and _version(triton.__version__) < (3, 7) and _version(__import__("numpy").__version__) >= (2, 4),
    reason="triton < 3.7's CPU interpreter does not work with numpy >= 2.4 (use triton >= 3.7 or a GPU)",
)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# The whole grid in every dtype on a GPU; on CPU float32 plus dedicated 16-bit cases.
GRID_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32,)
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs natively there)")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def rope(num_positions: int, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables ``[num_positions, rotary_dim // 2]`` (what a runtime would pass)."""
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def randn(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(DEVICE)


def nan_cache(batch, kv_heads, sink_tokens, window, head_dim, stored, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random k/v caches holding ``stored[b]`` tokens per stream; unwritten slots are NaN."""
    capacity = sink_tokens + window
    written = R.slot_tokens(stored.cpu(), sink_tokens, window) >= 0
    mask = written.view(batch, 1, capacity, 1).to(DEVICE)
    nan = torch.full((), float("nan"), dtype=dtype, device=DEVICE)
    k = torch.where(mask, randn(batch, kv_heads, capacity, head_dim, dtype=dtype), nan)
    v = torch.where(mask, randn(batch, kv_heads, capacity, head_dim, dtype=dtype), nan)
    return k, v


def f64(x):
    return None if x is None else x.double()


def seed_of(*case) -> int:
    """A seed fixed by the test case (str hashes change from run to run)."""
    return zlib.crc32(repr(case).encode())


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.dtype == dtype, (out.dtype, dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output"
    tol = TOL[dtype]
    err = (out.double() - ref).abs()
    bound = tol + tol * ref.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds {tol:g} abs + {tol:g} rel"


def stream_lengths(sink_tokens: int, window: int) -> list[int]:
    """Tokens stored per stream (>= 1): shorter than the sinks, around and at capacity, one past it
    and many times past it (the ring wraps several times)."""
    c = sink_tokens + window
    seen = {1, max(sink_tokens - 1, 1), sink_tokens + 1, c - 1, c, c + 1, 2 * c + 3, 7 * c + 5}
    return sorted(seen)


HEADS = {  # GQA ratio -> (num_heads, num_kv_heads)
    "mha": (4, 4),
    "gqa4": (8, 2),
    "gqa8": (16, 2),
    "mqa": (20, 1),  # 20 query heads share one KV head: two head blocks of BLOCK_G = 16
}


# --------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------


def run_decode(seen, sink_tokens, window, heads, head_dim, dtype, rotary_dim=None, with_sink_logits=False):
    num_heads, kv_heads = HEADS[heads] if isinstance(heads, str) else heads
    seen = torch.tensor(seen, dtype=torch.int64, device=DEVICE)
    batch = seen.numel()
    capacity = sink_tokens + window
    cos, sin = rope(capacity + 3, rotary_dim or head_dim)
    k_cache, v_cache = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, seen, dtype)
    q = randn(batch, num_heads, head_dim, dtype=dtype)
    sinks = randn(num_heads, dtype=torch.float32) if with_sink_logits else None
    scale = head_dim**-0.5
    out = K.decode_attention(q, k_cache, v_cache, seen, cos, sin, sink_tokens, window, scale, sinks)
    ref = R.decode_attention(f64(q), f64(k_cache), f64(v_cache), seen, f64(cos), f64(sin), sink_tokens, window,
                             scale, f64(sinks))
    return out, ref


DECODE_GRID = [
    (s, w, heads, d)
    for (s, w), heads, d in itertools.product([(0, 5), (1, 13), (4, 6)], HEADS, (64, 80, 128))
]


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=str)
@pytest.mark.parametrize("sink_tokens,window,heads,head_dim", DECODE_GRID)
def test_decode_grid(sink_tokens, window, heads, head_dim, dtype):
    torch.manual_seed(seed_of(sink_tokens, window, heads, head_dim))
    with_logits = (sink_tokens + head_dim // 16 + len(heads)) % 2 == 0  # half the cases, mixed over the grid
    seen = stream_lengths(sink_tokens, window)
    out, ref = run_decode(seen, sink_tokens, window, heads, head_dim, dtype, with_sink_logits=with_logits)
    check(out, ref, dtype, f"decode S={sink_tokens} W={window} {heads} D={head_dim} logits={with_logits}")


@pytest.mark.parametrize("with_sink_logits", [False, True])
def test_decode_long_cache_split(monkeypatch, with_sink_logits):
    """Capacity over several key tiles, cut into several splits (flash-decoding) plus the reduce."""
    monkeypatch.setattr(_common, "CPU_SM_COUNT", 64)
    monkeypatch.setattr(decode_mod, "SPLIT_MIN_TILES", 1)
    sink_tokens, window = 4, 196
    block_n = decode_mod._main_config(torch.float32, 128, False).constexprs["BLOCK_N"]
    num_splits, _ = decode_mod.plan_splits(3 * 2, sink_tokens + window, block_n, 64)
    assert num_splits >= 3
    torch.manual_seed(1)
    # Streams end before, inside and after the first split, at capacity and far past it.
    seen = [2, 70, 150, 200, 201, 1234]
    out, ref = run_decode(seen, sink_tokens, window, (8, 2), 128, torch.float32, with_sink_logits=with_sink_logits)
    check(out, ref, torch.float32, "split decode")


def test_decode_long_cache_no_split():
    torch.manual_seed(2)
    seen = [3, 100, 133, 134, 135, 999]
    out, ref = run_decode(seen, 1, 133, (4, 1), 64, torch.float32, with_sink_logits=True)
    check(out, ref, torch.float32, "multi-tile decode")


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (80, 32), (128, 64), (96, 96), (256, 256), (16, 16)])
def test_decode_head_dims_and_partial_rotary(head_dim, rotary_dim):
    torch.manual_seed(head_dim + rotary_dim)
    seen = stream_lengths(4, 7)
    out, ref = run_decode(seen, 4, 7, (8, 2), head_dim, torch.float32, rotary_dim=rotary_dim, with_sink_logits=True)
    check(out, ref, torch.float32, f"decode D={head_dim} rot={rotary_dim}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sink_tokens,window,heads,head_dim", [(4, 9, "gqa4", 128), (1, 5, "mha", 80), (0, 6, "mqa", 64)])
def test_decode_16bit(sink_tokens, window, heads, head_dim, dtype):
    torch.manual_seed(7)
    out, ref = run_decode(stream_lengths(sink_tokens, window), sink_tokens, window, heads, head_dim, dtype,
                          with_sink_logits=sink_tokens == 4)
    check(out, ref, dtype, f"decode {dtype}")


def test_decode_strided_views():
    """A per-layer view of a stacked cache, q sliced out of a fused qkv projection, a strided
    int32 ``seen`` (int64 ones, read in place through their low words, are the default elsewhere)."""
    torch.manual_seed(3)
    sink_tokens, window, head_dim, num_heads, kv_heads = 2, 9, 64, 8, 2
    seen = torch.tensor([1, 5, 11, 12, 40], device=DEVICE)
    batch = seen.numel()
    k_layer, v_layer = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, seen, torch.float32)
    stacked = torch.full((3, 2, batch, kv_heads, sink_tokens + window, head_dim), float("nan"), device=DEVICE)
    stacked[1, 0], stacked[1, 1] = k_layer, v_layer
    qkv = randn(batch, num_heads + 2 * kv_heads, head_dim, dtype=torch.float32)
    q = qkv[:, :num_heads]
    cos, sin = rope(40, head_dim)
    seen_i32_strided = torch.stack([seen, seen * 0], 1).to(torch.int32)[:, 0]  # every other int32
    out = K.decode_attention(q, stacked[1, 0], stacked[1, 1], seen_i32_strided, cos, sin, sink_tokens, window, 0.1)
    ref = R.decode_attention(f64(q), f64(k_layer), f64(v_layer), seen, f64(cos), f64(sin), sink_tokens, window, 0.1)
    check(out, ref, torch.float32, "strided decode")


# --------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------


def run_prefill(start, lengths, chunk, sink_tokens, window, heads, head_dim, dtype, rotary_dim=None,
                with_sink_logits=False):
    num_heads, kv_heads = HEADS[heads] if isinstance(heads, str) else heads
    start = torch.tensor(start, dtype=torch.int64, device=DEVICE)
    lengths = torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    batch = start.numel()
    capacity = sink_tokens + window
    cos, sin = rope(max(capacity, window + chunk - 1), rotary_dim or head_dim)
    k_cache, v_cache = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, start, dtype)
    q = randn(batch, chunk, num_heads, head_dim, dtype=dtype)
    k = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    v = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    sinks = randn(num_heads, dtype=torch.float32) if with_sink_logits else None
    scale = head_dim**-0.5
    out = K.prefill_attention(q, k, v, k_cache, v_cache, start, lengths, cos, sin, sink_tokens, window, scale, sinks)
    ref = R.prefill_attention(f64(q), f64(k), f64(v), f64(k_cache), f64(v_cache), start, lengths, f64(cos), f64(sin),
                              sink_tokens, window, scale, f64(sinks))
    return out, ref


def prefill_streams(sink_tokens: int, window: int, chunk: int) -> tuple[list[int], list[int]]:
    """(start, lengths): empty cache, fewer tokens than the sinks, around capacity, far past it;
    full chunks, right-padded ones and one with no token at all."""
    c = sink_tokens + window
    start = [0, max(sink_tokens - 1, 0), c - 1, c, c + 1, 5 * c + 2]
    lengths = [chunk, max(chunk - 2, 1), chunk, max(chunk // 2, 1), chunk, 0 if chunk > 1 else 1]
    return start, lengths


PREFILL_GRID = []
for (s, w), chunk_kind, (heads, d) in itertools.product(
    [(0, 5), (1, 13), (4, 6)],
    ["1", "7", ">window"],
    [("mha", 64), ("gqa4", 80), ("gqa8", 128), ("mqa", 64)],
):
    chunk = {"1": 1, "7": 7, ">window": 2 * w + 3}[chunk_kind]
    PREFILL_GRID.append((s, w, chunk, heads, d))
# The full product is 36 cases; keep half: each (sinks, chunk) pair with two head layouts, in turn
# {mha, gqa8} and {gqa4, mqa}, so that every layout still meets every sink count and chunk kind.
PREFILL_GRID = [case for i, case in enumerate(PREFILL_GRID) if (i // 4 + i % 4) % 2 == 0]


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=str)
@pytest.mark.parametrize("sink_tokens,window,chunk,heads,head_dim", PREFILL_GRID)
def test_prefill_grid(sink_tokens, window, chunk, heads, head_dim, dtype):
    torch.manual_seed(seed_of(sink_tokens, window, chunk, heads, head_dim))
    with_logits = (chunk + sink_tokens) % 2 == 1
    start, lengths = prefill_streams(sink_tokens, window, chunk)
    out, ref = run_prefill(start, lengths, chunk, sink_tokens, window, heads, head_dim, dtype,
                           with_sink_logits=with_logits)
    check(out, ref, dtype, f"prefill S={sink_tokens} W={window} n={chunk} {heads} D={head_dim} logits={with_logits}")


def test_prefill_long_chunk_many_blocks():
    """A chunk over several query blocks and key tiles, much longer than the window."""
    torch.manual_seed(4)
    sink_tokens, window, chunk = 4, 13, 150
    out, ref = run_prefill([0, 3, 17, 60], [150, 149, 130, 71], chunk, sink_tokens, window, (4, 2), 64,
                           torch.float32, with_sink_logits=True)
    check(out, ref, torch.float32, "long prefill")


def test_prefill_window_over_tiles():
    """A ring longer than one key tile, chunk shorter than the window."""
    torch.manual_seed(5)
    sink_tokens, window, chunk = 1, 100, 20
    out, ref = run_prefill([0, 1, 60, 100, 101, 333], [20, 20, 5, 20, 19, 20], chunk, sink_tokens, window,
                           (2, 1), 64, torch.float32)
    check(out, ref, torch.float32, "wide-window prefill")


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (80, 32), (128, 64), (96, 96), (256, 256), (16, 16)])
def test_prefill_head_dims_and_partial_rotary(head_dim, rotary_dim):
    torch.manual_seed(head_dim * 3 + rotary_dim)
    start, lengths = prefill_streams(4, 6, 7)
    out, ref = run_prefill(start, lengths, 7, 4, 6, (4, 2), head_dim, torch.float32, rotary_dim=rotary_dim,
                           with_sink_logits=True)
    check(out, ref, torch.float32, f"prefill D={head_dim} rot={rotary_dim}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sink_tokens,window,chunk,heads,head_dim", [(4, 6, 15, "gqa4", 128), (1, 13, 7, "mha", 80)])
def test_prefill_16bit(sink_tokens, window, chunk, heads, head_dim, dtype):
    torch.manual_seed(8)
    start, lengths = prefill_streams(sink_tokens, window, chunk)
    out, ref = run_prefill(start, lengths, chunk, sink_tokens, window, heads, head_dim, dtype,
                           with_sink_logits=sink_tokens == 4)
    check(out, ref, dtype, f"prefill {dtype}")


def test_prefill_rejects_short_rotary_table():
    q = torch.zeros(1, 9, 2, 64, device=DEVICE)
    kv = torch.zeros(1, 9, 2, 64, device=DEVICE)
    cache = torch.zeros(1, 2, 8, 64, device=DEVICE)
    cos, sin = rope(8 + 4, 64)  # window 6 + chunk 9 - 1 = 14 positions needed
    with pytest.raises(ValueError, match="positions"):
        K.prefill_attention(q, kv, kv, cache, cache, torch.zeros(1, dtype=torch.int32, device=DEVICE),
                            torch.full((1,), 9, dtype=torch.int32, device=DEVICE), cos, sin, 2, 6, 0.1)


# --------------------------------------------------------------------------------------------------
# Cache write
# --------------------------------------------------------------------------------------------------


def same_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sink_tokens,window", [(0, 5), (1, 13), (4, 6)])
@pytest.mark.parametrize("chunk_kind", ["1", "7", ">window"])
def test_cache_write(sink_tokens, window, chunk_kind, dtype):
    torch.manual_seed(sink_tokens * 100 + window)
    chunk = {"1": 1, "7": 7, ">window": 3 * window + 2}[chunk_kind]
    start, lengths = prefill_streams(sink_tokens, window, chunk)
    start = torch.tensor(start, device=DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)
    batch, kv_heads, head_dim = start.numel(), 3, 80
    k_cache, v_cache = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, start, dtype)
    k = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    v = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    R.cache_write(k, v, k_ref, v_ref, start, lengths, sink_tokens, window)
    K.cache_write(k, v, k_cache, v_cache, start, lengths, sink_tokens, window)
    assert same_with_nan(k_cache, k_ref) and same_with_nan(v_cache, v_ref)


def test_cache_write_converts_dtype_and_strides():
    """float32 keys into a bfloat16 per-layer view; the rest of the buffer stays untouched."""
    torch.manual_seed(6)
    sink_tokens, window, kv_heads, head_dim = 4, 6, 2, 64
    start = torch.tensor([0, 3, 9, 25], device=DEVICE)
    lengths = torch.tensor([9, 2, 9, 5], device=DEVICE)
    buf = randn(2, 4, kv_heads, sink_tokens + window, head_dim, dtype=torch.bfloat16)
    before = buf.clone()
    k = randn(4, 9, kv_heads, head_dim, dtype=torch.float32)
    v = randn(4, 9, kv_heads, head_dim, dtype=torch.float32)
    k_ref, v_ref = buf[1].clone(), buf[0].clone()
    R.cache_write(k, v, k_ref, v_ref, start, lengths, sink_tokens, window)
    K.cache_write(k, v, buf[1], buf[0], start, lengths.to(torch.int32), sink_tokens, window)
    assert same_with_nan(buf[1], k_ref) and same_with_nan(buf[0], v_ref)
    assert not torch.equal(buf, before)


# --------------------------------------------------------------------------------------------------
# Chunks change nothing: the kernels composed, as the runtime uses them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink_tokens,window,chunk", [(4, 5, 1), (0, 6, 7), (1, 4, 11)])
def test_chunking_matches_token_by_token(sink_tokens, window, chunk):
    """Feed two streams (different lengths) through prefill + cache_write in chunks of ``chunk``
    (chunk 1: decode + cache_write); compare every token's output to the reference run token by
    token in float64."""
    torch.manual_seed(9 + chunk)
    num_heads, kv_heads, head_dim, total = 4, 2, 64, 23
    batch = 2
    capacity = sink_tokens + window
    cos, sin = rope(max(capacity, window + chunk - 1), head_dim)
    q = randn(batch, total, num_heads, head_dim, dtype=torch.float32)
    k = randn(batch, total, kv_heads, head_dim, dtype=torch.float32)
    v = randn(batch, total, kv_heads, head_dim, dtype=torch.float32)
    sinks = randn(num_heads, dtype=torch.float32)
    n_tokens = torch.tensor([total, total - 5], device=DEVICE)
    scale = head_dim**-0.5

    def step_all(attn, write, cache_dtype, width):
        k_cache = torch.full((batch, kv_heads, capacity, head_dim), float("nan"), dtype=cache_dtype, device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
        outs = torch.zeros(batch, total, num_heads, head_dim, dtype=cache_dtype, device=DEVICE)
        cs, sn = (cos, sin) if cache_dtype == torch.float32 else (f64(cos), f64(sin))
        cast = (lambda x: x) if cache_dtype == torch.float32 else f64
        lg = cast(sinks)
        for s0 in range(0, total, width):
            start = torch.full((batch,), s0, device=DEVICE)
            lengths = (n_tokens - s0).clamp(0, width)
            sl = slice(s0, s0 + width)
            n = q[:, sl].shape[1]
            if attn == "decode":
                write(cast(k[:, sl]), cast(v[:, sl]), k_cache, v_cache, start, lengths, sink_tokens, window)
                live = lengths > 0
                o = decode_fn(cast(q[:, s0]), k_cache, v_cache, (start + 1), cs, sn, sink_tokens, window, scale, lg)
                outs[:, s0] = torch.where(live.view(-1, 1, 1), o, 0)
            else:
                o = prefill_fn(cast(q[:, sl]), cast(k[:, sl]), cast(v[:, sl]), k_cache, v_cache, start, lengths, cs,
                               sn, sink_tokens, window, scale, lg)
                write(cast(k[:, sl]), cast(v[:, sl]), k_cache, v_cache, start, lengths, sink_tokens, window)
                outs[:, s0:s0 + n] = o
        return outs

    decode_fn, prefill_fn = R.decode_attention, R.prefill_attention
    ref = step_all("decode", R.cache_write, torch.float64, 1)
    decode_fn, prefill_fn = K.decode_attention, K.prefill_attention
    out = step_all("decode" if chunk == 1 else "prefill", K.cache_write, torch.float32, chunk)
    valid = torch.arange(total, device=DEVICE).view(1, -1) < n_tokens.view(-1, 1)
    check(out, torch.where(valid.view(batch, total, 1, 1), ref, 0), torch.float32, f"chunk {chunk}")


# --------------------------------------------------------------------------------------------------
# Package plumbing
# --------------------------------------------------------------------------------------------------


def test_reference_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import streaming_trt.kernels as k\n"
        "assert k.reference.decode_attention is not None\n"
        "assert k.triton_available() is False\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exports_and_signatures():
    import inspect

    assert K.triton_available()
    for name in ("decode_attention", "prefill_attention", "cache_write"):
        fn = getattr(K, name)
        assert callable(fn)
        assert inspect.signature(fn) == inspect.signature(getattr(R, name)), name


def _bench():
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import kernels as bench_kernels

    return bench_kernels


BENCH_SMOKE = ["--device", "cpu", "--batch", "2", "--capacity", "40", "--chunk", "5", "--warmup", "0", "--iters", "1",
               "--no-progress"]


def test_bench_kernels_smoke(tmp_path):
    """bench/kernels.py on CPU (interpreter): runs, checks the kernels against the PyTorch paths,
    writes its CSV and table."""
    import csv

    assert _bench().main(BENCH_SMOKE + ["--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").read_text().splitlines()))
    assert [(r["op"], r["batch"], r["capacity"]) for r in rows] == [("decode", "2", "40"), ("prefill", "2", "40")]
    for r in rows:
        assert float(r["triton_ms"]) > 0 and float(r["sdpa_ms"]) > 0 and float(r["sdpa_gather_ms"]) > 0
        assert float(r["max_abs_diff"]) < 1e-5
    assert "| decode | tiny | 2 | 40 |" in (tmp_path / "kernels.md").read_text()


def test_bench_kernels_catches_a_wrong_kernel(tmp_path, monkeypatch):
    bench = _bench()
    real = K.decode_attention
    monkeypatch.setattr(K, "decode_attention", lambda *a, **kw: real(*a, **kw) * 1.01)
    assert bench.main(BENCH_SMOKE + ["--ops", "decode", "--out", str(tmp_path)]) == 1
    assert bench.main(["--device", "cpu", "--capacity", "3", "--out", str(tmp_path)]) == 2


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_bench_shapes(dtype):
    """Llama-3-8B heads over a 4096-slot cache, decode and a 512-token chunk, natively."""
    torch.manual_seed(10)
    seen = [1, 5, 4095, 4096, 4097, 50000]
    out, ref = run_decode(seen, 4, 4092, (32, 8), 128, dtype, with_sink_logits=True)
    check(out, ref, dtype, "gpu decode")
    start, lengths = [0, 3, 4095, 20000], [512, 500, 512, 1]
    out, ref = run_prefill(start, lengths, 512, 4, 4092, (32, 8), 128, dtype)
    check(out, ref, dtype, "gpu prefill")
