"""The streaming step as one traceable graph over explicit K/V caches (what ``export_onnx`` traces).

The model's own modules run it: every decoder :class:`~streaming_trt.runtime.model.Block` (its norms,
projections, q/k norms and MLP) is called as the runtime calls it, with a :class:`GraphCache` in the
place of the runtime's cache and a :class:`~streaming_trt.runtime.cache.StepPlan` built from the graph inputs
(the host-formed cos/sin), so the rotation is :func:`streaming_trt.runtime.rope.apply_rotary`. Only the
attention over the past caches, and the ring write into them, are written here, as plain tensor ops
that the ONNX exporter and TensorRT take: the slot bookkeeping (which slot holds which token, A(t),
which chunk rows survive) is computed from ``seen`` and ``lengths``; the write is one ``ScatterND``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streaming_trt.runtime.cache import StepPlan
from streaming_trt.runtime.rope import apply_rotary

INPUTS = ["input_ids", "logits_index", "seen", "lengths", "sink_tokens", "cos_text", "sin_text", "cos_rank", "sin_rank"]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    cache_in = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    cache_out = [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    return INPUTS + cache_in, ["logits", "seen_out"] + cache_out


class GraphCache:
    """The runtime cache's ``attend`` over explicit past caches, for one traced chunk.

    Built per forward from the graph inputs: ``past`` (keys and values interleaved per layer,
    ``[b, kv_heads, C, head_dim]``), ``seen`` / ``lengths`` ``[b]`` and ``sink_tokens`` ``[b]`` (per
    stream; the window is ``C - sink_tokens``). ``presents`` collects the caches after the chunk.
    """

    def __init__(self, past, seen: torch.Tensor, lengths: torch.Tensor, sink_tokens: torch.Tensor, n: int):
        self.past, self.presents = past, []
        b, C, dev = seen.shape[0], past[0].shape[2], seen.device
        S = sink_tokens[:, None]  # [b, 1]
        W = C - S
        i = torch.arange(n, device=dev)
        t = seen[:, None] + i[None, :]  # [b, n] text positions
        end = (seen + lengths)[:, None]
        valid = i[None, :] < lengths[:, None]  # [b, n]
        # Which token each cache slot holds before the chunk (-1: never written).
        slot = torch.arange(C, device=dev)[None, :]  # [1, C]
        ring = slot - S  # [b, C]
        in_ring = (seen[:, None] - S).clamp(min=0)  # tokens that went to the ring so far
        back = (in_ring - 1 - ring).clamp(min=0)  # >= 0: integer Mod only (no float division of positions)
        tok = torch.where(ring < 0, slot, S + ring + back - back % W)
        written = ((ring < 0) & (slot < seen[:, None])) | ((ring >= 0) & (ring < in_ring))
        # A(t) over the old cache [b, n, C] and over the chunk itself [b, n, n].
        tq, S3, W3 = t[:, :, None], S[:, :, None], W[:, :, None]
        tk = tok[:, None, :]
        vis_cache = written[:, None, :] & ((tk < S3) | (tk > tq - W3))
        u = t[:, None, :]  # key token of chunk column j
        j, ii = i[None, None, :], i[None, :, None]
        vis_chunk = ((j <= ii) & valid[:, None, :] & ((u < S3) | (u > tq - W3))) | (j == ii)
        self.visible = torch.cat([vis_cache, vis_chunk], dim=-1)[:, None, None]  # [b, 1, 1, n, C + n]
        self.key_sink = torch.cat([slot < S, t < S], dim=-1)[:, None, None, None, :]  # [b, 1, 1, 1, C + n]
        # Ring write: the chunk rows that survive go to their slot, the others onto their own column.
        kept = valid & ((t < S) | (t >= end - W))
        tslot = torch.where(t < S, t, S + (t - S).clamp(min=0) % W)
        dest = torch.where(kept, tslot, C + i[None, :])  # [b, n], unique per row
        self.index = (torch.arange(b, device=dev)[:, None, None], None, dest[:, None, :])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan,
               sm_scale: float, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`streaming_trt.runtime.cache.StreamingCache.attend`: ``q [b, n, heads, d]``, ``k, v
        [b, n, kv_heads, d]`` -> ``[b, n, heads, d]``; the layer's caches after the chunk go to ``presents``."""
        b, n, heads, d = q.shape
        kvh = k.shape[2]
        g = heads // kvh
        q_text, q_rank = plan.rotate(q)
        k = apply_rotary(k, *plan.text).permute(0, 2, 1, 3)  # [b, kv, n, d]
        v = v.permute(0, 2, 1, 3)
        qt = (q_text * sm_scale).view(b, n, kvh, g, d).permute(0, 2, 3, 1, 4)  # [b, kv, g, n, d]
        qr = (q_rank * sm_scale).view(b, n, kvh, g, d).permute(0, 2, 3, 1, 4)
        past_k, past_v = self.past[2 * layer], self.past[2 * layer + 1]
        keys = torch.cat([past_k[:, :, None], k[:, :, None]], dim=3)  # [b, kv, 1, C + n, d]
        scores = torch.where(self.key_sink, qr @ keys.transpose(-1, -2), qt @ keys.transpose(-1, -2))
        scores = scores.float().masked_fill(~self.visible, float("-inf"))
        if sink_logits is None:
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
        else:  # exp(s_h) joins every denominator with no value (a constant of the graph per head)
            extra = sink_logits.float().view(1, kvh, g, 1, 1).expand_as(scores[..., :1])
            probs = torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., :-1].to(q.dtype)
        out = probs @ torch.cat([past_v[:, :, None], v[:, :, None]], dim=3)  # [b, kv, g, n, d]
        bi, _, di = self.index
        hi = torch.arange(kvh, device=q.device)[None, :, None]
        C = past_k.shape[2]
        for cache, new in ((past_k, k), (past_v, v)):
            full = torch.cat([cache, new], dim=2).index_put((bi, hi, di), new)  # [b, kv, C + n, d]
            self.presents.append(full[:, :, :C])
        return out.permute(0, 3, 1, 2, 4).reshape(b, n, heads, d)


class StreamingStep(nn.Module):
    """The streaming step of a :class:`streaming_trt.runtime.model.Transformer` with explicit caches.

    ``forward`` takes and returns the tensors listed in :mod:`streaming_trt.export.onnx` (past
    caches as ``*past``: keys and values interleaved per layer); the model's modules do the work.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, logits_index, seen, lengths, sink_tokens, cos_text, sin_text, cos_rank,
                sin_rank, *past):
        m = self.model
        n = input_ids.shape[1]
        cache = GraphCache(past, seen, lengths, sink_tokens, n)
        plan = StepPlan(start=seen, lengths=lengths, seen_after=seen + lengths, decode=False, full=False,
                        text=(cos_text[:, :, None], sin_text[:, :, None]), rank=(cos_rank[:, :, None], sin_rank[:, :, None]))
        x = m.embed_tokens(input_ids)
        for i, block in enumerate(m.layers):
            x = block(x, i, cache, plan)
        idx = logits_index.clamp(min=0, max=n - 1)
        xs = torch.gather(x, 1, idx[:, :, None].expand(x.shape[0], idx.shape[1], x.shape[-1]))
        head = m.embed_tokens.weight if m.config.tie_word_embeddings else m.lm_head.weight
        logits = F.linear(m.norm(xs), head).float()
        logits = torch.where((logits_index < lengths[:, None])[:, :, None], logits, torch.zeros_like(logits))
        return (logits, seen + lengths, *cache.presents)
