"""Recall of evicted tokens in Triton: block scores, and decode attention over sinks + recalled
blocks + window.

Specifications: :func:`streaming_trt.kernels.recall_reference.bound_scores`,
:func:`~streaming_trt.kernels.recall_reference.representative_scores` and
:func:`~streaming_trt.kernels.recall_reference.recall_decode_attention` (same arguments, same
results; the mass output is the reference's only). No rotation happens here: the queries come
rotated for each part (``q_sink`` for sinks, ``q_block[:, :, i]`` for recalled block ``i``,
``q_text`` for the window), as in the references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import DOT_PRECISION, LOG2E, LOG2E_C, LaunchConfig, load_rows, softmax_step, to_dot

__all__ = ["bound_scores", "representative_scores", "recall_decode_attention", "launch_configs"]

BLOCK_G = 16  # query heads of one KV head per program (tl.dot needs M >= 16)
SCORE_BLOCK_B = 32  # blocks scored per program


@triton.jit
def _scores_kernel(
    q_ptr, a_ptr, b_ptr, out_ptr,
    stride_qn, stride_qh, stride_ab, stride_ak, stride_ar, stride_on, stride_oh,
    num_heads, group, head_dim, num_blocks, num_reps,
    BOUNDS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Bounds: ``a`` = lo, ``b`` = hi ``[blocks, kv, d]``. Representatives: ``a`` = reps
    ``[blocks, kv, r, d]`` (``b`` unused). One query row and head, ``BLOCK_B`` blocks."""
    nh = tl.program_id(0)
    head = nh % num_heads
    row = nh // num_heads
    kvh = head // group
    j = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    j_ok = j < num_blocks
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + row * stride_qn + head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    m = j_ok[:, None] & d_ok[None, :]
    base = j[:, None].to(tl.int64) * stride_ab + kvh * stride_ak + d[None, :]
    if BOUNDS:
        lo = tl.load(a_ptr + base, mask=m, other=0.0).to(tl.float32)
        hi = tl.load(b_ptr + base, mask=m, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), 1)
    else:
        s = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for r in range(0, num_reps):
            rep = tl.load(a_ptr + base + r * stride_ar, mask=m, other=0.0).to(tl.float32)
            s = tl.maximum(s, tl.sum(q[None, :] * rep, 1))
    tl.store(out_ptr + row * stride_on + head * stride_oh + j, s, mask=j_ok)


@triton.jit
def _recall_decode_kernel(
    qt_ptr, qs_ptr, qb_ptr, k_ptr, v_ptr, bk_ptr, bv_ptr, sinks_ptr, out_ptr,
    stride_qtb, stride_qth, stride_qsb, stride_qsh, stride_qbb, stride_qbh, stride_qbi,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_bkb, stride_bki, stride_bkh, stride_bks, stride_bvb, stride_bvi, stride_bvh, stride_bvs,
    stride_ob, stride_oh,
    num_kv_heads, group, head_dim, sink_tokens, capacity, num_sel, block_size, num_gblocks,
    scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    gblk = pid % num_gblocks
    bk_ = pid // num_gblocks
    kvh = bk_ % num_kv_heads
    b = (bk_ // num_kv_heads).to(tl.int64)
    g = gblk * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < group
    head = kvh * group + g

    sink = tl.load(sinks_ptr + head, mask=g_ok, other=float("-inf")) * LOG2E_C
    m_i = sink
    l_i = 1.0 + tl.zeros([BLOCK_G], tl.float32)  # the learned sink logit as a key of value zero
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b * stride_vb + kvh.to(tl.int64) * stride_vh

    # 1. Sinks, scored with the query at its rank |A_R(t)| - 1.
    if sink_tokens > 0:
        qs = to_dot(load_rows(qs_ptr + b * stride_qsb + head * stride_qsh, g_ok, head_dim, BLOCK_D), k_ptr, UPCAST)
        for n0 in range(0, sink_tokens, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            j_ok = j < sink_tokens
            k = tl.trans(to_dot(load_rows(k_base + j * stride_ks, j_ok, head_dim, BLOCK_D), k_ptr, UPCAST))
            s = tl.where(j_ok[None, :], tl.dot(qs, k, input_precision=DOT_PRECISION) * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
            v = to_dot(load_rows(v_base + j * stride_vs, j_ok, head_dim, BLOCK_D), v_ptr, UPCAST)
            acc = acc * alpha[:, None] + tl.dot(to_dot(p, v_ptr, UPCAST), v, input_precision=DOT_PRECISION)
    # 2. Recalled blocks, each scored with the query rotated for it.
    for i in range(0, num_sel):
        qb = to_dot(load_rows(qb_ptr + b * stride_qbb + head * stride_qbh + i * stride_qbi, g_ok, head_dim, BLOCK_D),
                    k_ptr, UPCAST)
        bk_base = bk_ptr + b * stride_bkb + i * stride_bki + kvh.to(tl.int64) * stride_bkh
        bv_base = bv_ptr + b * stride_bvb + i * stride_bvi + kvh.to(tl.int64) * stride_bvh
        for n0 in range(0, block_size, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            j_ok = j < block_size
            k = tl.trans(to_dot(load_rows(bk_base + j * stride_bks, j_ok, head_dim, BLOCK_D), k_ptr, UPCAST))
            s = tl.where(j_ok[None, :], tl.dot(qb, k, input_precision=DOT_PRECISION) * scale_log2, float("-inf"))
            p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
            v = to_dot(load_rows(bv_base + j * stride_bvs, j_ok, head_dim, BLOCK_D), v_ptr, UPCAST)
            acc = acc * alpha[:, None] + tl.dot(to_dot(p, v_ptr, UPCAST), v, input_precision=DOT_PRECISION)
    # 3. The window (every slot written: the stream is full), the query at its text position.
    qt = to_dot(load_rows(qt_ptr + b * stride_qtb + head * stride_qth, g_ok, head_dim, BLOCK_D), k_ptr, UPCAST)
    for n0 in range(sink_tokens, capacity, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < capacity
        k = tl.trans(to_dot(load_rows(k_base + j * stride_ks, j_ok, head_dim, BLOCK_D), k_ptr, UPCAST))
        s = tl.where(j_ok[None, :], tl.dot(qt, k, input_precision=DOT_PRECISION) * scale_log2, float("-inf"))
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        v = to_dot(load_rows(v_base + j * stride_vs, j_ok, head_dim, BLOCK_D), v_ptr, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(to_dot(p, v_ptr, UPCAST), v, input_precision=DOT_PRECISION)

    d = tl.arange(0, BLOCK_D)
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (d < head_dim)[None, :])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _scores_config(dtype: torch.dtype, head_dim: int, bounds: bool) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(dtype)
    return LaunchConfig(
        name=f"recall_scores[{'bounds' if bounds else 'reps'},{name},D{bd}]",
        fn=_scores_kernel,
        constexprs=dict(BOUNDS=bounds, BLOCK_B=SCORE_BLOCK_B, BLOCK_D=bd),
        pointers=dict(q_ptr=name, a_ptr=name, b_ptr=name, out_ptr="fp32"),
        num_warps=4,
        num_stages=1,
    )


def _decode_config(dtype: torch.dtype, head_dim: int, upcast: bool = False) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(dtype)
    wide = dtype == torch.float32 or bd > 128
    return LaunchConfig(
        name=f"recall_decode[{name},D{bd}]",
        fn=_recall_decode_kernel,
        constexprs=dict(BLOCK_G=BLOCK_G, BLOCK_N=32 if wide else 64, BLOCK_D=bd, UPCAST=upcast),
        pointers=dict(qt_ptr=name, qs_ptr=name, qb_ptr=name, k_ptr=name, v_ptr=name, bk_ptr=name, bv_ptr=name,
                      sinks_ptr="fp32", out_ptr=name),
        floats=("scale_log2",),
        num_warps=4 if bd <= 128 else 8,
        num_stages=1 if dtype == torch.float32 else 2,
    )


def launch_configs() -> list[LaunchConfig]:
    """Every variant the wrappers below can launch on a GPU, for the compile test."""
    out: dict[str, LaunchConfig] = {}
    for dtype in _common.KERNEL_DTYPES:
        for head_dim in _common.SUPPORTED_HEAD_DIMS:
            for cfg in (_scores_config(dtype, head_dim, True), _scores_config(dtype, head_dim, False),
                        _decode_config(dtype, head_dim)):
                out.setdefault(cfg.name, cfg)
    return list(out.values())


def _scores(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bounds: bool) -> torch.Tensor:
    n, heads, head_dim = q.shape
    nb, kv = a.shape[0], a.shape[1]
    if heads % kv or a.shape[-1] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit the block summaries {tuple(a.shape)}")
    _common.check_head_dim(head_dim)
    dtype = a.dtype
    _common.check_kernel_dtype(dtype, "block summaries")
    q = _common.last_dim_contiguous(q, dtype)
    a = a.contiguous()
    b = a if b is None else b.to(dtype).contiguous()
    out = torch.empty(n, heads, nb, device=q.device, dtype=torch.float32)
    if n * nb == 0:
        return out
    cfg = _scores_config(dtype, head_dim, bounds)
    _common.launch(
        _scores_kernel, (n * heads, _common.cdiv(nb, SCORE_BLOCK_B)), cfg,
        q, a, b, out,
        q.stride(0), q.stride(1), a.stride(0), a.stride(1), a.stride(2) if not bounds else 0,
        out.stride(0), out.stride(1),
        heads, heads // kv, head_dim, nb, 1 if bounds else a.shape[2],
    )
    return out


def bound_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest upper bounds (Triton): ``q [n, heads, d]``, ``lo, hi [blocks, kv_heads, d]`` ->
    float32 ``[n, heads, blocks]``; see the reference."""
    return _scores(q, lo, hi, True)


def representative_scores(q: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """InfLLM representative scores (Triton): ``q [n, heads, d]``, ``reps [blocks, kv_heads, r, d]``
    -> float32 ``[n, heads, blocks]``; see the reference."""
    return _scores(q, reps, None, False)


def recall_decode_attention(q_text, q_sink, q_block, k_cache, v_cache, blk_k, blk_v, geometry, sm_scale: float,
                            sink_logits=None) -> torch.Tensor:
    """Decode attention over sinks + recalled blocks + window (Triton); every stream full.

    Same arguments as the reference: ``q_text, q_sink [batch, heads, d]``, ``q_block
    [batch, heads, k, d]``, caches ``[batch, kv_heads, capacity, d]`` already holding the query's
    own key/value, ``blk_k, blk_v [batch, k, kv_heads, B, d]``. Last dims contiguous. Returns
    ``[batch, heads, d]`` in ``q_text.dtype``.
    """
    batch, heads, head_dim = q_text.shape
    _, kv, capacity, _ = k_cache.shape
    num_sel, block_size = blk_k.shape[1], blk_k.shape[3]
    if (q_sink.shape != q_text.shape or q_block.shape[:2] != (batch, heads) or q_block.shape[2] != num_sel
            or blk_k.shape != (batch, num_sel, kv, block_size, head_dim) or blk_v.shape != blk_k.shape or heads % kv):
        raise ValueError(f"shapes do not fit: q {tuple(q_text.shape)}, q_block {tuple(q_block.shape)}, "
                         f"cache {tuple(k_cache.shape)}, blocks {tuple(blk_k.shape)}")
    dtype = _common.check_caches(k_cache, v_cache, geometry)
    _common.check_head_dim(head_dim)
    device, out_dtype = q_text.device, q_text.dtype
    q_text, q_sink, q_block = (_common.last_dim_contiguous(x, dtype) for x in (q_text, q_sink, q_block))
    k_cache, v_cache, blk_k, blk_v = (_common.last_dim_contiguous(x, dtype) for x in (k_cache, v_cache, blk_k, blk_v))
    sinks = _common.sink_logits_or_none(sink_logits, heads, device)
    group = heads // kv
    num_gblocks = _common.cdiv(group, BLOCK_G)
    cfg = _decode_config(dtype, head_dim, _common.upcast(dtype))
    out = torch.empty(batch, heads, head_dim, device=device, dtype=torch.float32 if cfg.constexprs["UPCAST"] else dtype)
    if batch == 0:
        return out.to(out_dtype)
    _common.launch(
        _recall_decode_kernel, (batch * kv * num_gblocks,), cfg,
        q_text, q_sink, q_block, k_cache, v_cache, blk_k, blk_v, sinks, out,
        q_text.stride(0), q_text.stride(1), q_sink.stride(0), q_sink.stride(1),
        q_block.stride(0), q_block.stride(1), q_block.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        blk_k.stride(0), blk_k.stride(1), blk_k.stride(2), blk_k.stride(3),
        blk_v.stride(0), blk_v.stride(1), blk_v.stride(2), blk_v.stride(3),
        out.stride(0), out.stride(1),
        kv, group, head_dim, geometry.sink_tokens, capacity, num_sel, block_size, num_gblocks,
        float(sm_scale) * LOG2E,
    )
    return out.to(out_dtype)
