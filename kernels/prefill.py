"""Chunked prefill attention over a sink + ring KV cache (Triton).

Specification: :func:`streaming_trt.kernels.reference.prefill_attention` (same signature, same
result). Row ``i`` of a chunk is token ``t = start + i``; it attends to A(t) of the contract, made
of the cache as it was before the chunk and the chunk's own rows ``<= i``. Scores depend only on
query-key distances, which lets one query tile meet many keys through ``tl.dot``:

* sink keys (tokens ``u < sink_tokens``, in the cache or in the chunk): key at position ``u``,
  query at its rank ``min(t, capacity - 1)``;
* window keys: both at their text position minus ``base = start - window + 1``. The query of row
  ``i`` sits at ``i + window - 1``, chunk row ``j`` at ``j + window - 1`` and the cached token
  ``start - 1 - d`` at ``window - 2 - d``; ring slots are visited in that key-position order.
  A window key at position ``p`` is visible to row ``i`` exactly when ``i <= p <= i + window - 1``.

Each program owns ``BLOCK_M`` rows of one query head and runs two loops: sink keys, window keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import (DOT_PRECISION, LOG2E, LOG2E_C, LaunchConfig, load_halves, load_pass, load_rows, rotate,
                      softmax_step, to_dot)

__all__ = ["prefill_attention", "launch_configs"]


@triton.jit
def _scores(q1, q2, k1, k2, like_ptr, UPCAST: tl.constexpr):
    """``q . k`` over the rotated halves (``k1, k2`` float32, rotated)."""
    s = tl.dot(q1, tl.trans(to_dot(k1, like_ptr, UPCAST)), input_precision=DOT_PRECISION)
    return tl.dot(q2, tl.trans(to_dot(k2, like_ptr, UPCAST)), s, input_precision=DOT_PRECISION)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, start_ptr, len_ptr, cos_ptr, sin_ptr, sinks_ptr, out_ptr,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    stride_ob, stride_ot, stride_oh, start_step, len_step,
    chunk, num_heads, group, head_dim, half, sink_tokens, window,
    scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PASS: tl.constexpr, UPCAST: tl.constexpr,
):
    mblk = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % num_heads
    b = bh // num_heads
    kvh = h // group
    b64 = b.to(tl.int64)

    capacity = sink_tokens + window
    start = tl.load(start_ptr + b * start_step)
    length = tl.load(len_ptr + b * len_step)
    m0 = mblk * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    rows_hi = tl.minimum(m0 + BLOCK_M, length)  # valid rows of this block: m0 .. rows_hi - 1
    busy = rows_hi > m0
    t = start + rows
    rot_dim = 2 * half  # HAS_PASS: partial rotary, columns rot_dim.. are dotted unrotated

    q_base = q_ptr + b64 * stride_qb + h * stride_qh
    k_base = k_ptr + b64 * stride_kb + kvh * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh * stride_vh
    kc_base = kc_ptr + b64 * stride_kcb + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + b64 * stride_vcb + kvh.to(tl.int64) * stride_vch

    q_rows = q_base + rows * stride_qt

    # The learned sink logit is a key of value zero: start the sums with it.
    m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + h) * LOG2E_C
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. Sink keys, tokens u < min(sink_tokens, last token of the block + 1): slot u of the cache
    #    when u < start, else chunk row u - start. Visible to t when u <= t.
    q1, q2 = load_halves(q_rows, row_ok, half, BLOCK_H)
    q1, q2 = rotate(q1, q2, cos_ptr, sin_ptr, tl.minimum(t, capacity - 1), row_ok, half, BLOCK_H)
    q1 = to_dot(q1, kc_ptr, UPCAST)
    q2 = to_dot(q2, kc_ptr, UPCAST)
    sink_hi = tl.where(busy, tl.minimum(sink_tokens, start + rows_hi), 0)
    for u0 in range(0, sink_hi, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)
        u_ok = u < sink_hi
        in_cache = u < start
        c_row = tl.where(in_cache, u, 0)
        n_row = tl.where(in_cache, 0, u - start)
        k_row = tl.where(in_cache, kc_base + c_row * stride_kcs, k_base + n_row * stride_kt)
        v_row = tl.where(in_cache, vc_base + c_row * stride_vcs, v_base + n_row * stride_vt)
        k1, k2 = load_halves(k_row, u_ok, half, BLOCK_H)
        k1, k2 = rotate(k1, k2, cos_ptr, sin_ptr, u, u_ok, half, BLOCK_H)
        s = _scores(q1, q2, k1, k2, kc_ptr, UPCAST)
        if HAS_PASS:
            qp = to_dot(load_pass(q_rows, row_ok, rot_dim, head_dim, BLOCK_D), kc_ptr, UPCAST)
            kp = to_dot(load_pass(k_row, u_ok, rot_dim, head_dim, BLOCK_D), kc_ptr, UPCAST)
            s = tl.dot(qp, tl.trans(kp), s, input_precision=DOT_PRECISION)
        s = tl.where(u_ok[None, :] & (u[None, :] <= t[:, None]), s * scale_log2, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = to_dot(load_rows(v_row, u_ok, head_dim, BLOCK_D), vc_ptr, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(to_dot(p, vc_ptr, UPCAST), v, input_precision=DOT_PRECISION)

    # Window keys: the query of row i at position i + window - 1.
    q1, q2 = load_halves(q_rows, row_ok, half, BLOCK_H)  # again: cheaper than keeping it in registers
    q1, q2 = rotate(q1, q2, cos_ptr, sin_ptr, rows + window - 1, row_ok, half, BLOCK_H)
    q1 = to_dot(q1, kc_ptr, UPCAST)
    q2 = to_dot(q2, kc_ptr, UPCAST)

    # 2. Window keys by key position p: the ring's tokens (p < window - 1, oldest first) then the
    #    chunk's rows (row j at p = j + window - 1), one run without holes. Cached token u sits at
    #    p = u - start + window - 1, so the ring's n_ring tokens fill window - 1 - n_ring ..
    #    window - 2 (p = -1, the oldest token of a full ring, is evicted by row 0); chunk rows below
    #    sink_tokens - start are sinks, done above. Row i sees i <= p <= i + window - 1.
    n_ring = tl.minimum(tl.maximum(start - sink_tokens, 0), window)
    ring_first = tl.maximum(start - sink_tokens + 1, 0) % window  # ring offset of the token at p = 0
    p_lo = tl.maximum(window - 1 - n_ring + tl.maximum(sink_tokens - start, 0), m0)
    p_hi = tl.where(busy, window - 1 + rows_hi, p_lo)
    for p0 in range(p_lo, p_hi, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        p_ok = p < p_hi
        in_cache = p < window - 1
        r = ring_first + p
        r = tl.where(r >= window, r - window, r)
        c_row = tl.where(in_cache, sink_tokens + r, 0)
        n_row = tl.where(in_cache, 0, p - (window - 1))
        k_row = tl.where(in_cache, kc_base + c_row * stride_kcs, k_base + n_row * stride_kt)
        v_row = tl.where(in_cache, vc_base + c_row * stride_vcs, v_base + n_row * stride_vt)
        k1, k2 = load_halves(k_row, p_ok, half, BLOCK_H)
        k1, k2 = rotate(k1, k2, cos_ptr, sin_ptr, p, p_ok, half, BLOCK_H)
        s = _scores(q1, q2, k1, k2, kc_ptr, UPCAST)
        if HAS_PASS:
            # Reloaded per tile (from L1) rather than held in registers through the loop.
            qp = to_dot(load_pass(q_rows, row_ok, rot_dim, head_dim, BLOCK_D), kc_ptr, UPCAST)
            kp = to_dot(load_pass(k_row, p_ok, rot_dim, head_dim, BLOCK_D), kc_ptr, UPCAST)
            s = tl.dot(qp, tl.trans(kp), s, input_precision=DOT_PRECISION)
        vis = p_ok[None, :] & (p[None, :] >= rows[:, None]) & (p[None, :] <= rows[:, None] + window - 1)
        s = tl.where(vis, s * scale_log2, float("-inf"))
        p_att, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = to_dot(load_rows(v_row, p_ok, head_dim, BLOCK_D), vc_ptr, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(to_dot(p_att, vc_ptr, UPCAST), v, input_precision=DOT_PRECISION)

    # Padded rows saw nothing (l stays 1 with a sink logit, 0 or 1 without): they store zeros.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    d = tl.arange(0, BLOCK_D)
    o_ptrs = out_ptr + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < chunk)[:, None] & (d < head_dim)[None, :])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _config(dtype: torch.dtype, head_dim: int, has_pass: bool, upcast: bool = False) -> LaunchConfig:
    bd = C.block_d(head_dim)
    name = C.dtype_name(dtype)
    # Key tiles are rotated in float32 registers, which with the float32 accumulator is what limits
    # the tiles (sizes chosen so that ptxas does not spill on sm_80 / sm_90, see the compile test).
    if dtype == torch.float32:  # tf32x3 dots hold each operand twice
        block_m, block_n, warps = {64: (32, 32, 4), 128: (32, 32, 8), 256: (16, 16, 8)}[bd]
    elif bd <= 128:
        block_m, block_n, warps = 64, 32 if has_pass else 64, 8
    else:
        block_m, block_n, warps = 32, 32, 8
    return LaunchConfig(
        name=f"prefill[{name},D{bd}{',pass' if has_pass else ''}]",
        fn=_prefill_kernel,
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=bd // 2, BLOCK_D=bd, HAS_PASS=has_pass,
                        UPCAST=upcast),
        pointers=dict(q_ptr=name, k_ptr=name, v_ptr=name, kc_ptr=name, vc_ptr=name, start_ptr="i32",
                      len_ptr="i32", cos_ptr="fp32", sin_ptr="fp32", sinks_ptr="fp32", out_ptr=name),
        floats=("scale_log2",),
        num_warps=warps,
        num_stages=1,
    )


def launch_configs() -> list[LaunchConfig]:
    """Every kernel variant :func:`prefill_attention` can launch on a GPU, for the compile test."""
    out: dict[str, LaunchConfig] = {}
    for dtype in C.KERNEL_DTYPES:
        for head_dim in C.SUPPORTED_HEAD_DIMS:
            for has_pass in (False, True):
                cfg = _config(dtype, head_dim, has_pass)
                out.setdefault(cfg.name, cfg)
    return list(out.values())


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_tokens: int,
    window: int,
    sm_scale: float,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a chunk of new tokens per stream over the cache before the chunk plus the chunk
    itself (Triton).

    Same contract as :func:`streaming_trt.kernels.reference.prefill_attention`: every row ``i <
    lengths[b]`` (token ``start[b] + i``) gets exactly what token-by-token decode would give it,
    whatever the chunk size, longer than the window included. Call it *before* ``cache_write`` of
    the same chunk.

    Args:
        q: ``[batch, chunk, num_heads, head_dim]``, float16 / bfloat16 / float32, unrotated, rows
            right-padded. Last dim contiguous (other strides free, e.g. a view of a fused QKV).
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, the chunk's own unrotated keys / values,
            last dim contiguous.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, ``capacity = sink_tokens +
            window``, not yet holding the chunk; last dim contiguous. Unwritten slots never read.
        start: ``[batch]`` int32 or int64 (read in place, values < 2**31), tokens stored before
            the chunk.
        lengths: ``[batch]`` int32 or int64, valid rows per stream, ``<= chunk``.
        cos, sin: ``[num_positions, rotary_dim // 2]`` float32 with ``num_positions >=
            max(capacity, window + chunk - 1)``, rotate-half convention.
        sink_tokens, window, sm_scale: as for decode.
        sink_logits: optional ``[num_heads]`` learned per-head logit.
    Returns:
        ``[batch, chunk, num_heads, head_dim]`` contiguous in ``q.dtype``; padded rows are zero.

    All of q, k, v and the caches share one dtype (converted to the cache's otherwise).
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [b, n, h, d], k/v [b, n, kvh, d], caches [b, kvh, capacity, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, chunk, num_heads, head_dim = q.shape
    _, num_kv_heads, capacity, _ = k_cache.shape
    if (k.shape[:2] != (batch, chunk) or k.shape[2] != num_kv_heads or k.shape[3] != head_dim
            or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or num_heads % num_kv_heads):
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, cache {tuple(k_cache.shape)}")
    dtype = C.check_caches(k_cache, v_cache, sink_tokens, window)
    C.check_head_dim(head_dim)
    cos, sin, half = C.rotary_tables(cos, sin, head_dim, max(capacity, window + chunk - 1), q.device)
    out_dtype = q.dtype
    q, k, v = (C.last_dim_contiguous(x, dtype) for x in (q, k, v))
    k_cache = C.last_dim_contiguous(k_cache, dtype)
    v_cache = C.last_dim_contiguous(v_cache, dtype)
    start, start_step = C.int_tensor(start, batch, "start", q.device)
    lengths, len_step = C.int_tensor(lengths, batch, "lengths", q.device)
    sinks = C.sink_logits_or_none(sink_logits, num_heads, q.device)

    up = C.upcast(dtype)
    cfg = _config(dtype, head_dim, 2 * half < head_dim, up)
    out = torch.empty(batch, chunk, num_heads, head_dim, device=q.device, dtype=torch.float32 if up else dtype)
    if chunk == 0 or batch == 0:
        return out.to(out_dtype)
    grid = (C.cdiv(chunk, cfg.constexprs["BLOCK_M"]), batch * num_heads)
    C.launch(
        _prefill_kernel, grid, cfg,
        q, k, v, k_cache, v_cache, start, lengths, cos, sin, sinks, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), start_step, len_step,
        chunk, num_heads, num_heads // num_kv_heads, head_dim, half, sink_tokens, window,
        float(sm_scale) * LOG2E,
    )
    return out.to(out_dtype)
