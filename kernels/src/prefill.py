"""Chunked prefill attention over a sink + ring KV cache (Triton).

Specification: :func:`streaming_trt.kernels.reference.prefill_attention` (same signature, same
result). Row ``i`` of a chunk is token ``t = start + i``; it attends to A(t) of the contract, made
of the cache as it was before the chunk and the chunk's own rows ``<= i``. Keys (cached and the
chunk's own) come rotated at their text positions and each row's query twice, so nothing is
rotated here:

* sink keys (tokens ``u < sink_tokens``, in the cache or in the chunk) score with ``q_rank`` (the
  query at ``min(t, capacity - 1)``, the key at ``u``: distance = rank distance);
* window keys score with ``q_text`` (both at their text positions).

Each program owns ``BLOCK_M`` rows of one query head and runs two loops: sink keys, window keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import DOT_PRECISION, LOG2E, LOG2E_C, LaunchConfig, load_rows, softmax_step, to_dot
from streaming_trt.contract import Geometry

__all__ = ["prefill_attention", "launch_configs"]


@triton.jit
def _prefill_kernel(
    qt_ptr, qr_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, start_ptr, len_ptr, sinks_ptr, out_ptr,
    stride_qtb, stride_qtt, stride_qth,
    stride_qrb, stride_qrt, stride_qrh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    stride_ob, stride_ot, stride_oh, start_step, len_step,
    chunk, num_heads, group, head_dim, sink_tokens, window,
    scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    mblk = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % num_heads
    b = bh // num_heads
    kvh = h // group
    b64 = b.to(tl.int64)

    start = tl.load(start_ptr + b * start_step)
    length = tl.load(len_ptr + b * len_step)
    m0 = mblk * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    rows_hi = tl.minimum(m0 + BLOCK_M, length)  # valid rows of this block: m0 .. rows_hi - 1
    busy = rows_hi > m0
    t = start + rows

    k_base = k_ptr + b64 * stride_kb + kvh * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh * stride_vh
    kc_base = kc_ptr + b64 * stride_kcb + kvh.to(tl.int64) * stride_kch
    vc_base = vc_ptr + b64 * stride_vcb + kvh.to(tl.int64) * stride_vch

    # The learned sink logit is a key of value zero: start the sums with it.
    m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + h) * LOG2E_C
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1. Sink keys, tokens u < min(sink_tokens, last token of the block + 1): slot u of the cache
    #    when u < start, else chunk row u - start. Visible to t when u <= t. Scored with the
    #    query rotated at its rank.
    sink_hi = tl.where(busy, tl.minimum(sink_tokens, start + rows_hi), 0)
    if sink_hi > 0:
        qr = to_dot(load_rows(qr_ptr + b64 * stride_qrb + h * stride_qrh + rows * stride_qrt, row_ok, head_dim,
                              BLOCK_D), kc_ptr, UPCAST)
        for u0 in range(0, sink_hi, BLOCK_N):
            u = u0 + tl.arange(0, BLOCK_N)
            u_ok = u < sink_hi
            in_cache = u < start
            c_row = tl.where(in_cache, u, 0)
            n_row = tl.where(in_cache, 0, u - start)
            k_row = tl.where(in_cache, kc_base + c_row * stride_kcs, k_base + n_row * stride_kt)
            v_row = tl.where(in_cache, vc_base + c_row * stride_vcs, v_base + n_row * stride_vt)
            k = to_dot(load_rows(k_row, u_ok, head_dim, BLOCK_D), kc_ptr, UPCAST)
            s = tl.dot(qr, tl.trans(k), input_precision=DOT_PRECISION)
            s = tl.where(u_ok[None, :] & (u[None, :] <= t[:, None]), s * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
            v = to_dot(load_rows(v_row, u_ok, head_dim, BLOCK_D), vc_ptr, UPCAST)
            acc = acc * alpha[:, None] + tl.dot(to_dot(p, vc_ptr, UPCAST), v, input_precision=DOT_PRECISION)

    # 2. Window keys, scored with the query rotated at its text position, visited by key index
    #    p = u - start + window - 1: the ring's tokens (p < window - 1, oldest first) then the
    #    chunk's rows (row j at p = j + window - 1), one run without holes. The ring's n_ring
    #    tokens fill window - 1 - n_ring .. window - 2 (p = -1, the oldest token of a full ring,
    #    is evicted by row 0); chunk rows below sink_tokens - start are sinks, done above. Row i
    #    sees i <= p <= i + window - 1.
    qt = to_dot(load_rows(qt_ptr + b64 * stride_qtb + h * stride_qth + rows * stride_qtt, row_ok, head_dim, BLOCK_D),
                kc_ptr, UPCAST)
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
        k = to_dot(load_rows(k_row, p_ok, head_dim, BLOCK_D), kc_ptr, UPCAST)
        s = tl.dot(qt, tl.trans(k), input_precision=DOT_PRECISION)
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


def _config(dtype: torch.dtype, head_dim: int, upcast: bool = False) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(dtype)
    # The float32 accumulator and the query tile limit the tiles (sizes chosen so that ptxas does
    # not spill on sm_80 / sm_90, see the compile test).
    if dtype == torch.float32:  # tf32x3 dots hold each operand twice
        block_m, block_n, warps = {64: (32, 32, 4), 128: (32, 32, 8), 256: (16, 16, 8)}[bd]
    elif bd <= 128:
        block_m, block_n, warps = 64, 64, 8
    else:
        block_m, block_n, warps = 32, 32, 8
    return LaunchConfig(
        name=f"prefill[{name},D{bd}]",
        fn=_prefill_kernel,
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, UPCAST=upcast),
        pointers=dict(qt_ptr=name, qr_ptr=name, k_ptr=name, v_ptr=name, kc_ptr=name, vc_ptr=name, start_ptr="i32",
                      len_ptr="i32", sinks_ptr="fp32", out_ptr=name),
        floats=("scale_log2",),
        num_warps=warps,
        num_stages=1,
    )


def launch_configs() -> list[LaunchConfig]:
    """Every kernel variant :func:`prefill_attention` can launch on a GPU, for the compile test."""
    out: dict[str, LaunchConfig] = {}
    for dtype in _common.KERNEL_DTYPES:
        for head_dim in _common.SUPPORTED_HEAD_DIMS:
            cfg = _config(dtype, head_dim)
            out.setdefault(cfg.name, cfg)
    return list(out.values())


def prefill_attention(
    q_text: torch.Tensor,
    q_rank: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    lengths: torch.Tensor,
    geometry: Geometry,
    sm_scale: float,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a chunk of new tokens per stream over the cache before the chunk plus the chunk
    itself (Triton).

    Same contract as :func:`streaming_trt.kernels.reference.prefill_attention`: every row ``i <
    lengths[b]`` (token ``start[b] + i``) gets exactly what token-by-token decode would give it,
    whatever the chunk size, longer than the window included. Call it *before* ``cache_write`` of
    the same chunk. Nothing is rotated here.

    Args:
        q_text, q_rank: ``[batch, chunk, num_heads, head_dim]``, float16 / bfloat16 / float32, row
            ``i`` (token ``t = start + i``) rotated at ``t`` (scored against window keys) and at
            ``min(t, capacity - 1)`` (scored against sink keys, tokens ``< sink_tokens``); rows
            right-padded. Last dim contiguous (other strides free, e.g. a view of a fused QKV).
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, the chunk's own keys (rotated at their
            text positions) and values, last dim contiguous.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, ``capacity =
            geometry.capacity``, keys rotated at their text positions, not yet holding the chunk;
            last dim contiguous. Unwritten slots never read.
        start: ``[batch]`` int32 or int64 (read in place, values < 2**31), tokens stored before
            the chunk.
        lengths: ``[batch]`` int32 or int64, valid rows per stream, ``<= chunk``.
        geometry, sm_scale: as for decode.
        sink_logits: optional ``[num_heads]`` learned per-head logit.
    Returns:
        ``[batch, chunk, num_heads, head_dim]`` contiguous in ``q_text.dtype``; padded rows are zero.

    All of the queries, k, v and the caches share one dtype (converted to the cache's otherwise).
    """
    if (q_text.dim() != 4 or q_rank.shape != q_text.shape or k.dim() != 4 or v.shape != k.shape
            or k_cache.dim() != 4 or v_cache.shape != k_cache.shape):
        raise ValueError(f"expected q_text, q_rank [b, n, h, d], k/v [b, n, kvh, d], caches [b, kvh, capacity, d], got "
                         f"{tuple(q_text.shape)}, {tuple(q_rank.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, chunk, num_heads, head_dim = q_text.shape
    num_kv_heads = k_cache.shape[1]
    if (k.shape[:2] != (batch, chunk) or k.shape[2] != num_kv_heads or k.shape[3] != head_dim
            or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or num_heads % num_kv_heads):
        raise ValueError(f"shapes do not fit: q {tuple(q_text.shape)}, k {tuple(k.shape)}, cache {tuple(k_cache.shape)}")
    dtype = _common.check_caches(k_cache, v_cache, geometry)
    _common.check_head_dim(head_dim)
    device = q_text.device
    out_dtype = q_text.dtype
    q_text, q_rank, k, v = (_common.last_dim_contiguous(x, dtype) for x in (q_text, q_rank, k, v))
    k_cache = _common.last_dim_contiguous(k_cache, dtype)
    v_cache = _common.last_dim_contiguous(v_cache, dtype)
    start, start_step = _common.int_tensor(start, batch, "start", device)
    lengths, len_step = _common.int_tensor(lengths, batch, "lengths", device)
    sinks = _common.sink_logits_or_none(sink_logits, num_heads, device)

    up = _common.upcast(dtype)
    cfg = _config(dtype, head_dim, up)
    out = torch.empty(batch, chunk, num_heads, head_dim, device=device, dtype=torch.float32 if up else dtype)
    if chunk == 0 or batch == 0:
        return out.to(out_dtype)
    grid = (_common.cdiv(chunk, cfg.constexprs["BLOCK_M"]), batch * num_heads)
    _common.launch(
        _prefill_kernel, grid, cfg,
        q_text, q_rank, k, v, k_cache, v_cache, start, lengths, sinks, out,
        q_text.stride(0), q_text.stride(1), q_text.stride(2),
        q_rank.stride(0), q_rank.stride(1), q_rank.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2), start_step, len_step,
        chunk, num_heads, num_heads // num_kv_heads, head_dim, geometry.sink_tokens, geometry.window,
        float(sm_scale) * LOG2E,
    )
    return out.to(out_dtype)
