"""Models whose attention does not call ``AttentionInterface``, and ALiBi models.

MPT (every transformers 5 release) and Falcon before transformers 5.25 run their own attention math:
their attention modules get a forward that projects with the module's own weights and calls
:func:`~streaming_trt.hf.attention.streaming_attention`. From 5.25 on, Falcon's attention looks its
function up by name like Llama's, so it takes the public hook and nothing of it is replaced.

ALiBi models (MPT, Falcon-RW) rotate nothing: their bias follows the key's rank distance from the
query, so the sinks sit at distance ``min(t, C-1) - i`` exactly as rotary sinks do. Their slopes
ride on each attention module (:data:`~streaming_trt.hf.attention.ALIBI_ATTR`), and the model's own
ALiBi tensor, which grows with the stream, is switched off.
"""
from __future__ import annotations

import types

import torch
import transformers
from transformers.models.falcon import modeling_falcon

from ..contract import UserError
from .attention import ALIBI_ATTR, streaming_attention

def _falcon_qkv(module, hidden_states):
    """Falcon's fused projection -> ``q [B, H, L, D]``, ``k, v [B, KVH, L, D]`` (KV heads not broadcast)."""
    B, L, _ = hidden_states.shape
    H, D = module.num_heads, module.head_dim
    fused = module.query_key_value(hidden_states)
    if module.new_decoder_architecture:  # [B, L, KVH, group + 2, D]: each KV head after its query group
        kvh = module.num_kv_heads
        qkv = fused.view(B, L, kvh, H // kvh + 2, D)
        q, k, v = qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif module.multi_query:  # [B, L, H + 2, D]: one shared key and value head
        qkv = fused.view(B, L, H + 2, D)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + 1], qkv[:, :, H + 1:]
    else:
        qkv = fused.view(B, L, H, 3, D)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _falcon_attention(self, hidden_states, alibi=None, attention_mask=None, position_ids=None, layer_past=None,
                      use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    q, k, v = _falcon_qkv(self, hidden_states)
    if not hasattr(self, ALIBI_ATTR):
        cos, sin = position_embeddings
        q, k = modeling_falcon.apply_rotary_pos_emb(q, k, cos, sin)
    k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = streaming_attention(self, q, k, v, scaling=self.inv_norm_factor)
    return self.dense(out.reshape(*hidden_states.shape[:2], -1)), None


def _mpt_attention(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    B, L = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, L, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    k, v = cache.update(k, v, self.layer_idx)
    out, _ = streaming_attention(self, q, k, v, scaling=self.softmax_scale)
    return self.out_proj(out.reshape(B, L, -1)), None


def _require(module, names: tuple[str, ...]) -> None:
    """The adapters read these attributes of transformers' modules: say so clearly if a release renamed them."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise UserError(f"transformers {transformers.__version__} changed {type(module).__name__} (no "
                        f"{', '.join(missing)}): streaming_trt.hf's adapter for it was written against 5.24")


def falcon_calls_attention_interface() -> bool:
    """Whether this transformers' ``FalconAttention`` looks its attention function up by name (5.25 on)."""
    return "ALL_ATTENTION_FUNCTIONS" in modeling_falcon.FalconAttention.forward.__code__.co_names


def _adapt_falcon(model) -> tuple[bool, bool]:
    """Falcon-RW's slopes on its attention modules; the forwards replaced where the release needs it."""
    base, alibi = model.base_model, bool(model.config.alibi)
    adapt = not falcon_calls_attention_interface()
    _require(base, ("h", "use_alibi", "rotary_emb"))
    for block in base.h:  # all checked before any is changed
        _require(block.self_attention, ("query_key_value", "dense", "num_heads", "head_dim", "num_kv_heads",
                                        "multi_query", "new_decoder_architecture", "inv_norm_factor", "layer_idx"))
    for block in base.h:
        attn = block.self_attention
        if alibi:  # the model's slopes (bf16-rounded, as it uses them) times its 1/sqrt(head_dim)
            ones = torch.ones(1, 2, dtype=torch.long, device=attn.dense.weight.device)
            slopes = modeling_falcon.build_alibi_tensor(ones, attn.num_heads, torch.float32)[:, 0, 1]
            setattr(attn, ALIBI_ATTR, slopes * attn.inv_norm_factor)
        if adapt:
            attn.forward = types.MethodType(_falcon_attention, attn)
    base.use_alibi = False  # its own ALiBi tensor grows with the stream and is not used
    return alibi, adapt


def _adapt_mpt(model) -> tuple[bool, bool]:
    base = model.base_model
    _require(base, ("wte", "blocks", "num_heads", "build_mpt_alibi_tensor"))
    for block in base.blocks:
        _require(block.attn, ("Wqkv", "out_proj", "n_heads", "head_dim", "softmax_scale", "clip_qkv", "layer_idx"))
    device = base.wte.weight.device
    slopes = -base.build_mpt_alibi_tensor(base.num_heads, 2, device=device)[:, 0, 0].float()  # what forward builds
    for block in base.blocks:
        setattr(block.attn, ALIBI_ATTR, slopes)
        block.attn.forward = types.MethodType(_mpt_attention, block.attn)
    return True, True


#: model_type -> prepares a model whose attention is not plain rotary + ``AttentionInterface``; returns
#: (whether the model uses ALiBi instead of rotary positions, whether its attention forwards were
#: replaced: when not, streaming attention is installed through ``AttentionInterface``).
ADAPTERS = {"falcon": _adapt_falcon, "mpt": _adapt_mpt}
