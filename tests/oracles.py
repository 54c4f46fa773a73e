"""Independent references built from transformers' own model classes.

- ``recompute``: the contract's oracle, transformers re-run from scratch on A(t) at positions
  0..|A(t)|-1 for every token t. For a single-layer model this is exactly the streaming cache's
  function; deeper layers re-derive the window's keys from the truncated context, so for
  multi-layer models the two differ by design (the paper's re-computation baseline).
- ``stream_with_hf_layers``: the streaming cache's function for any depth, token by token, with
  every computation (projections, norms, rotary tables, MLP, head) done by transformers' modules
  and only the choice of A(t) and ranked positions written here, in the most naive way.
"""
from __future__ import annotations

import torch

from streaming_trt.contract import Geometry


def attended(t: int, sink_tokens: int, window: int) -> list[int]:
    """A(t) of the contract, in order."""
    return Geometry(sink_tokens, window).attended(t)


@torch.no_grad()
def recompute(hf_model, ids: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """``ids [n]`` -> float32 logits ``[n, vocab]``, each from a fresh forward over A(t)."""
    rows = []
    for t in range(ids.shape[0]):
        keep = attended(t, sink_tokens, window)
        rows.append(hf_model(ids[keep].view(1, -1)).logits[0, -1].float())
    return torch.stack(rows)


@torch.no_grad()
def stream_with_hf_layers(hf_model, ids: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = hf_model.model
    cfg = hf_model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys = [dict() for _ in inner.layers]  # layer -> token -> unrotated key [kv_heads, head_dim]
    values = [dict() for _ in inner.layers]
    out = []
    for t in range(ids.shape[0]):
        seen = attended(t, sink_tokens, window)
        positions = torch.arange(len(seen)).view(1, -1)
        x = inner.embed_tokens(ids[t].view(1, 1))
        cos, sin = inner.rotary_emb(x, positions)  # [1, |A|, head_dim]
        for layer, block in enumerate(inner.layers):
            attn = block.self_attn
            h = block.input_layernorm(x)
            q = attn.q_proj(h).view(heads, head_dim)
            k = attn.k_proj(h).view(kv_heads, head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            keys[layer][t], values[layer][t] = k, attn.v_proj(h).view(kv_heads, head_dim)
            K = torch.stack([keys[layer][u] for u in seen], 1)  # [kv_heads, |A|, d]
            V = torch.stack([values[layer][u] for u in seen], 1)
            qr, _ = apply_rotary_pos_emb(q.view(1, heads, 1, head_dim), q.view(1, heads, 1, head_dim),
                                         cos[:, -1:], sin[:, -1:])
            _, kr = apply_rotary_pos_emb(K.unsqueeze(0), K.unsqueeze(0), cos, sin)
            kr = kr[0].repeat_interleave(heads // kv_heads, 0)
            p = torch.softmax(qr[0] @ kr.transpose(-1, -2) / head_dim**0.5, dim=-1)  # [heads, 1, |A|]
            o = (p @ V.repeat_interleave(heads // kv_heads, 0)).reshape(1, 1, heads * head_dim)
            x = x + attn.o_proj(o)
            x = x + block.mlp(block.post_attention_layernorm(x))
        out.append(hf_model.lm_head(inner.norm(x))[0, -1].float())
        for layer in range(len(inner.layers)):  # forget what left the cache
            for u in [u for u in keys[layer] if u < t - window + 1 and u >= sink_tokens]:
                del keys[layer][u], values[layer][u]
    return torch.stack(out)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """``|a - b| <= tol * max(|b|_max, 1)``, with the figures in the message."""
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max error {err:.3g} > {tol} x scale {scale:.3g}"
