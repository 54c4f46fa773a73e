"""Pieces shared by the Triton kernels: row loads, the online-softmax step, launch plumbing.

Importing this module imports triton. Under ``TRITON_INTERPRET=1`` the ``@triton.jit`` functions
here and in the kernel modules become interpreted functions, so the variable must be set before the
first import (``tests/conftest.py`` does it on machines without CUDA).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from . import interpreting
from streaming_trt.contract import Geometry

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit functions
# tl.dot on float32 operands: three TF32 products, about float32 accuracy on tensor cores (plain
# TF32 loses ~3 digits; "ieee" builds FMA loops that take minutes to compile). Ignored for 16-bit.
DOT_PRECISION = tl.constexpr("tf32x3")

# Head dims the kernels are tested for. Any even head_dim <= 256 runs: tiles are sized by
# block_d(head_dim), which maps every one of them onto the tile widths 64, 128 and 256.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_TRITON_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}


def block_d(head_dim: int) -> int:
    """Tile width for a head: a power of two, at least 64 (head dims below 64 only occur in tiny
    test models; sharing the 64 tile keeps the list of compiled variants short and well above
    16, the smallest K dimension tl.dot accepts on the GPU)."""
    return max(64, triton.next_power_of_2(head_dim))


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must compute in float32 on loaded values (and store float32 outputs).

    The interpreter's bfloat16 is wrong (dot multiplies bit patterns, reductions and casts are off),
    so under ``TRITON_INTERPRET=1`` bfloat16 operands are upcast right after loading and outputs are
    written as float32 and rounded by torch.
    """
    return interpreting() and dtype == torch.bfloat16


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small constant on CPU (interpreter)."""
    if device.type != "cuda":
        return CPU_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


CPU_SM_COUNT = 2

_no_sink_logits: dict[tuple[torch.device, int], torch.Tensor] = {}


def sink_logits_or_none(sink_logits: torch.Tensor | None, num_heads: int, device: torch.device) -> torch.Tensor:
    """``sink_logits`` as contiguous float32 ``[num_heads]``; ``-inf`` everywhere when absent.

    ``exp(-inf) = 0`` adds nothing to a softmax denominator, so one kernel serves both cases.
    """
    if sink_logits is None:
        key = (device, num_heads)
        if key not in _no_sink_logits:
            _no_sink_logits[key] = torch.full((num_heads,), float("-inf"), dtype=torch.float32, device=device)
        return _no_sink_logits[key]
    if sink_logits.shape != (num_heads,):
        raise ValueError(f"sink_logits must be [num_heads={num_heads}], got {tuple(sink_logits.shape)}")
    return sink_logits.to(device=device, dtype=torch.float32).contiguous()


def last_dim_contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def check_kernel_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{what}: the Triton kernels take float16, bfloat16 or float32, got {dtype} "
                        "(float64 is for the references in streaming_trt.kernels.reference)")


def check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, geometry: Geometry) -> torch.dtype:
    """Check what every host wrapper asks of the caches ``[batch, num_kv_heads, capacity, head_dim]``
    (shapes already checked): ``capacity = geometry.capacity``, one kernel dtype for both.
    Returns that dtype."""
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a streaming_trt.contract.Geometry, got {type(geometry).__name__}")
    if k_cache.shape[2] != geometry.capacity:
        raise ValueError(f"the caches have {k_cache.shape[2]} slots but the geometry's capacity is "
                         f"{geometry.capacity} (sink_tokens {geometry.sink_tokens} + window {geometry.window})")
    dtype = k_cache.dtype
    check_kernel_dtype(dtype, "k_cache")
    if v_cache.dtype != dtype:
        raise TypeError(f"k_cache is {dtype} but v_cache is {v_cache.dtype}")
    return dtype


def check_head_dim(head_dim: int) -> None:
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}")


def int_tensor(x: torch.Tensor, batch: int, what: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """``x [batch]`` (int32 or int64) as int32 the kernels can read: ``(tensor, step)`` with element
    ``b`` at ``tensor[b * step]``.

    int64 is read in place through its low 32-bit words (little-endian), so neither dtype costs a
    conversion kernel; values must be below 2**31 (two billion tokens per stream).
    """
    if x.shape != (batch,):
        raise ValueError(f"{what} must be [batch={batch}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{what} is on {x.device}, the other tensors on {device}")
    if x.dtype == torch.int32:
        return x, x.stride(0)
    if x.dtype != torch.int64:
        raise TypeError(f"{what} must be int32 or int64, got {x.dtype}")
    if sys.byteorder != "little":
        return x.to(torch.int32), 1
    if x.stride(0) != 1:
        x = x.contiguous()
    return x.view(torch.int32), 2


# --------------------------------------------------------------------------------------------------
# Launch configurations, enumerated for the compile test
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of a kernel: what ``triton.compile`` needs to build it without a GPU.

    ``pointers`` maps pointer arguments to their element type (``"fp16"``, ``"i32"``, ...); every
    other non-constexpr argument is an ``i32`` unless named in ``floats`` (``fp32``). Pointers,
    ``stride_*`` and ``head_dim`` carry the 16-divisibility hint the JIT gives them at run
    time for head_dim 64, 128 or 256 (the JIT builds a variant without the hint,
    same code, less vectorized loads, for e.g. head_dim 80).
    """

    name: str
    fn: Any
    constexprs: dict
    pointers: dict
    floats: tuple = ()
    num_warps: int = 4
    num_stages: int = 2

    def signature(self) -> tuple[dict, dict]:
        """``(signature, attrs)`` for ``triton.compiler.ASTSource``."""
        sig, attrs = {}, {}
        for i, arg in enumerate(self.fn.arg_names):
            if arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg in self.pointers:
                sig[arg] = "*" + self.pointers[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in self.floats:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
                if arg.startswith("stride_") or arg == "head_dim":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs


def dtype_name(dtype: torch.dtype) -> str:
    return _TRITON_DTYPE_NAMES[dtype]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(fn: Callable, grid: tuple, cfg: LaunchConfig, *args) -> None:
    """Launch ``fn`` with the constexprs and warps of ``cfg`` (keeps wrapper and compile test in
    step: the wrappers launch nothing that ``launch_configs()`` does not list)."""
    fn[grid](*args, **cfg.constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def load_rows(row_ptr, row_ok, head_dim, BLOCK_D: tl.constexpr):
    """Whole rows (``d < head_dim``) as a ``[R, BLOCK_D]`` tile, zero where masked."""
    d = tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (d < head_dim)[None, :]
    return tl.load(row_ptr[:, None] + d[None, :], mask=m, other=0.0)


@triton.jit
def to_dot(x, like_ptr, UPCAST: tl.constexpr):
    """Cast ``x`` to the operand type of tl.dot: the storage type of ``like_ptr``, or float32 when
    upcasting for the interpreter."""
    if UPCAST:
        y = x.to(tl.float32)
    else:
        y = x.to(like_ptr.dtype.element_ty)
    return y


@triton.jit
def softmax_step(s, m_i, l_i):
    """One online-softmax step on scores ``s [M, N]`` (log2 units, ``-inf`` = hidden).

    Returns ``p = exp2(s - m_new)``, the factor ``alpha`` that rescales the old sums, ``m_new`` and
    ``l_new``. A row that has seen nothing yet keeps ``m = -inf``; it is shifted by 0 instead so that
    ``-inf - -inf`` never makes a NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new
