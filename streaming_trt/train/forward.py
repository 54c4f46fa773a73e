"""The training forward: full causal attention over a sample, with the variant's softmax.

It runs over the modules of the runtime's :class:`~streaming_trt.runtime.model.Transformer` (same
parameter names, so a trained state dict loads into the runtime as it is) but never touches its
cache or its inference-mode ``forward``. Positions are 0 .. n-1, the rotary convention is the
runtime's (:mod:`streaming_trt.runtime.rope`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..runtime.config import ModelConfig
from ..runtime.model import Transformer
from ..runtime.rope import apply_rotary, rotary_angles

VARIANTS = ("vanilla", "sink-token", "zero-sink", "sink-logits")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logits: torch.Tensor | None = None,
                     want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of ``q [batch, heads, n, d]`` over ``k, v [batch, kv_heads, n, d]``.

    ``sink_logits [heads]`` adds ``exp(s_h)`` to every softmax denominator with no value (the
    contract's learned sink logits; zeros are softmax-off-by-one). Returns ``out [batch, heads, n,
    d]`` and, with ``want_probs``, the attention weights ``[batch, heads, n, n]`` (float32 or wider; a
    row sums to less than 1 by the sink term's share).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if not want_probs:
        if sink_logits is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
        return _fused_with_sink_logits(q, k, v, sink_logits), None
    n = q.shape[2]
    scores = q @ k.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.shape[-1] ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    if sink_logits is None:
        p = torch.softmax(scores, -1)
    else:
        extra = sink_logits.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        p = torch.softmax(torch.cat([scores, extra], -1), -1)[..., :-1]
    return p.to(v.dtype) @ v, (p if want_probs else None)


def _fused_with_sink_logits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logits: torch.Tensor) -> torch.Tensor:
    """The sink-logit softmax through fused (flash / memory-efficient) SDPA, exactly: a key scored
    s_h by every query and carrying a zero value is put first. Its score is made by one more
    query component equal to 1 against a key component s_h / scale (zero for the real keys; the
    head is padded by 8 to keep flash kernels' alignment), and a dummy first query makes the causal
    mask square so that query i sees that key and keys 0..i. Shapes as :func:`causal_attention`
    (``k``, ``v`` already with ``heads`` heads)."""
    b, h, n, d = q.shape
    scale = d ** -0.5
    pad = q.new_zeros(b, h, n, 8)
    one = torch.ones_like(pad[..., :1])
    q = torch.cat([q.new_zeros(b, h, 1, d + 8), torch.cat([q, one, pad[..., 1:]], -1)], 2)
    sink_key = torch.cat([q.new_zeros(b, h, 1, d), (sink_logits.to(q.dtype) / scale).view(1, h, 1, 1).expand(b, h, 1, 1),
                          q.new_zeros(b, h, 1, 7)], -1)
    k = torch.cat([sink_key, torch.cat([k, pad], -1)], 2)
    v = torch.cat([v.new_zeros(b, h, 1, v.shape[-1]), v], 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[:, :, 1:]


@dataclasses.dataclass
class AttentionMass:
    """Per layer, the mean attention weight that queries ``1 .. n-1`` give key 0 (the paper's
    attention sink; the sink token for a sink-token model) and the learned sink term, over heads
    and samples; ``uniform`` is what key 0 would get from attention spread evenly (1/(t+1)).
    ``*_late``: per layer and head, the same over the second half of the queries only (a sink
    head stands out there: an even spread gives key 0 ``uniform_late``)."""

    token0: list[float]
    sink_term: list[float]
    uniform: float
    token0_late: list[list[float]] = dataclasses.field(default_factory=list)
    sink_term_late: list[list[float]] = dataclasses.field(default_factory=list)
    uniform_late: float = 0.0


def forward(model: Transformer, tokens: torch.Tensor, measure: bool = False) -> tuple[torch.Tensor, AttentionMass | None]:
    """``tokens [batch, n]`` int64 -> logits ``[batch, n, vocab]`` (autocast dtype on CUDA, else the
    model's), and with ``measure`` the :class:`AttentionMass` of this batch."""
    c: ModelConfig = model.config
    batch, n = tokens.shape
    cos, sin = rotary_angles(model.inv_freq, torch.arange(n, device=tokens.device))
    cos, sin = cos[:, None], sin[:, None]  # [n, 1, rotary_dim // 2] over [batch, n, heads, d]
    x = model.embed_tokens(tokens)
    token0, sink_term, token0_late, sink_late = [], [], [], []
    for layer in model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(batch, n, c.num_heads, c.head_dim)
        k = a.k_proj(h).view(batch, n, c.num_kv_heads, c.head_dim)
        v = a.v_proj(h).view(batch, n, c.num_kv_heads, c.head_dim)
        if a.qk_norm:
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, p = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  a.sinks if a.sink_logits else None, want_probs=measure)
        if measure:
            rows = p[:, :, 1:]  # query 0 can only see itself
            token0.append(rows[..., 0].mean().item())
            sink_term.append((1 - rows.sum(-1)).mean().item())
            late = p[:, :, n // 2:]
            token0_late.append(late[..., 0].mean((0, 2)).tolist())
            sink_late.append((1 - late.sum(-1)).mean((0, 2)).tolist())
        x = x + a.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    head = model.embed_tokens.weight if c.tie_word_embeddings else model.lm_head.weight
    logits = F.linear(model.norm(x), head)
    if not measure:
        return logits, None
    uniform = (1.0 / torch.arange(2, n + 1, dtype=torch.float64)).mean().item()
    uniform_late = (1.0 / torch.arange(n // 2 + 1, n + 1, dtype=torch.float64)).mean().item()
    return logits, AttentionMass(token0, sink_term, uniform, token0_late, sink_late, uniform_late)


def new_model(config: ModelConfig, seed: int, std: float = 0.02) -> Transformer:
    """A freshly initialised model for training: normal(0, std) weights (output projections scaled
    by 1/sqrt(2 layers), GPT-2 style), ones for norms, zeros for biases and sink logits."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                scale = std / (2 * config.num_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    for layer in model.layers:
        if config.sink_logits == "zero":
            layer.self_attn.sinks.requires_grad_(False)
    return model.train()


class Objective(torch.nn.Module):
    """The training loss as a module (what DDP wraps, so its hooks see every forward): mean
    next-token cross-entropy of samples ``tokens [batch, context + 1]``; with ``skip_first`` (a
    sink-token sample) the prediction made at the sink token is not counted."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, skip_first: bool) -> torch.Tensor:
        logits, _ = forward(self.model, tokens[:, :-1])
        targets = tokens[:, 1:]
        if skip_first:
            logits, targets = logits[:, 1:], targets[:, 1:]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
