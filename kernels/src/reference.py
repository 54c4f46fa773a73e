"""Plain PyTorch references for attention over a sink + ring KV cache.

These functions are the executable specification of ``shared/design/semantics.md`` for the
kernels beside them, and the CPU path of the eager runtime. Every Triton kernel in this package is
tested against them (run in float64).

Cache layout (shared by every kernel and the runtime)
-----------------------------------------------------
``k_cache``, ``v_cache``: ``[batch, num_kv_heads, capacity, head_dim]``, last dim contiguous, with
``capacity = geometry.capacity``. Token ``u`` of a stream lives in slot ``geometry.slot(u)``; a
slot is never rewritten except by the token that evicts its occupant. ``seen[b]`` counts the
tokens stream ``b`` has stored.

Keys are stored **rotated at their text position** ``u`` (a sink's index is its text position),
by the caller, and never touched again. Scores depend only on query-key distances, so the query of
token ``t`` comes rotated twice: ``q_text`` at its text position ``t`` (scored against window keys:
distance ``t - u`` as in the text) and ``q_rank`` at its rank ``min(t, C - 1)`` (scored against
sink keys: distance ``min(t, C-1) - i``). That is the contract's rank positions exactly, with no
rotation in any kernel. For ``t < C`` the two queries are equal.
"""
from __future__ import annotations

import torch

from streaming_trt.contract import Geometry

__all__ = ["cache_write", "decode_attention", "prefill_attention"]


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    lengths: torch.Tensor,
    geometry: Geometry,
) -> None:
    """Store a chunk of new keys/values in their sink or ring slots, in place.

    Args:
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, keys already rotated, rows right-padded.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]`` (layout above).
        start: ``[batch]`` int, tokens the stream had stored before this chunk.
        lengths: ``[batch]`` int, valid tokens of this chunk per stream (``<= chunk``).
    Only the last ``window`` non-sink tokens of a long chunk survive; other slots are untouched.
    """
    chunk = k.shape[1]
    keep = geometry.kept(start, lengths, chunk)
    token = start.to(torch.int64).view(-1, 1) + torch.arange(chunk, device=k.device).view(1, -1)
    b, j = keep.nonzero(as_tuple=True)
    s = geometry.slot(token[b, j])
    k_cache[b, :, s] = k[b, j].to(k_cache.dtype)
    v_cache[b, :, s] = v[b, j].to(v_cache.dtype)


def _softmax_with_sink_logits(scores: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of ``scores [batch, heads, ..., keys]``; ``-inf`` marks hidden keys.

    ``sink_logits [heads]`` adds ``exp(s_h)`` to each denominator with no value vector.
    """
    if sink_logits is None:
        return torch.softmax(scores, dim=-1)
    extra = sink_logits.to(scores.dtype).view(1, -1, *([1] * (scores.dim() - 2))).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., :-1]


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
    """One query per stream over its cache, which already holds the query's own key/value.

    Args:
        q_text, q_rank: ``[batch, num_heads, head_dim]``, the query of token ``t = seen - 1``
            rotated at ``t`` and at ``min(t, C - 1)``; ``num_heads`` a multiple of ``num_kv_heads``.
            Passing the same tensor for both says no stream is past capacity (the sink scores are
            then the window ones, not formed twice).
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, keys rotated (layout above).
        seen: ``[batch]`` int, tokens stored including the current one (``>= 1``).
        sink_logits: optional ``[num_heads]`` learned per-head sink logit.
        full: the caller knows every stream has ``seen >= capacity``: no slot is masked or copied.
        written: what the caller's host knows of ``seen``: ``(lo, hi)``, the least and the
            greatest ``min(seen, C)`` over the streams: slots ``< lo`` are written in every stream
            and no stream has one ``>= hi``. Only slots ``< hi`` are read and only ``lo .. hi - 1``
            masked. None: all C slots, masked unless ``full``. (The Triton kernel reads ``seen``
            on the device and ignores it.)
    Returns:
        ``[batch, num_heads, head_dim]`` in ``q_text.dtype``.
    """
    batch, num_heads, head_dim = q_text.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group, sinks = num_heads // kv_heads, geometry.sink_tokens
    lo, hi = (capacity, capacity) if full else (written if written is not None else (0, capacity))
    keys, vals = k_cache[:, :, :hi], v_cache[:, :, :hi]
    # Query heads of one KV head share its keys: [batch, kv_heads, group, head_dim].
    qt = q_text.view(batch, kv_heads, group, head_dim).to(k_cache.dtype)
    scores = qt @ keys.transpose(-1, -2)  # [batch, kv_heads, group, hi]
    if sinks and q_rank is not q_text:
        qr = q_rank.view(batch, kv_heads, group, head_dim).to(k_cache.dtype)
        scores[..., :sinks] = qr @ keys[:, :, :sinks].transpose(-1, -2)
    scores = scores.view(batch, num_heads, hi) * sm_scale
    if lo < hi:
        # Before a stream is full, slot s holds token s: the slots in use are 0 .. seen - 1.
        visible = torch.arange(lo, hi, device=seen.device).view(1, -1) < seen.view(-1, 1)  # [batch, hi - lo]
        scores[..., lo:].masked_fill_(~visible.view(batch, 1, hi - lo), float("-inf"))
    p = _softmax_with_sink_logits(scores, sink_logits).view(batch, kv_heads, group, hi).to(vals.dtype)
    # Slots every stream has written are read as they are; only the others are zeroed (0 * NaN is NaN).
    out = p[..., :lo] @ vals[:, :, :lo] if lo else None
    if lo < hi:
        tail = p[..., lo:] @ torch.where(visible.view(batch, 1, hi - lo, 1), vals[:, :, lo:], 0)
        out = tail if out is None else out + tail
    return out.view(batch, num_heads, head_dim).to(q_text.dtype)


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
    """A chunk of new tokens per stream over the cache as it was before the chunk plus the chunk.

    Args:
        q_text, q_rank: ``[batch, chunk, num_heads, head_dim]``, row ``i`` (token
            ``t = start + i``) rotated at ``t`` and at ``min(t, C - 1)``; rows right-padded.
            The same tensor for both: no row is past capacity (sink scores are not formed twice).
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, the chunk's own keys (rotated at their
            text positions) and values.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, not yet holding the chunk.
        start: ``[batch]`` int, tokens stored before the chunk.
        lengths: ``[batch]`` int, valid rows per stream.
        sink_logits: optional ``[num_heads]``.
    Returns:
        ``[batch, chunk, num_heads, head_dim]`` in ``q_text.dtype``; padded rows are zero.

    Token ``t`` sees A(t) of the contract, whatever the chunk size (longer than the window too).
    """
    batch, chunk, num_heads, head_dim = q_text.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    start = start.to(torch.int64).view(-1, 1)
    used = min(geometry.capacity, int(start.max()))  # slots past every stream's length are still empty
    rows = torch.arange(chunk, device=q_text.device).view(1, -1)
    t = start + rows  # [batch, chunk] token of each query
    row_valid = rows < lengths.view(-1, 1)

    # Keys: the cache slots in use, then the chunk's own rows.
    token = torch.cat([geometry.slot_tokens(start.view(-1))[:, :used], torch.where(row_valid, t, -1)], 1)
    keys = torch.cat([k_cache[:, :, :used], k.transpose(1, 2).to(k_cache.dtype)], dim=2)  # [batch, kv, keys, d]
    vals = torch.cat([v_cache[:, :, :used], v.transpose(1, 2).to(v_cache.dtype)], dim=2)
    visible = geometry.visible(t.unsqueeze(-1), token.unsqueeze(1)) & row_valid.unsqueeze(-1)  # [b, chunk, keys]
    # Unwritten keys only give scores that are masked below; unwritten values are zeroed (0 * NaN is NaN).
    vals = torch.where((token >= 0).view(batch, 1, -1, 1), vals, 0)

    # Query heads of one KV head share its keys: fold them into the row dimension.
    fold = lambda q: q.transpose(1, 2).reshape(batch, kv_heads, group * chunk, head_dim).to(keys.dtype)  # noqa: E731
    scores = fold(q_text) @ keys.transpose(-1, -2)
    if geometry.sink_tokens and q_rank is not q_text:
        is_sink = (token < geometry.sink_tokens) & (token >= 0)
        scores = torch.where(is_sink.view(batch, 1, 1, -1), fold(q_rank) @ keys.transpose(-1, -2), scores)
    scores = scores.view(batch, kv_heads, group, chunk, -1) * sm_scale
    scores = scores.masked_fill(~visible.view(batch, 1, 1, chunk, -1), float("-inf"))
    p = _softmax_with_sink_logits(scores.view(batch, num_heads, chunk, -1), sink_logits)
    p = torch.nan_to_num(p, nan=0.0)  # padded rows see nothing
    out = p.view(batch, kv_heads, group * chunk, -1).to(vals.dtype) @ vals
    return out.view(batch, num_heads, chunk, head_dim).transpose(1, 2).to(q_text.dtype)
