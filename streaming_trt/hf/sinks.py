"""Models pre-trained with a sink (``python -m streaming_trt.cli.train``), inside transformers.

transformers' Llama knows neither config.json field, so :func:`attach_sink_logits` puts the sink
logits on the attention modules and :func:`start_with_sink_token` feeds the sink token; both are
called by :mod:`.enable`. docs/contract.md: the token is a stream's token 0, added once, never
again when a stream continues; the logits join every softmax denominator.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..contract import UserError
from ..runtime.session import sink_token_starts
from .attention import ACTIVE, SINKS_ATTR


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def attach_sink_logits(model) -> None:
    """Give every attention module its ``[num_heads]`` sink logits as a non-persistent buffer:
    zeros for ``sink_logits: "zero"``, for ``"learned"`` the checkpoint's ``self_attn.sinks``
    (transformers drops them as unexpected; they are read again from the folder the model was
    loaded from)."""
    cfg = _text_config(model)
    kind = getattr(cfg, "sink_logits", None)
    if kind is None:
        return
    if kind not in ("zero", "learned"):
        raise UserError(f"config.json: sink_logits {kind!r} is not one of zero, learned")
    layers = model.base_model.layers
    heads = cfg.num_attention_heads
    param = next(model.parameters())
    tensors = {}
    if kind == "learned":
        folder = Path(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
        if not folder.is_dir():
            raise UserError("this model's config has learned sink logits (sink_logits: learned) but it was not "
                            "loaded from a checkpoint folder they can be read from; load it with from_pretrained(DIR)")
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("self_attn.sinks")})
    for i, layer in enumerate(layers):
        if kind == "zero":
            value = torch.zeros(heads)
        else:
            value = tensors.get(f"model.layers.{i}.self_attn.sinks")
            if value is None or tuple(value.shape) != (heads,):
                raise UserError(f"{folder}: tensor model.layers.{i}.self_attn.sinks [{heads}] is missing or mis-shaped")
        layer.self_attn.register_buffer(SINKS_ATTR, value.to(param.device, torch.float32), persistent=False)


def start_with_sink_token(model, orig_forward, cache, valid: torch.Tensor, kwargs: dict) -> None:
    """Feed the sink token (config.json ``sink_token_id``) on its own to every stream of ``cache``
    about to receive its first real tokens (``valid [B, n]``), before them. It takes a cache slot
    and a text position but no input column, so ``generate()``'s slicing is unchanged."""
    sink = getattr(_text_config(model), "sink_token_id", None)
    counts = cache.counts.tolist() if cache.counts is not None else [0] * valid.shape[0]
    starts = sink_token_starts(sink, valid.sum(1).tolist(), counts)
    if starts is None:
        return
    fresh = torch.tensor(starts, dtype=torch.bool, device=valid.device)
    ids = torch.full((valid.shape[0], 1), int(sink), dtype=torch.long, device=valid.device)
    pos = cache.begin_chunk(fresh[:, None])
    ACTIVE.cache = cache
    try:
        orig_forward(input_ids=ids, attention_mask=None, position_ids=pos, cache=cache, **kwargs)
    finally:
        ACTIVE.cache = None
        cache.end_chunk()
        cache.columns -= 1
