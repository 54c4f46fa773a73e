"""Cache write: a chunk of new keys / values into their sink or ring slots (Triton).

Specification: :func:`streaming_trt.kernels.reference.cache_write` (same signature, in place).
Token ``u`` goes to slot ``geometry.slot(u)``: ``u`` when ``u < sink_tokens``, else ring slot
``sink_tokens + (u - sink_tokens) % window``. Keys arrive rotated; they are copied as they are.
Of a chunk longer than the window only the last ``window`` non-sink tokens are written (earlier ones would be overwritten within the same chunk anyway), so no two
kept rows share a slot and programs never race. Other slots are not touched.

The copy is bitwise: tensors of the cache's dtype are moved as 16- or 32-bit integers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import LaunchConfig
from streaming_trt.contract import Geometry

__all__ = ["cache_write", "launch_configs"]

BLOCK_T = 32  # chunk rows per program


@triton.jit
def _cache_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, start_ptr, len_ptr,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_kcb, stride_kch, stride_kcs,
    stride_vcb, stride_vch, stride_vcs,
    start_step, len_step,
    num_kv_heads, head_dim, sink_tokens, window,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tblk = tl.program_id(0)
    bk = tl.program_id(1)
    kvh = bk % num_kv_heads
    b = bk // num_kv_heads
    b64 = b.to(tl.int64)
    start = tl.load(start_ptr + b * start_step)
    length = tl.load(len_ptr + b * len_step)
    j = tblk * BLOCK_T + tl.arange(0, BLOCK_T)
    u = start + j
    keep = (j < length) & ((u < sink_tokens) | (u >= start + length - window))
    slot = tl.where(u < sink_tokens, u, sink_tokens + tl.maximum(u - sink_tokens, 0) % window)
    slot = tl.where(keep, slot, 0)
    d = tl.arange(0, BLOCK_D)
    m = keep[:, None] & (d < head_dim)[None, :]

    k_src = k_ptr + b64 * stride_kb + kvh * stride_kh
    v_src = v_ptr + b64 * stride_vb + kvh * stride_vh
    k_dst = kc_ptr + b64 * stride_kcb + kvh.to(tl.int64) * stride_kch
    v_dst = vc_ptr + b64 * stride_vcb + kvh.to(tl.int64) * stride_vch
    src = j[:, None] * stride_kt + d[None, :]
    dst = slot[:, None] * stride_kcs + d[None, :]
    tl.store(k_dst + dst, tl.load(k_src + src, mask=m), mask=m)
    src = j[:, None] * stride_vt + d[None, :]
    dst = slot[:, None] * stride_vcs + d[None, :]
    tl.store(v_dst + dst, tl.load(v_src + src, mask=m), mask=m)


_BITS = {2: torch.int16, 4: torch.int32}


def _config(element_size: int, head_dim: int) -> LaunchConfig:
    bd = _common.block_d(head_dim)
    name = _common.dtype_name(_BITS[element_size])
    return LaunchConfig(
        name=f"cache_write[{name},D{bd}]",
        fn=_cache_write_kernel,
        constexprs=dict(BLOCK_T=BLOCK_T, BLOCK_D=bd),
        pointers=dict(k_ptr=name, v_ptr=name, kc_ptr=name, vc_ptr=name, start_ptr="i32", len_ptr="i32"),
        num_warps=4,
        num_stages=1,
    )


def launch_configs() -> list[LaunchConfig]:
    """Every kernel variant :func:`cache_write` can launch, for the compile test."""
    out: dict[str, LaunchConfig] = {}
    for size in _BITS:
        for head_dim in _common.SUPPORTED_HEAD_DIMS:
            cfg = _config(size, head_dim)
            out.setdefault(cfg.name, cfg)
    return list(out.values())


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    lengths: torch.Tensor,
    geometry: Geometry,
) -> None:
    """Store a chunk of new keys / values in their sink or ring slots, in place (Triton).

    Same contract as :func:`streaming_trt.kernels.reference.cache_write`.

    Args:
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, keys already rotated (at their text
            positions, by the caller; nothing is rotated here), rows right-padded; any float dtype
            (converted to the cache's), last dim contiguous (other strides free).
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, float16 / bfloat16 /
            float32, ``capacity = geometry.capacity``, last dim contiguous (other strides free,
            so a per-layer view of a larger buffer is written in place).
        start: ``[batch]`` int32 or int64 (read in place, values < 2**31), tokens the stream had
            stored before the chunk.
        lengths: ``[batch]`` int32 or int64, valid rows per stream (``<= chunk``).
        geometry: the cache's :class:`~streaming_trt.contract.Geometry`.
    Only the last ``window`` non-sink tokens of a long chunk survive; every other slot is left as it
    was. Returns nothing.
    """
    if k.dim() != 4 or v.shape != k.shape or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected k/v [b, n, kvh, d] and caches [b, kvh, capacity, d], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, chunk, num_kv_heads, head_dim = k.shape
    if k_cache.shape[0] != batch or k_cache.shape[1] != num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not fit the cache {tuple(k_cache.shape)}")
    dtype = _common.check_caches(k_cache, v_cache, geometry)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches are written in place and must have a contiguous last dim")
    _common.check_head_dim(head_dim)
    if batch == 0 or chunk == 0:
        return
    start, start_step = _common.int_tensor(start, batch, "start", k_cache.device)
    lengths, len_step = _common.int_tensor(lengths, batch, "lengths", k_cache.device)
    bits = _BITS[dtype.itemsize]
    k = _common.last_dim_contiguous(k, dtype).view(bits)
    v = _common.last_dim_contiguous(v, dtype).view(bits)
    kc, vc = k_cache.view(bits), v_cache.view(bits)
    cfg = _config(dtype.itemsize, head_dim)
    _common.launch(
        _cache_write_kernel, (_common.cdiv(chunk, BLOCK_T), batch * num_kv_heads), cfg,
        k, v, kc, vc, start, lengths,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2),
        start_step, len_step,
        num_kv_heads, head_dim, geometry.sink_tokens, geometry.window,
    )

