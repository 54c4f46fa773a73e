"""Decode attention over a sink + ring KV cache (Triton), flash-decoding style.

Specification: :func:`streaming_trt.kernels.reference.decode_attention` (same signature, same
result). One new query per stream attends to every written slot of its cache. Keys are stored
rotated at their text positions by the caller and the query comes rotated twice, so no rotation
happens here: sink slots (``j < sink_tokens``) score with ``q_rank``, ring slots with ``q_text``.
The slots ``0 .. min(seen, capacity) - 1`` are exactly the written ones, so the work of a stream is
a prefix of its cache, which long caches split across programs (``num_splits``, chosen from shapes
alone) whose partial softmax sums a second kernel combines.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import DOT_PRECISION, LOG2E, LOG2E_C, LaunchConfig, load_rows, softmax_step, to_dot
from streaming_trt.contract import Geometry

__all__ = ["decode_attention", "launch_configs"]

BLOCK_G = 16  # query heads of one KV head per program (tl.dot needs M >= 16; MHA wastes the rest)
REDUCE_BLOCK_S = 16  # partial results combined per step of the reduce kernel
SPLIT_MIN_TILES = 2  # a split covers at least this many key tiles
PROGRAMS_PER_SM = 4  # split until the grid has about this many programs per SM


@triton.jit
def _decode_kernel(
    qt_ptr, qr_ptr, k_ptr, v_ptr, seen_ptr, sinks_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    stride_qtb, stride_qth, stride_qrb, stride_qrh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, seen_step,
    num_kv_heads, group, head_dim, sink_tokens, capacity, full, split_len, num_splits, num_gblocks,
    scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    gblk = pid % num_gblocks
    bk = pid // num_gblocks
    kvh = bk % num_kv_heads
    b = bk // num_kv_heads
    num_heads = num_kv_heads * group

    # Written slots: 0 .. n-1 (all of them once the stream is full).
    n = tl.where(full != 0, capacity, tl.minimum(tl.load(seen_ptr + b * seen_step), capacity))
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n)

    g = gblk * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < group
    head = kvh * group + g

    b64 = b.to(tl.int64)
    qt = to_dot(load_rows(qt_ptr + b64 * stride_qtb + head * stride_qth, g_ok, head_dim, BLOCK_D), k_ptr, UPCAST)

    # Without splits the learned sink logit starts the sums as a key of value zero; with splits
    # it joins once, in the reduce kernel.
    sink = tl.load(sinks_ptr + head, mask=g_ok, other=float("-inf")) * LOG2E_C
    m_i = tl.where(num_splits > 1, float("-inf"), sink)
    l_i = tl.where(num_splits > 1, 0.0, 1.0) + tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    # 1. Tiles holding sink slots (j < sink_tokens): those score with the query at its rank.
    sink_hi = tl.minimum(hi, sink_tokens)
    if sink_hi > lo:
        qr = to_dot(load_rows(qr_ptr + b64 * stride_qrb + head * stride_qrh, g_ok, head_dim, BLOCK_D), k_ptr, UPCAST)
        for n0 in range(lo, sink_hi, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            j_ok = j < hi
            k = tl.trans(to_dot(load_rows(k_base + j * stride_ks, j_ok, head_dim, BLOCK_D), k_ptr, UPCAST))
            s_text = tl.dot(qt, k, input_precision=DOT_PRECISION)
            s_rank = tl.dot(qr, k, input_precision=DOT_PRECISION)
            s = tl.where((j < sink_tokens)[None, :], s_rank, s_text)
            s = tl.where(j_ok[None, :], s * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
            v = to_dot(load_rows(v_base + j * stride_vs, j_ok, head_dim, BLOCK_D), v_ptr, UPCAST)
            acc = acc * alpha[:, None] + tl.dot(to_dot(p, v_ptr, UPCAST), v, input_precision=DOT_PRECISION)
    # 2. The remaining tiles hold window slots only: the query at its text position. Every tile
    #    of [lo, hi) holds at least one written slot, so m_i is finite after the first.
    w_lo = lo + tl.maximum(sink_hi - lo + BLOCK_N - 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(w_lo, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        k = tl.trans(to_dot(load_rows(k_base + j * stride_ks, j_ok, head_dim, BLOCK_D), k_ptr, UPCAST))
        s = tl.dot(qt, k, input_precision=DOT_PRECISION)
        s = tl.where(j_ok[None, :], s * scale_log2, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = to_dot(load_rows(v_base + j * stride_vs, j_ok, head_dim, BLOCK_D), v_ptr, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(to_dot(p, v_ptr, UPCAST), v, input_precision=DOT_PRECISION)

    d = tl.arange(0, BLOCK_D)
    if num_splits > 1:
        # Empty splits (past the written prefix) store m = -inf, l = 0, acc = 0.
        row = (b * num_heads + head) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=g_ok)
        tl.store(part_l_ptr + row, l_i, mask=g_ok)
        tl.store(part_acc_ptr + row[:, None] * head_dim + d[None, :], acc, mask=g_ok[:, None] & (d < head_dim)[None, :])
    else:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + b64 * stride_ob + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (d < head_dim)[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr, out_ptr,
    stride_ob, stride_oh,
    num_heads, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    head = bh % num_heads
    b = bh // num_heads
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    # Start from the learned sink logit (-inf without one); split 0 always holds the first slot,
    # so m is finite after the first step.
    m = tl.load(sinks_ptr + head) * LOG2E_C
    l = 1.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        s_ok = sp < num_splits
        row = bh * num_splits + sp
        m_s = tl.load(part_m_ptr + row, mask=s_ok, other=float("-inf"))
        l_s = tl.load(part_l_ptr + row, mask=s_ok, other=0.0)
        a_s = tl.load(part_acc_ptr + row[:, None] * head_dim + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, 0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(m_s - m_new)
        l = l * alpha + tl.sum(l_s * w, 0)
        acc = acc * alpha + tl.sum(a_s * w[:, None], 0)
        m = m_new
    out = acc / l
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _main_config(dtype: torch.dtype, head_dim: int, upcast: bool = False) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(dtype)
    wide = dtype == torch.float32 or bd > 128  # smaller key tiles keep shared memory and registers in check
    return LaunchConfig(
        name=f"decode[{name},D{bd}]",
        fn=_decode_kernel,
        constexprs=dict(BLOCK_G=BLOCK_G, BLOCK_N=32 if wide else 64, BLOCK_D=bd, UPCAST=upcast),
        pointers=dict(qt_ptr=name, qr_ptr=name, k_ptr=name, v_ptr=name, seen_ptr="i32", sinks_ptr="fp32",
                      out_ptr=name, part_acc_ptr="fp32", part_m_ptr="fp32", part_l_ptr="fp32"),
        floats=("scale_log2",),
        num_warps=4 if bd <= 128 else 8,
        num_stages=1 if dtype == torch.float32 else 2,
    )


def _reduce_config(dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(dtype)
    return LaunchConfig(
        name=f"decode_reduce[{name},D{bd}]",
        fn=_decode_reduce_kernel,
        constexprs=dict(BLOCK_S=REDUCE_BLOCK_S, BLOCK_D=bd),
        pointers=dict(part_acc_ptr="fp32", part_m_ptr="fp32", part_l_ptr="fp32", sinks_ptr="fp32", out_ptr=name),
        num_warps=4,
        num_stages=1,
    )


def launch_configs() -> list[LaunchConfig]:
    """Every kernel variant :func:`decode_attention` can launch on a GPU (any head_dim <= 256,
    split or not), for the compile test."""
    out: dict[str, LaunchConfig] = {}
    for dtype in _common.KERNEL_DTYPES:
        for head_dim in _common.SUPPORTED_HEAD_DIMS:
            for cfg in (_main_config(dtype, head_dim), _reduce_config(dtype, head_dim)):
                out.setdefault(cfg.name, cfg)
    return list(out.values())


def plan_splits(programs: int, capacity: int, block_n: int, sm_count: int) -> tuple[int, int]:
    """``(num_splits, split_len)`` for a grid of ``programs`` (batch x kv heads x head blocks).

    Splits only when the grid would leave SMs idle: up to ``PROGRAMS_PER_SM`` programs per SM,
    each split at least ``SPLIT_MIN_TILES`` key tiles long. Based on shapes only (``seen`` lives
    on the device and is never read here); splits past a short stream's written slots exit at once.
    """
    tiles = _common.cdiv(capacity, block_n)
    want = _common.cdiv(PROGRAMS_PER_SM * sm_count, programs)
    num_splits = max(1, min(want, _common.cdiv(tiles, SPLIT_MIN_TILES)))
    split_len = _common.cdiv(tiles, num_splits) * block_n
    return _common.cdiv(capacity, split_len), split_len


def decode_attention(
    q_text: torch.Tensor,
    q_rank: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seen: torch.Tensor,
    geometry: Geometry,
    sm_scale: float,
    sink_logits: torch.Tensor | None = None,
    full: bool = False,
    written: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention of one new query per stream over its sink + ring cache (Triton).

    Same contract as :func:`streaming_trt.kernels.reference.decode_attention`; the cache already
    holds the current token's key and value (write them with ``cache_write`` first). No rotation
    happens here, and nothing is read back from the device: the launch depends on shapes only, so
    a CUDA graph can capture it.

    Args:
        q_text, q_rank: ``[batch, num_heads, head_dim]``, float16 / bfloat16 / float32, the query
            of token ``t = seen - 1`` rotated at ``t`` (scored against window keys) and at
            ``min(t, capacity - 1)`` (scored against sink keys, slots ``< sink_tokens``). Last dim
            contiguous (other strides free).
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, ``capacity =
            geometry.capacity``, keys rotated at their text positions, in slot order (see
            ``reference.py``). Last dim contiguous, other strides free (a per-layer view of a
            larger buffer is fine). ``num_heads % num_kv_heads == 0`` (MHA, GQA, MQA). Unwritten
            slots are never read.
        seen: ``[batch]`` int32 or int64 (read in place, values < 2**31), tokens stored including
            the current one, ``>= 1``, on the device of ``q_text``.
        geometry: the cache's :class:`~streaming_trt.contract.Geometry`.
        sm_scale: score scale, usually ``head_dim ** -0.5``.
        sink_logits: optional ``[num_heads]`` learned per-head logit joining each softmax
            denominator (gpt-oss), any float dtype.
        full: the caller knows every stream has ``seen >= capacity``: every slot is read without
            looking at ``seen``.
        written: the host's ``(min, max)`` of ``min(seen, capacity)`` that the reference slices by;
            ignored here (each program reads its stream's ``seen`` on the device).
    Returns:
        ``[batch, num_heads, head_dim]`` contiguous, in ``q_text.dtype``.

    The queries and caches share one dtype (the queries are converted to the cache's otherwise,
    and the output back). ``head_dim`` even and <= 256.
    """
    if (q_text.dim() != 3 or q_rank.shape != q_text.shape or k_cache.dim() != 4
            or v_cache.shape != k_cache.shape):
        raise ValueError(f"expected q_text, q_rank [b, h, d] and caches [b, kvh, capacity, d], got "
                         f"{tuple(q_text.shape)}, {tuple(q_rank.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, num_heads, head_dim = q_text.shape
    _, num_kv_heads, capacity, _ = k_cache.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q_text.shape)} does not fit the cache {tuple(k_cache.shape)}")
    dtype = _common.check_caches(k_cache, v_cache, geometry)
    _common.check_head_dim(head_dim)
    device = q_text.device
    out_dtype = q_text.dtype
    q_text = _common.last_dim_contiguous(q_text, dtype)
    q_rank = _common.last_dim_contiguous(q_rank, dtype)
    k_cache = _common.last_dim_contiguous(k_cache, dtype)
    v_cache = _common.last_dim_contiguous(v_cache, dtype)
    seen, seen_step = _common.int_tensor(seen, batch, "seen", device)
    sinks = _common.sink_logits_or_none(sink_logits, num_heads, device)

    group = num_heads // num_kv_heads
    num_gblocks = _common.cdiv(group, BLOCK_G)
    cfg = _main_config(dtype, head_dim, _common.upcast(dtype))
    programs = batch * num_kv_heads * num_gblocks
    num_splits, split_len = plan_splits(programs, capacity, cfg.constexprs["BLOCK_N"], _common.sm_count(device))
    split = num_splits > 1

    out = torch.empty(batch, num_heads, head_dim, device=device, dtype=torch.float32 if cfg.constexprs["UPCAST"] else dtype)
    if batch == 0:
        return out.to(out_dtype)
    if split:
        rows = batch * num_heads * num_splits
        part_acc = torch.empty(rows, head_dim, device=device, dtype=torch.float32)
        part_m = torch.empty(rows, device=device, dtype=torch.float32)
        part_l = torch.empty(rows, device=device, dtype=torch.float32)
    else:
        part_acc = part_m = part_l = sinks  # unused, float32 like the real ones
    _common.launch(
        _decode_kernel, (num_splits, programs), cfg,
        q_text, q_rank, k_cache, v_cache, seen, sinks, out, part_acc, part_m, part_l,
        q_text.stride(0), q_text.stride(1), q_rank.stride(0), q_rank.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), seen_step,
        num_kv_heads, group, head_dim, geometry.sink_tokens, capacity, int(bool(full)), split_len, num_splits,
        num_gblocks,
        float(sm_scale) * LOG2E,
    )
    if split:
        _common.launch(
            _decode_reduce_kernel, (batch * num_heads,), _reduce_config(dtype, head_dim),
            part_acc, part_m, part_l, sinks, out,
            out.stride(0), out.stride(1),
            num_heads, head_dim, num_splits,
        )
    return out.to(out_dtype)
