"""Plain PyTorch references for attention over a sink + ring KV cache.

These functions are the executable specification of ``shared/design/semantics.md`` for the
kernels beside them, and the CPU path of the eager runtime. Every Triton kernel in this package is
tested against them (run in float64).

Cache layout (shared by every kernel and the runtime)
-----------------------------------------------------
``k_cache``, ``v_cache``: ``[batch, num_kv_heads, capacity, head_dim]``, contiguous, with
``capacity = sink_tokens + window``. Keys are stored *before* rotation. Token ``u`` of a stream
lives in slot ``u`` when ``u < sink_tokens`` and in ring slot
``sink_tokens + (u - sink_tokens) % window`` otherwise; a slot is never rewritten except by the
token that evicts its occupant. ``seen[b]`` counts the tokens stream ``b`` has stored.

Rotary tables
-------------
``cos``, ``sin``: ``[num_positions, rotary_dim // 2]`` float32 (float64 in tests), the
rotate-half (Llama / GPT-NeoX) convention: for ``x = [x1, x2, rest]`` with ``x1, x2`` of width
``rotary_dim // 2``, ``rot(x, p) = [x1 cos_p - x2 sin_p, x2 cos_p + x1 sin_p, rest]``.
Decode needs ``num_positions >= capacity``; a chunk of ``n`` tokens needs
``num_positions >= max(capacity, window + n - 1)`` (see :func:`prefill_attention`).
"""
from __future__ import annotations

import torch

__all__ = [
    "apply_rotary",
    "slot_tokens",
    "cache_write",
    "decode_attention",
    "prefill_attention",
]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., head_dim]`` by ``cos``/``sin [..., rotary_dim // 2]`` (broadcast)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def slot_tokens(seen: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Which token of its stream each cache slot holds.

    Args:
        seen: ``[batch]`` int, tokens stored so far per stream.
    Returns:
        ``[batch, capacity]`` int64: the token index in each slot, ``-1`` for a slot never written.
    """
    capacity = sink_tokens + window
    seen = seen.to(torch.int64).view(-1, 1)
    slot = torch.arange(capacity, device=seen.device).view(1, -1)
    ring = slot - sink_tokens  # offset inside the ring, negative for sink slots
    last = seen - 1 - sink_tokens - ring  # how far the newest candidate lies past this slot
    ring_token = sink_tokens + ring + window * torch.div(last, window, rounding_mode="floor")
    token = torch.where(ring < 0, slot, ring_token)
    written = torch.where(ring < 0, slot < seen, last >= 0)
    return torch.where(written, token, torch.full_like(token, -1))


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    lengths: torch.Tensor,
    sink_tokens: int,
    window: int,
) -> None:
    """Store a chunk of new keys/values in their sink or ring slots, in place.

    Args:
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, unrotated, rows right-padded.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]`` (layout above).
        start: ``[batch]`` int, tokens the stream had stored before this chunk.
        lengths: ``[batch]`` int, valid tokens of this chunk per stream (``<= chunk``).
    Only the last ``window`` non-sink tokens of a long chunk survive; other slots are untouched.
    """
    batch, chunk = k.shape[:2]
    idx = torch.arange(chunk, device=k.device)
    token = start.to(torch.int64).view(-1, 1) + idx.view(1, -1)  # [batch, chunk]
    end = (start + lengths).to(torch.int64).view(-1, 1)
    keep = (idx.view(1, -1) < lengths.view(-1, 1)) & ((token < sink_tokens) | (token >= end - window))
    slot = torch.where(token < sink_tokens, token, sink_tokens + (token - sink_tokens) % window)
    b, j = keep.nonzero(as_tuple=True)
    s = slot[b, j]
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
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seen: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_tokens: int,
    window: int,
    sm_scale: float,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per stream over its cache, which already holds the query's own key/value.

    Args:
        q: ``[batch, num_heads, head_dim]``, unrotated query of token ``t = seen - 1``.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``; ``num_heads`` must be a
            multiple of ``num_kv_heads``.
        seen: ``[batch]`` int, tokens stored including the current one (``>= 1``).
        cos, sin: ``[num_positions >= capacity, rotary_dim // 2]``.
        sink_logits: optional ``[num_heads]`` learned per-head sink logit.
    Returns:
        ``[batch, num_heads, head_dim]`` in ``q.dtype``.

    The query sits at position ``min(t, capacity - 1)``; a sink key at its token index; a window
    key ``u`` at ``min(t, capacity - 1) - (t - u)``: each key's rank inside the cache.
    """
    capacity = sink_tokens + window
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    token = slot_tokens(seen, sink_tokens, window)  # [batch, capacity]
    t = (seen.to(torch.int64) - 1).view(-1, 1)
    q_pos = torch.clamp(t, max=capacity - 1)
    k_pos = torch.where(token < sink_tokens, token, q_pos - (t - token)).clamp(min=0)
    visible = (token >= 0).view(batch, 1, 1, capacity)
    k = apply_rotary(k_cache, cos[k_pos].unsqueeze(1), sin[k_pos].unsqueeze(1))
    qr = apply_rotary(q, cos[q_pos], sin[q_pos])  # cos[q_pos]: [batch, 1, half] broadcasts over heads
    # Query heads of one KV head share its keys: [batch, kv_heads, group, head_dim].
    qr = qr.view(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = (qr @ k.to(qr.dtype).transpose(-1, -2)) * sm_scale
    scores = scores.masked_fill(~visible, float("-inf")).view(batch, num_heads, capacity)
    p = _softmax_with_sink_logits(scores, sink_logits).view(batch, kv_heads, -1, capacity)
    v = torch.where(visible.view(batch, 1, capacity, 1), v_cache, 0)
    return (p @ v.to(p.dtype)).view(batch, num_heads, head_dim).to(q.dtype)


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
    """A chunk of new tokens per stream over the cache as it was before the chunk plus the chunk.

    Args:
        q: ``[batch, chunk, num_heads, head_dim]``, unrotated, rows right-padded.
        k, v: ``[batch, chunk, num_kv_heads, head_dim]``, the chunk's own unrotated keys/values.
        k_cache, v_cache: ``[batch, num_kv_heads, capacity, head_dim]``, not yet holding the chunk.
        start: ``[batch]`` int, tokens stored before the chunk (token of row ``i`` is
            ``start + i``).
        lengths: ``[batch]`` int, valid rows per stream.
        cos, sin: ``[num_positions, rotary_dim // 2]`` with
            ``num_positions >= max(capacity, window + chunk - 1)``.
        sink_logits: optional ``[num_heads]``.
    Returns:
        ``[batch, chunk, num_heads, head_dim]`` in ``q.dtype``; padded rows are zero.

    Token ``t`` sees A(t) of the contract. Scores only depend on query-key distances, so sink keys
    are scored with the query at its rank ``min(t, capacity - 1)`` and the keys at their index,
    and window keys with both rotated at their text position minus ``start - window + 1``, which
    keeps every angle inside the table however long the stream is.
    """
    capacity = sink_tokens + window
    batch, chunk, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    start = start.to(torch.int64).view(-1, 1)
    used = min(capacity, int(start.max()))  # slots past every stream's length are still empty
    rows = torch.arange(chunk, device=q.device).view(1, -1)
    t = start + rows  # [batch, chunk] token of each query
    row_valid = rows < lengths.view(-1, 1)

    # Keys: the cache slots in use, then the chunk's own rows.
    token = torch.cat([slot_tokens(start.view(-1), sink_tokens, window)[:, :used], torch.where(row_valid, t, -1)], 1)
    keys = torch.cat([k_cache[:, :, :used], k.transpose(1, 2).to(k_cache.dtype)], dim=2)  # [batch, kv, keys, d]
    vals = torch.cat([v_cache[:, :, :used], v.transpose(1, 2).to(v_cache.dtype)], dim=2)
    tq, tk = t.unsqueeze(-1), token.unsqueeze(1)  # [batch, chunk, 1], [batch, 1, keys]
    is_sink = token < sink_tokens
    visible = (tk >= 0) & (tk <= tq) & (is_sink.unsqueeze(1) | (tk > tq - window)) & row_valid.unsqueeze(-1)

    base = start - window + 1  # smallest text position a window key of this chunk can have
    rot = lambda x, p: apply_rotary(x, cos[p].unsqueeze(1), sin[p].unsqueeze(1))  # noqa: E731
    written = (token >= 0).view(batch, 1, -1, 1)
    k_rot = torch.where(written, rot(keys, torch.where(is_sink, token, token - base).clamp(min=0)), 0)
    vals = torch.where(written, vals, 0)
    # One product scores both kinds of key: the query rotated at its rank sits in the first half,
    # rotated at its text offset in the second; a sink key fills only the first half, a window key
    # only the second.
    qh = q.transpose(1, 2)  # [batch, heads, chunk, d]
    q2 = torch.cat([rot(qh, t.clamp(max=capacity - 1)), rot(qh, t - base)], dim=-1)
    sink_col = is_sink.view(batch, 1, -1, 1)
    k2 = torch.cat([torch.where(sink_col, k_rot, 0), torch.where(sink_col, 0, k_rot)], dim=-1).to(q2.dtype)
    # Query heads of one KV head share its keys: fold them into the row dimension.
    q2 = q2.reshape(batch, kv_heads, group * chunk, 2 * head_dim)
    scores = (q2 @ k2.transpose(-1, -2)).view(batch, kv_heads, group, chunk, -1) * sm_scale
    scores = scores.masked_fill(~visible.view(batch, 1, 1, chunk, -1), float("-inf"))
    p = _softmax_with_sink_logits(scores.view(batch, num_heads, chunk, -1), sink_logits)
    p = torch.nan_to_num(p, nan=0.0)  # padded rows see nothing
    out = p.view(batch, kv_heads, group * chunk, -1) @ vals.to(p.dtype)
    return out.view(batch, num_heads, chunk, head_dim).transpose(1, 2).to(q.dtype)
