"""PyTorch references for recall of evicted tokens: block scores and attention over sinks +
recalled blocks + window (``shared/design/semantics.md``, "Recall of evicted tokens").

Layout: the cache as in :mod:`streaming_trt.kernels.reference` (keys rotated at their text
position). Recalled blocks arrive gathered, ``blk_k, blk_v [batch, k, kv_heads, B, head_dim]``,
selected block ``i`` (text order) at index ``i`` (the block store's own layout), keys still rotated
at their text positions. Scores depend only on query-key distances, so instead of re-rotating the ``B`` keys of a
block for their ranks, the query comes rotated once per selected block (``q_block``) at the
position that gives every key of the block its rank distance; sinks score with ``q_sink`` (the
query at its rank ``|A_R(t)| - 1``), the window with ``q_text``. No rotation happens here.

Block summaries (``lo``, ``hi``, ``reps``) hold keys in one common frame (rotated back to
position 0); the caller rotates the scoring query accordingly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from streaming_trt.contract import Geometry

__all__ = ["bound_scores", "representative_scores", "block_votes", "recall_decode_attention",
           "recall_prefill_attention", "attention_mass"]


def bound_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quest upper bounds: ``q [n, heads, d]``, ``lo, hi [blocks, kv_heads, d]`` the per-channel
    min/max of each block's keys -> ``[n, heads, blocks]``, ``sum_d max(q_d lo_d, q_d hi_d)``, the
    largest ``q . k`` of any key inside the box (so at least that of every key of the block)."""
    n, heads, d = q.shape
    kv = lo.shape[1]
    qg = q.view(n, kv, heads // kv, d).transpose(0, 1).reshape(kv, -1, d).to(lo.dtype)  # [kv, n*g, d]
    s = qg.clamp(min=0) @ hi.permute(1, 2, 0) + qg.clamp(max=0) @ lo.permute(1, 2, 0)  # [kv, n*g, blocks]
    return s.view(kv, n, heads // kv, -1).transpose(0, 1).reshape(n, heads, -1)


def representative_scores(q: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """InfLLM: ``q [n, heads, d]``, ``reps [blocks, kv_heads, r, d]`` representative keys ->
    ``[n, heads, blocks]``, the largest ``q . rep`` over a block's representatives."""
    n, heads, d = q.shape
    nb, kv, r = reps.shape[:3]
    qg = q.view(n, kv, heads // kv, d).transpose(0, 1).reshape(kv, -1, d).to(reps.dtype)  # [kv, n*g, d]
    s = (qg @ reps.permute(1, 3, 0, 2).reshape(kv, d, nb * r)).view(kv, -1, nb, r).amax(-1)
    return s.view(kv, n, heads // kv, nb).transpose(0, 1).reshape(n, heads, nb)


def block_votes(scores: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``scores [n, heads, blocks]`` -> ``[blocks]``: per query row and head a softmax over the
    blocks (the share of attention the head would give each block), summed over rows and heads.
    A head that looks at one block gives it about 1; heads that look nowhere spread theirs thin."""
    return torch.softmax(scores * sm_scale, dim=-1).sum((0, 1))


def _group(q: torch.Tensor, kv: int) -> torch.Tensor:
    """``[batch, heads, ...rest]`` -> ``[batch, kv, group, ...rest]``."""
    return q.view(q.shape[0], kv, q.shape[1] // kv, *q.shape[2:])


def _two_part_softmax(a: torch.Tensor, b: torch.Tensor, sink: torch.Tensor | None):
    """Softmax over the concatenation of ``a [..., m]`` and ``b [..., n]`` (last dim), returned as
    its two parts, without forming the concatenation; ``sink`` (learned sink logits, broadcast to
    ``[..., 1]``) joins the denominator."""
    m = b.amax(-1, keepdim=True)
    if a.shape[-1]:
        m = torch.maximum(m, a.amax(-1, keepdim=True))
    if sink is not None:
        sink = sink.to(a.dtype).expand_as(m)
        m = torch.maximum(m, sink)
    ea, eb = torch.exp(a - m), torch.exp(b - m)
    denom = ea.sum(-1, keepdim=True) + eb.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    return ea / denom, eb / denom


def recall_decode_attention(q_text, q_sink, q_block, k_cache, v_cache, blk_k, blk_v, geometry: "Geometry",
                            sm_scale: float, sink_logits=None, mass: bool = False):
    """One query per stream over sinks + recalled blocks + window; every stream full (``seen >= C``)
    and its cache already holding the query's own key/value.

    Args:
        q_text, q_sink: ``[batch, heads, d]`` rotated at the text position ``t`` and at the rank
            ``|A_R(t)| - 1``. q_block: ``[batch, heads, k, d]``, rotated for each block.
        k_cache, v_cache: ``[batch, kv_heads, capacity, d]``.
        blk_k, blk_v: ``[batch, k, kv_heads, B, d]``, the selected blocks in text order.
        mass: also return the attention each cache slot received, ``[batch, kv_heads, capacity]``
            float32 summed over the KV head's query heads.
    Returns ``[batch, heads, d]`` in ``q_text.dtype`` (and the mass).
    """
    batch, heads, d = q_text.shape
    kv, cap = k_cache.shape[1], k_cache.shape[2]
    g = heads // kv
    dt = k_cache.dtype
    scores = _group(q_text, kv).to(dt) @ k_cache.transpose(-1, -2)  # [b, kv, g, C]
    s = geometry.sink_tokens
    if s:
        scores[..., :s] = _group(q_sink, kv).to(dt) @ k_cache[:, :, :s].transpose(-1, -2)
    bk = blk_k.transpose(1, 2)  # [b, kv, k, B, d]
    qb = _group(q_block, kv).to(dt).transpose(2, 3)  # [b, kv, k, g, d]
    bscores = qb @ bk.transpose(-1, -2)  # [b, kv, k, g, B]
    pb, pc = _two_part_softmax(bscores.transpose(2, 3).reshape(batch, kv, g, -1) * sm_scale, scores * sm_scale,
                               None if sink_logits is None else sink_logits.view(1, kv, g, 1))
    pb = pb.view(batch, kv, g, -1, bk.shape[3]).transpose(2, 3).to(dt)  # [b, kv, k, g, B]
    out = (pb @ blk_v.transpose(1, 2)).sum(2) + pc.to(dt) @ v_cache  # [b, kv, g, d]
    out = out.reshape(batch, heads, d).to(q_text.dtype)
    return (out, pc.float().sum(2)) if mass else out


def recall_prefill_attention(q_text, q_sink, q_block, k, v, k_cache, v_cache, blk_k, blk_v, start, lengths,
                             geometry: "Geometry", sm_scale: float, sink_logits=None, mass: bool = False):
    """A chunk of new tokens per stream over sinks + recalled blocks + window; every stream full
    before the chunk (``start >= C``) and its cache not yet holding the chunk.

    Args:
        q_text: ``[batch, n, heads, d]`` row ``i`` rotated at ``start + i``; q_sink the same at
            the rank ``|A_R(t)| - 1`` (one value: every row is past capacity); q_block
            ``[batch, n, heads, k, d]``. k, v: ``[batch, n, kv_heads, d]`` the chunk (keys rotated).
        start, lengths: ``[batch]`` int. mass: also return the attention each cache slot and
            chunk row received, ``[batch, kv_heads, C + n]`` float32. Others as
            :func:`recall_decode_attention`.
    Returns ``[batch, n, heads, d]`` in ``q_text.dtype``; padded rows zero (and the mass).
    """
    batch, n, heads, d = q_text.shape
    kv, cap = k_cache.shape[1], k_cache.shape[2]
    g = heads // kv
    nblk, B = blk_k.shape[1], blk_k.shape[3]
    dt = k_cache.dtype
    start = start.to(torch.int64).view(-1, 1)
    rows = torch.arange(n, device=q_text.device).view(1, -1)
    t = start + rows
    row_valid = rows < lengths.view(-1, 1)
    token = torch.cat([geometry.slot_tokens(start.view(-1)), torch.where(row_valid, t, -1)], 1)  # [b, C + n]
    keys = torch.cat([k_cache, k.transpose(1, 2).to(dt)], 2)  # [b, kv, C + n, d]
    vals = torch.cat([v_cache, v.transpose(1, 2).to(dt)], 2)
    visible = geometry.visible(t.unsqueeze(-1), token.unsqueeze(1)) & row_valid.unsqueeze(-1)  # [b, n, C + n]
    seen_by_any = visible.any(1).view(batch, 1, -1, 1)  # others may be unwritten (NaN)
    keys, vals = torch.where(seen_by_any, keys, 0), torch.where(seen_by_any, vals, 0)
    fold = lambda q: q.transpose(1, 2).reshape(batch, kv, g * n, d).to(dt)  # noqa: E731
    scores = fold(q_text) @ keys.transpose(-1, -2)
    if geometry.sink_tokens:
        is_sink = (token < geometry.sink_tokens) & (token >= 0)
        scores = torch.where(is_sink.view(batch, 1, 1, -1), fold(q_sink) @ keys.transpose(-1, -2), scores)
    scores = scores.view(batch, kv, g, n, -1).masked_fill(~visible.view(batch, 1, 1, n, -1), float("-inf"))
    qb = q_block.permute(0, 2, 3, 1, 4).reshape(batch, kv, g, nblk, n, d).transpose(2, 3).to(dt)  # [b, kv, k, g, n, d]
    bk = blk_k.transpose(1, 2).unsqueeze(3)  # [b, kv, k, 1, B, d]
    bscores = (qb @ bk.transpose(-1, -2)).permute(0, 1, 3, 4, 2, 5).reshape(batch, kv, g, n, nblk * B)
    pb, pc = _two_part_softmax(bscores * sm_scale, scores * sm_scale,
                               None if sink_logits is None else sink_logits.view(1, kv, g, 1, 1))
    ok = row_valid.view(batch, 1, 1, n, 1)
    pb, pc = torch.where(ok, pb, 0), torch.where(ok, pc, 0)  # padded rows see nothing
    bv = blk_v.transpose(1, 2).reshape(batch, kv, 1, nblk * B, d)
    out = pb.to(dt) @ bv + pc.to(dt) @ vals.unsqueeze(2)  # [b, kv, g, n, d]
    out = out.reshape(batch, heads, n, d).transpose(1, 2).to(q_text.dtype)
    return (out, pc.float().sum((2, 3))) if mass else out


def attention_mass(q_text, q_rank, k, k_cache, start, lengths, geometry: "Geometry", sm_scale: float) -> torch.Tensor:
    """The attention each key receives from a chunk's queries over their plain A(t) (sinks +
    window, recalled blocks left out), summed over rows and the query heads of its KV head: what
    InfLLM's representative keys are chosen by.

    Args as :func:`streaming_trt.kernels.reference.prefill_attention` (cache not yet holding the
    chunk). Returns float32 ``[batch, kv_heads, C + n]``: first the cache slots, then the chunk's rows.
    """
    batch, n, heads, d = q_text.shape
    kv = k.shape[2]
    g = heads // kv
    start = start.to(torch.int64).view(-1, 1)
    rows = torch.arange(n, device=q_text.device).view(1, -1)
    t = start + rows
    row_valid = rows < lengths.view(-1, 1)
    token = torch.cat([geometry.slot_tokens(start.view(-1)), torch.where(row_valid, t, -1)], 1)
    keys = torch.cat([k_cache, k.transpose(1, 2).to(k_cache.dtype)], 2).float()
    visible = geometry.visible(t.unsqueeze(-1), token.unsqueeze(1)) & row_valid.unsqueeze(-1)
    keys = torch.where(visible.any(1).view(batch, 1, -1, 1), keys, 0)
    fold = lambda q: q.transpose(1, 2).reshape(batch, kv, g * n, d).float()  # noqa: E731
    scores = fold(q_text) @ keys.transpose(-1, -2)
    if geometry.sink_tokens:
        is_sink = (token < geometry.sink_tokens) & (token >= 0)
        scores = torch.where(is_sink.view(batch, 1, 1, -1), fold(q_rank) @ keys.transpose(-1, -2), scores)
    scores = scores.view(batch, kv, g, n, -1).masked_fill(~visible.view(batch, 1, 1, n, -1), float("-inf"))
    p = torch.nan_to_num(torch.softmax(scores * sm_scale, -1), nan=0.0)
    return p.sum((2, 3))
