"""ONNX export of the streaming step, and a session-like runner on onnxruntime.

One graph computes a chunk of ``1..N`` tokens per stream (decode and chunked prefill alike) over
explicit K/V caches in the runtime's layout. See docs/onnx.md. The package: :mod:`.graph` (what is
traced: the model's own blocks over a :class:`~.graph.GraphCache`), :mod:`.writer` (checks, trace,
manifest, trtexec script), :mod:`.triton_repos` (Triton Inference Server configs), :mod:`.runner`
(:class:`OnnxSession` on onnxruntime) and :mod:`.commands` (the command lines' ONNX paths).

Graph inputs (``b`` streams, ``n`` chunk rows, ``m`` logit rows, ``C = S + W``, ``h = rotary_dim // 2``):

- ``input_ids`` int64 ``[b, n]``: the chunk, right-padded (rows past ``lengths`` are ignored);
- ``logits_index`` int64 ``[b, m]``: which chunk rows to return logits for (``arange(n)`` for all,
  ``lengths - 1`` for each stream's newest);
- ``seen`` int64 ``[b]``: tokens stored per stream before this chunk; ``lengths`` int64 ``[b]``;
- ``cos_text``/``sin_text`` float32 ``[b, n, h]``: rotary angles of each row's text position
  ``t = seen + i``; ``cos_rank``/``sin_rank``: at its rank ``min(t, C - 1)``. Host-computed
  (:func:`rotary_inputs`, the runtime's exact angles): ``t * inv_freq`` in float64, reduced mod 2*pi,
  then cos/sin in float32;
  TensorRT has no float64, and float32 angles are wrong by tenths of a radian at t = 4e6.
- ``past_key.{i}``/``past_value.{i}`` ``[b, kv_heads, C, head_dim]`` (model dtype), every layer ``i``.

Outputs: ``logits`` float32 ``[b, m, vocab]`` (zero for rows ``>= lengths``), ``seen_out`` int64
``[b]`` (= ``seen + lengths``), ``present_key.{i}``/``present_value.{i}`` (the caches after the chunk).

Cache layout (the runtime's): token ``u`` in slot ``u`` if ``u < S`` else ``S + (u - S) % W``; keys
stored rotated at their text position. The query is rotated at ``t`` for window keys and at
``min(t, C - 1)`` for sink keys (docs/contract.md, "Rank positions, cheaper"). The slot
bookkeeping (which slot holds which token, A(t), which chunk rows survive) is computed in the graph
from ``seen`` and ``lengths``; the ring write is one ``ScatterND`` per cache.
"""
from __future__ import annotations

from .graph import GraphCache, StreamingStep, io_names
from .writer import DTYPES, FORMAT, MODEL_FILE, OPSET, VERSION, Profile, check_export, export_onnx, trtexec_command
from .triton_repos import triton_config, write_triton_onnx_repos
from .runner import OnnxSession, load_manifest, rotary_inputs
from .commands import build_onnx, open_engine

__all__ = ["OnnxSession", "export_onnx", "Profile", "rotary_inputs", "trtexec_command", "write_triton_onnx_repos",
           "triton_config", "load_manifest", "io_names", "StreamingStep", "GraphCache", "check_export", "build_onnx",
           "open_engine", "DTYPES", "FORMAT", "MODEL_FILE", "OPSET", "VERSION"]
