"""Triton kernels against the float64 PyTorch references (``streaming_trt.kernels.reference``).

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors; with a
GPU the same tests run natively, and the whole grid runs in float16 and bfloat16 as well.

Every comparison feeds the reference the very inputs the kernel got (rounded to the kernel's
dtype, then widened to float64) so that the difference is the kernel's arithmetic alone. The
kernels rotate nothing: ``q_text``, ``q_rank`` and the keys are drawn independently (the contract
between kernel and caller does not need them to be real rotations, and independent draws catch a
sink scored with the wrong query); one end-to-end test rotates real queries and keys at text
positions near t = 4,000,000 and compares with a float64 attention at the contract's rank
positions. Unwritten cache slots hold NaN, which must never leak.

Tolerances, on max |kernel - reference| over outputs of size ~1 (values and q/k ~ N(0, 1),
sm_scale = head_dim ** -0.5):

* float32: 1e-4 absolute + 1e-4 relative (tf32x3 dots on a GPU; ~1e-6 is typical);
* float16: 4e-3 + 4e-3 (the probabilities are rounded to float16 for tl.dot);
* bfloat16: 2e-2 + 2e-2 (the same in bfloat16, 8x coarser; under the interpreter bfloat16 is
  upcast to float32 in the kernel and only the output is rounded).

A sink scored with the wrong query, a leaked NaN, a missed or extra key, or a lost sink logit all give errors of
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
from streaming_trt.contract import Geometry

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


def randn(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(DEVICE)


def nan_cache(batch, kv_heads, sink_tokens, window, head_dim, stored, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random k/v caches holding ``stored[b]`` tokens per stream; unwritten slots are NaN."""
    capacity = sink_tokens + window
    written = Geometry(sink_tokens, window).slot_tokens(stored.cpu()) >= 0
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


def run_decode(seen, sink_tokens, window, heads, head_dim, dtype, with_sink_logits=False, full=False):
    num_heads, kv_heads = HEADS[heads] if isinstance(heads, str) else heads
    seen = torch.tensor(seen, dtype=torch.int64, device=DEVICE)
    batch = seen.numel()
    geometry = Geometry(sink_tokens, window)
    k_cache, v_cache = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, seen, dtype)
    q_text = randn(batch, num_heads, head_dim, dtype=dtype)
    q_rank = randn(batch, num_heads, head_dim, dtype=dtype)
    sinks = randn(num_heads, dtype=torch.float32) if with_sink_logits else None
    scale = head_dim**-0.5
    out = K.decode_attention(q_text, q_rank, k_cache, v_cache, seen, geometry, scale, sinks, full=full)
    ref = R.decode_attention(f64(q_text), f64(q_rank), f64(k_cache), f64(v_cache), seen, geometry, scale, f64(sinks),
                             full=full)
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
    block_n = decode_mod._main_config(torch.float32, 128).constexprs["BLOCK_N"]
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


@pytest.mark.parametrize("head_dim", [16, 96, 256])
def test_decode_head_dims(head_dim):
    torch.manual_seed(head_dim)
    seen = stream_lengths(4, 7)
    out, ref = run_decode(seen, 4, 7, (8, 2), head_dim, torch.float32, with_sink_logits=True)
    check(out, ref, torch.float32, f"decode D={head_dim}")


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_decode_full(monkeypatch, sink_tokens, split):
    """``full=True`` (every stream at or past capacity): every slot is read without ``seen``."""
    if split:
        monkeypatch.setattr(_common, "CPU_SM_COUNT", 64)
        monkeypatch.setattr(decode_mod, "SPLIT_MIN_TILES", 1)
    torch.manual_seed(11 + sink_tokens)
    window = 70 - sink_tokens
    seen = [70, 71, 139, 1000]
    out, ref = run_decode(seen, sink_tokens, window, (8, 2), 64, torch.float32, with_sink_logits=True, full=True)
    check(out, ref, torch.float32, "full decode")


def _decode_alone(q_text, q_rank, k_cache, v_cache, seen, geometry, scale, sink_logits):
    """float64 decode attention of each stream and head alone, over the slots it has written
    (``slot_tokens``), sinks scored with ``q_rank``: the contract written out without masks."""
    batch, num_heads, _ = q_text.shape
    group = num_heads // k_cache.shape[1]
    tokens = geometry.slot_tokens(seen.cpu()).to(q_text.device)
    out = torch.zeros_like(q_text, dtype=torch.float64)
    for b in range(batch):
        slots = (tokens[b] >= 0).nonzero().view(-1)
        for h in range(num_heads):
            keys, vals = k_cache[b, h // group, slots].double(), v_cache[b, h // group, slots].double()
            q = torch.where((slots < geometry.sink_tokens).view(-1, 1), q_rank[b, h].double(), q_text[b, h].double())
            scores = (q * keys).sum(-1) * scale
            if sink_logits is not None:
                scores = torch.cat([scores, sink_logits[h].double().view(1)])
            out[b, h] = torch.softmax(scores, 0)[: len(slots)] @ vals
    return out


@pytest.mark.parametrize("seen", [[1, 2, 9, 10, 11, 40], [5, 5, 5], [3, 1, 1], [10, 12, 30], [1]], ids=str)
@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_reference_decode_reads_only_what_the_host_knows_is_written(seen, sink_tokens):
    """The reference with the host's ``written = (min, max)`` of ``min(seen, C)`` (what the runtime
    passes: it reads slots below the max only and masks from the min) equals each stream alone, in
    float64, over NaN caches; and so does the same tensor passed as both queries when no stream is
    past capacity (the sink scores are then not formed twice)."""
    torch.manual_seed(seed_of(tuple(seen), sink_tokens))
    geometry = Geometry(sink_tokens, 10 - sink_tokens)
    capacity = geometry.capacity
    seen = torch.tensor(seen)
    k_cache, v_cache = nan_cache(len(seen), 2, sink_tokens, geometry.window, 16, seen, torch.float64)
    k_cache, v_cache = k_cache.cpu(), v_cache.cpu()
    q_text, q_rank = (torch.randn(len(seen), 6, 16, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(6, dtype=torch.float64)
    stored = seen.clamp(max=capacity)
    written = (int(stored.min()), int(stored.max()))
    full = written[0] == capacity
    for logits in (None, sinks):
        want = _decode_alone(q_text, q_rank, k_cache, v_cache, seen, geometry, 0.3, logits)
        for hint in (written, None):
            got = R.decode_attention(q_text, q_rank, k_cache, v_cache, seen, geometry, 0.3, logits, full=full, written=hint)
            assert not got.isnan().any()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if int(seen.max()) <= capacity:
            same = R.decode_attention(q_text, q_text, k_cache, v_cache, seen, geometry, 0.3, logits, written=written)
            want = _decode_alone(q_text, q_text, k_cache, v_cache, seen, geometry, 0.3, logits)
            torch.testing.assert_close(same, want, rtol=1e-12, atol=1e-12)


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
    q_rank = qkv[:, num_heads:num_heads + kv_heads].repeat(1, num_heads // kv_heads, 1)
    geometry = Geometry(sink_tokens, window)
    seen_i32_strided = torch.stack([seen, seen * 0], 1).to(torch.int32)[:, 0]  # every other int32
    out = K.decode_attention(q, q_rank, stacked[1, 0], stacked[1, 1], seen_i32_strided, geometry, 0.1)
    ref = R.decode_attention(f64(q), f64(q_rank), f64(k_layer), f64(v_layer), seen, geometry, 0.1)
    check(out, ref, torch.float32, "strided decode")


# --------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------


def run_prefill(start, lengths, chunk, sink_tokens, window, heads, head_dim, dtype, with_sink_logits=False):
    num_heads, kv_heads = HEADS[heads] if isinstance(heads, str) else heads
    start = torch.tensor(start, dtype=torch.int64, device=DEVICE)
    lengths = torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    batch = start.numel()
    geometry = Geometry(sink_tokens, window)
    k_cache, v_cache = nan_cache(batch, kv_heads, sink_tokens, window, head_dim, start, dtype)
    q_text = randn(batch, chunk, num_heads, head_dim, dtype=dtype)
    q_rank = randn(batch, chunk, num_heads, head_dim, dtype=dtype)
    k = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    v = randn(batch, chunk, kv_heads, head_dim, dtype=dtype)
    sinks = randn(num_heads, dtype=torch.float32) if with_sink_logits else None
    scale = head_dim**-0.5
    out = K.prefill_attention(q_text, q_rank, k, v, k_cache, v_cache, start, lengths, geometry, scale, sinks)
    ref = R.prefill_attention(f64(q_text), f64(q_rank), f64(k), f64(v), f64(k_cache), f64(v_cache), start, lengths,
                              geometry, scale, f64(sinks))
    return out, ref


@pytest.mark.parametrize("sink_tokens", [1, 4])
def test_reference_prefill_one_query_tensor_for_both(sink_tokens):
    """Streams that stay within capacity, the same tensor passed as both queries (what the runtime
    passes then): the reference skips the rank scores and gives what it gives for an equal copy."""
    torch.manual_seed(sink_tokens)
    geometry = Geometry(sink_tokens, 12)
    start, lengths = torch.tensor([0, 2, 7, 3]), torch.tensor([5, 3, 9, 0])
    k_cache, v_cache = (x.cpu() for x in nan_cache(4, 2, sink_tokens, 12, 16, start, torch.float64))
    q, k, v = (torch.randn(4, 9, h, 16, dtype=torch.float64) for h in (6, 2, 2))
    sinks = torch.randn(6, dtype=torch.float64)
    same = R.prefill_attention(q, q, k, v, k_cache, v_cache, start, lengths, geometry, 0.3, sinks)
    copied = R.prefill_attention(q, q.clone(), k, v, k_cache, v_cache, start, lengths, geometry, 0.3, sinks)
    assert not same.isnan().any()
    torch.testing.assert_close(same, copied, rtol=0, atol=0)


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


@pytest.mark.parametrize("head_dim", [16, 96, 256])
def test_prefill_head_dims(head_dim):
    torch.manual_seed(head_dim * 3)
    start, lengths = prefill_streams(4, 6, 7)
    out, ref = run_prefill(start, lengths, 7, 4, 6, (4, 2), head_dim, torch.float32, with_sink_logits=True)
    check(out, ref, torch.float32, f"prefill D={head_dim}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sink_tokens,window,chunk,heads,head_dim", [(4, 6, 15, "gqa4", 128), (1, 13, 7, "mha", 80)])
def test_prefill_16bit(sink_tokens, window, chunk, heads, head_dim, dtype):
    torch.manual_seed(8)
    start, lengths = prefill_streams(sink_tokens, window, chunk)
    out, ref = run_prefill(start, lengths, chunk, sink_tokens, window, heads, head_dim, dtype,
                           with_sink_logits=sink_tokens == 4)
    check(out, ref, dtype, f"prefill {dtype}")


def test_wrappers_check_the_geometry():
    """The caches' slot count must be the geometry's capacity; a bare (S, W) pair is refused."""
    q = torch.zeros(1, 9, 2, 64, device=DEVICE)
    kv = torch.zeros(1, 9, 2, 64, device=DEVICE)
    cache = torch.zeros(1, 2, 8, 64, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    lengths = torch.full((1,), 9, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="capacity is 9"):
        K.prefill_attention(q, q, kv, kv, cache, cache, start, lengths, Geometry(2, 7), 0.1)
    with pytest.raises(ValueError, match="capacity is 9"):
        K.decode_attention(q[:, 0], q[:, 0], cache, cache, lengths, Geometry(2, 7), 0.1)
    with pytest.raises(ValueError, match="capacity is 9"):
        K.cache_write(kv, kv, cache, cache, start, lengths, Geometry(2, 7))
    with pytest.raises(TypeError, match="Geometry"):
        K.cache_write(kv, kv, cache, cache, start, lengths, (2, 6))
    with pytest.raises(ValueError, match="q_text, q_rank"):
        K.decode_attention(q[:, 0], q[:, 0, :1], cache, cache, lengths, Geometry(2, 6), 0.1)


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
    R.cache_write(k, v, k_ref, v_ref, start, lengths, Geometry(sink_tokens, window))
    K.cache_write(k, v, k_cache, v_cache, start, lengths, Geometry(sink_tokens, window))
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
    geometry = Geometry(sink_tokens, window)
    R.cache_write(k, v, k_ref, v_ref, start, lengths, geometry)
    K.cache_write(k, v, buf[1], buf[0], start, lengths.to(torch.int32), geometry)
    assert same_with_nan(buf[1], k_ref) and same_with_nan(buf[0], v_ref)
    assert not torch.equal(buf, before)


# --------------------------------------------------------------------------------------------------
# Chunks change nothing: the kernels composed, as the runtime uses them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink_tokens,window,chunk", [(4, 5, 1), (0, 6, 7), (1, 4, 11)])
def test_chunking_matches_token_by_token(sink_tokens, window, chunk):
    """Feed two streams (different lengths) through prefill + cache_write in chunks of ``chunk``
    (chunk 1: cache_write + decode); compare every token's output to the reference run token by
    token in float64."""
    torch.manual_seed(9 + chunk)
    num_heads, kv_heads, head_dim, total = 4, 2, 64, 23
    batch = 2
    geometry = Geometry(sink_tokens, window)
    q_text = randn(batch, total, num_heads, head_dim, dtype=torch.float32)
    q_rank = randn(batch, total, num_heads, head_dim, dtype=torch.float32)
    k = randn(batch, total, kv_heads, head_dim, dtype=torch.float32)
    v = randn(batch, total, kv_heads, head_dim, dtype=torch.float32)
    sinks = randn(num_heads, dtype=torch.float32)
    n_tokens = torch.tensor([total, total - 5], device=DEVICE)
    scale = head_dim**-0.5

    def step_all(ops, cache_dtype, width):
        cast = (lambda x: x) if cache_dtype == torch.float32 else f64
        k_cache = torch.full((batch, kv_heads, geometry.capacity, head_dim), float("nan"), dtype=cache_dtype,
                             device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
        outs = torch.zeros(batch, total, num_heads, head_dim, dtype=cache_dtype, device=DEVICE)
        for s0 in range(0, total, width):
            start = torch.full((batch,), s0, device=DEVICE)
            lengths = (n_tokens - s0).clamp(0, width)
            sl = slice(s0, s0 + width)
            n = q_text[:, sl].shape[1]
            kc, vc = cast(k[:, sl]), cast(v[:, sl])
            if width == 1:
                ops.cache_write(kc, vc, k_cache, v_cache, start, lengths, geometry)
                o = ops.decode_attention(cast(q_text[:, s0]), cast(q_rank[:, s0]), k_cache, v_cache, start + 1,
                                         geometry, scale, cast(sinks))
                outs[:, s0] = torch.where((lengths > 0).view(-1, 1, 1), o, 0)
            else:
                o = ops.prefill_attention(cast(q_text[:, sl]), cast(q_rank[:, sl]), kc, vc, k_cache, v_cache, start,
                                          lengths, geometry, scale, cast(sinks))
                ops.cache_write(kc, vc, k_cache, v_cache, start, lengths, geometry)
                outs[:, s0:s0 + n] = o
        return outs

    ref = step_all(R, torch.float64, 1)
    out = step_all(K, torch.float32, chunk)
    valid = torch.arange(total, device=DEVICE).view(1, -1) < n_tokens.view(-1, 1)
    check(out, torch.where(valid.view(batch, total, 1, 1), ref, 0), torch.float32, f"chunk {chunk}")


# --------------------------------------------------------------------------------------------------
# End to end at t ~ 4,000,000: real rotations, against attention at the contract's rank positions
# --------------------------------------------------------------------------------------------------


def _inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., rows, heads, d]`` at int ``positions [..., rows]``: angles in
    float64 reduced mod 2 pi, cos/sin cast to ``dtype`` (float32 as a runtime would; float64 for
    the reference, where positions are small ranks)."""
    ang = torch.remainder(positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device), 2 * torch.pi)
    cos, sin = ang.cos().to(dtype).unsqueeze(-2), ang.sin().to(dtype).unsqueeze(-2)
    x = x.to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rank_attention(q, keys, vals, tokens, t, geometry, inv_freq, scale, sink_logits):
    """float64 attention of one query ``q [heads, d]`` (unrotated) of token ``t`` over ``keys,
    vals [kv_heads, n, d]`` (unrotated) of ``tokens [n]``, every key at its rank in A(t) and the
    query at ``min(t, C - 1)``, as the contract defines positions (written out independently of
    ``reference.py``)."""
    attended = geometry.attended(t)
    idx = [tokens.index(u) for u in attended]
    ranks = torch.arange(len(attended), device=q.device)
    assert len(attended) - 1 == geometry.rank(t)
    kk = _rotate(keys[:, idx].transpose(0, 1), ranks, inv_freq, torch.float64).transpose(0, 1)  # [kvh, n, d]
    qq = _rotate(q.unsqueeze(0), ranks[-1:], inv_freq, torch.float64)[0]  # [heads, d]
    group = q.shape[0] // keys.shape[0]
    kk, vv = kk.repeat_interleave(group, 0), vals[:, idx].double().repeat_interleave(group, 0)
    scores = torch.einsum("hd,hnd->hn", qq, kk) * scale
    scores = torch.cat([scores, sink_logits.double().view(-1, 1)], 1)
    return torch.einsum("hn,hnd->hd", torch.softmax(scores, -1)[:, :-1], vv)


@pytest.mark.parametrize("sink_tokens", [0, 4])
def test_rotated_far_into_the_stream(sink_tokens):
    """Streams near t = 4,000,000: keys rotated at their text positions (float64 angles mod 2 pi,
    cos/sin in float32), queries at text position and rank, through cache_write + decode and
    through a prefill chunk; every row equals float64 attention at rank positions."""
    torch.manual_seed(21 + sink_tokens)
    window, num_heads, kv_heads, head_dim = 9, 4, 2, 64
    geometry = Geometry(sink_tokens, window)
    inv = _inv_freq(head_dim)
    scale = head_dim**-0.5
    sinks = randn(num_heads, dtype=torch.float32)
    base = 4_000_000
    start = torch.tensor([base, base + 7, base + 3], device=DEVICE)  # tokens stored before the step
    batch, chunk = start.numel(), 5
    lengths = torch.tensor([5, 3, 1], device=DEVICE)
    span = base + 7 + chunk
    # One unrotated key/value/query per token we need: the sinks and the last C + chunk tokens.
    wanted = sorted(set(range(sink_tokens)) | set(range(base - geometry.capacity, span)))
    pos = {u: i for i, u in enumerate(wanted)}
    k_raw = randn(batch, len(wanted), kv_heads, head_dim, dtype=torch.float64)
    v_raw = randn(batch, len(wanted), kv_heads, head_dim, dtype=torch.float64)
    q_raw = randn(batch, len(wanted), num_heads, head_dim, dtype=torch.float64)

    def rows(x, b, tokens):
        return x[b, [pos[u] for u in tokens]]

    # The caches as the runtime leaves them: each token's key rotated at its text position.
    stored = geometry.slot_tokens(start.cpu())
    k_cache = torch.full((batch, kv_heads, geometry.capacity, head_dim), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b in range(batch):
        tok = stored[b].tolist()
        text = torch.tensor(tok, device=DEVICE)
        k_cache[b] = _rotate(rows(k_raw, b, tok), text, inv, torch.float32).transpose(0, 1)
        v_cache[b] = rows(v_raw, b, tok).float().transpose(0, 1)

    t = start.view(-1, 1) + torch.arange(chunk, device=DEVICE).view(1, -1)  # [batch, chunk]
    toks = [t[b].tolist() for b in range(batch)]
    q = torch.stack([rows(q_raw, b, toks[b]) for b in range(batch)])
    k = torch.stack([rows(k_raw, b, toks[b]) for b in range(batch)])
    v = torch.stack([rows(v_raw, b, toks[b]) for b in range(batch)]).float()
    q_text, q_rank = _rotate(q, t, inv, torch.float32), _rotate(q, geometry.rank(t), inv, torch.float32)
    k_rot = _rotate(k, t, inv, torch.float32)

    def expected(b, i):
        tt = toks[b][i]
        tokens = [u for u in stored[b].tolist() if u >= 0] + toks[b][: i + 1]
        keys = torch.stack([rows(k_raw, b, [u])[0] for u in tokens], 1)
        vals = torch.stack([rows(v_raw, b, [u])[0] for u in tokens], 1)
        return _rank_attention(q[b, i], keys, vals, tokens, tt, geometry, inv, scale, sinks)

    # A prefill chunk.
    out = K.prefill_attention(q_text, q_rank, k_rot, v, k_cache, v_cache, start, lengths, geometry, scale, sinks)
    ref = torch.zeros(batch, chunk, num_heads, head_dim, dtype=torch.float64, device=DEVICE)
    for b in range(batch):
        for i in range(int(lengths[b])):
            ref[b, i] = expected(b, i)
    check(out, ref, torch.float32, "prefill at t ~ 4e6")

    # Decode of row 0 after writing it (every stream is past capacity: full=True is allowed).
    one = torch.ones_like(lengths)
    K.cache_write(k_rot[:, :1], v[:, :1], k_cache, v_cache, start, one, geometry)
    for full in (False, True):
        out = K.decode_attention(q_text[:, 0], q_rank[:, 0], k_cache, v_cache, start + 1, geometry, scale, sinks,
                                 full=full)
        check(out, torch.stack([expected(b, 0) for b in range(batch)]), torch.float32, f"decode at t ~ 4e6 full={full}")


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
