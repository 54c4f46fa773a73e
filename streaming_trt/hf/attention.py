"""The ``"streaming_trt"`` attention function: every query over its A(t), sinks scored at its rank."""
from __future__ import annotations

import threading

import torch

from ..contract import UserError, exact_angles
from .rotary import rotate_heads

#: ``ACTIVE.cache``: the HFStreamingCache of the streaming forward running on this thread (set by the
#: wrapped base forward of :mod:`streaming_trt.hf.enable`), read by :func:`streaming_attention`.
ACTIVE = threading.local()

#: the attention modules' non-persistent buffer of learned sink logits ``[num_heads]`` (config.json
#: ``sink_logits``; set by :func:`streaming_trt.hf.enable_streaming`)
SINKS_ATTR = "streaming_trt_sinks"
ALIBI_ATTR = "streaming_trt_alibi"  # [H] ALiBi slopes of an attention module, already scaled like its scores


def streaming_attention(module, query, key, value, attention_mask=None, *, scaling=None, dropout=0.0,
                        softcap=None, sliding_window=None, **kwargs):
    """The ``"streaming_trt"`` attention function.

    ``query [B, H, q, D]`` rotated at text positions; ``key / value [B, KVH, C+q, D]`` from
    :meth:`StreamingLayer.update` (cache slots, then the chunk). Returns ``([B, q, H, D], None)``.
    Token t attends to A(t); its scores against sink slots use the query rotated at ``min(t, C-1)``.
    ``softcap`` (Gemma 2) is applied to the scores; ``sliding_window`` (Gemma, Mistral, Qwen2 sliding
    layers) is measured in rank distance, as re-computation on A(t) would. A module with ALiBi slopes
    (:data:`ALIBI_ATTR`: MPT, Falcon-RW) adds ``-slope * rank distance``; such queries come unrotated.
    """
    cache = getattr(ACTIVE, "cache", None)
    if cache is None:
        raise UserError("the streaming_trt attention runs only inside a forward with a StreamingCache "
                        "(model enabled by streaming_trt.hf.enable_streaming)")
    layer = cache.layers[module.layer_idx]
    geo = cache.geometry
    S, C = geo.sink_tokens, geo.capacity
    B, H, q, D = query.shape
    qpos = cache.chunk_pos  # [B, q]
    qrank = geo.rank(qpos)
    if scaling is None:
        scaling = D ** -0.5
    freqs = cache.layer_freqs[module.layer_idx]
    sinks = getattr(module, SINKS_ATTR, None)  # [H] learned sink logits (zeros: softmax-off-by-one)
    alibi_slopes = getattr(module, ALIBI_ATTR, None)
    needs_rank = cache.masks.get("rank")
    if needs_rank is None:  # one host sync per chunk, not per layer
        needs_rank = cache.masks["rank"] = S > 0 and bool((qpos >= C).any())
    needs_rank = needs_rank and freqs is not None
    if layer.pending is not None:
        return _kernel_attention(cache, layer, query, qpos, qrank, freqs if needs_rank else None, scaling, sinks), None

    kpos = layer.last_kpos  # [B, L]
    L = kpos.shape[1]
    allowed = cache.masks.get(("allowed", L))  # every layer holds the same positions: one mask per chunk
    if allowed is None:
        allowed = geo.visible(qpos[:, :, None], kpos[:, None, :])  # A(t); empty slots hold -1
        # padding queries attend to themselves only (finite output, never read)
        pad_rows = ~cache.chunk_valid
        if bool(pad_rows.any()):
            own = torch.zeros(B, q, L, dtype=torch.bool, device=allowed.device)
            own[:, torch.arange(q), L - q + torch.arange(q)] = True
            allowed = torch.where(pad_rows[:, :, None], own, allowed)
        cache.masks[("allowed", L)] = allowed
    if sliding_window or alibi_slopes is not None:
        dist = cache.masks.get(("dist", L))  # rank distance query - key: sinks from the rank, window keys in text
        if dist is None:
            kp = kpos[:, None, :]
            dist = cache.masks[("dist", L)] = torch.where((kp >= 0) & (kp < S), qrank[:, :, None] - kp, qpos[:, :, None] - kp)
        if sliding_window:
            allowed = allowed & (dist < int(sliding_window))

    g = H // key.shape[1]
    if not softcap and alibi_slopes is None and sinks is None and (q == 1 or not needs_rank) and not dropout:
        # SDPA: a decode step moves its second rotation onto the S sink keys instead (q_rank . k_i ==
        # q_text . R(t - rank) k_i), a chunk that needs none takes the mask alone
        if needs_rank:
            ang = exact_angles(freqs, qpos[:, 0] - qrank[:, 0])  # [B, F]
            sinks = rotate_heads(key[:, :, :S], ang[:, None, :].expand(B, S, ang.shape[-1]))
            key = torch.cat([sinks, key[:, :, S:]], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None], scale=scaling, enable_gqa=g > 1)
        return out.transpose(1, 2).contiguous(), None
    k = key.repeat_interleave(g, dim=1) if g > 1 else key
    v = value.repeat_interleave(g, dim=1) if g > 1 else value
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [B, H, q, L]
    if needs_rank:
        # second rotation, text position -> rank, for the scores against the S sink slots only
        q_rank = rotate_heads(query, exact_angles(freqs, qrank - qpos))
        scores[..., :S] = torch.matmul(q_rank, k[:, :, :S].transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float()
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(scores.device, torch.float32).view(1, H, 1, 1) * dist[:, None].float()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
    else:  # exp(s_h) joins every denominator, with no value (docs/contract.md)
        extra = sinks.to(scores.device, scores.dtype).view(1, H, 1, 1).expand(B, H, q, 1)
        probs = torch.softmax(torch.cat([scores, extra], -1), dim=-1)[..., :-1].to(v.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), None


def _kernel_attention(cache, layer, query, qpos, qrank, freqs, scaling, sinks=None) -> torch.Tensor:
    """The project's kernels (``cache.ops``) on an unpadded chunk: ``query [B, H, q, D]`` -> ``[B, q, H, D]``.

    ``layer.pending`` holds the chunk's keys/values; the cache slots hold the stream before it. A
    decode step is written first and attends over the cache; a longer chunk attends over cache + chunk,
    then is written.
    """
    ops, geo = cache.ops, cache.geometry
    k_new, v_new = (x.transpose(1, 2) for x in layer.pending)  # [B, q, KVH, D]
    layer.pending = None
    B, H, q, D = query.shape
    q_text = query.transpose(1, 2)  # [B, q, H, D]
    q_rank = q_text if freqs is None else rotate_heads(query, exact_angles(freqs, qrank - qpos)).transpose(1, 2)
    start = cache.counts
    lengths = torch.full_like(start, q)
    if q == 1:
        ops.cache_write(k_new, v_new, layer.keys, layer.values, start, lengths, geo)
        out = ops.decode_attention(q_text[:, 0], q_rank[:, 0], layer.keys, layer.values, start + 1, geo, scaling, sinks)
        return out.view(B, 1, H, D)
    out = ops.prefill_attention(q_text, q_rank, k_new, v_new, layer.keys, layer.values, start, lengths, geo, scaling,
                                sinks)
    ops.cache_write(k_new, v_new, layer.keys, layer.values, start, lengths, geo)
    return out
