"""``enable_streaming``: the hooks that turn a transformers model into a streaming one, in place.

The model's ``rotary_emb`` becomes an :class:`~streaming_trt.hf.rotary.ExactRotary`, its attention
the ``"streaming_trt"`` function (or, for MPT and Falcon before transformers 5.25, an adapted attention
module), and its base
``forward`` is wrapped: it derives each stream's text positions from its own counters and the
attention mask (left padding is never a sink, never attended, never counts), and feeds inputs longer
than ``min(max_chunk, window)`` in chunks, so no query ever sees more than A(t).
"""
from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface

from ..contract import Geometry, UserError
from .adapters import ADAPTERS
from .attention import ACTIVE, streaming_attention
from .cache import NO_BEAMS, HFStreamingCache, StreamingSettings, kernels_for
from .rotary import ExactRotary
from .sinks import attach_sink_logits, start_with_sink_token

ATTN_NAME = "streaming_trt"

#: model_type -> how streaming behaves there (README.md's architecture table says the same).
ARCHITECTURES = {
    "llama": "rotary",
    "mistral": "rotary (its own sliding window applies on top, measured in rank distance)",
    "qwen2": "rotary (sliding-window layers measured in rank distance)",
    "qwen3": "rotary, q/k norms",
    "gemma2": "rotary, attention soft-capping; sliding layers keep their window in rank distance",
    "gemma3_text": "rotary with per-layer-type frequencies; sliding layers keep their window in rank distance",
    "phi3": "rotary (partial rotary allowed)",
    "gpt_neox": "rotary, partial rotary, parallel residual",
    "falcon": "rotary (multi-query or grouped KV) or ALiBi (Falcon-RW); attention module adapted before transformers 5.25",
    "mpt": "ALiBi by rank distance, no rotation; attention module adapted",
}


def _wrap_forward(base, orig_forward):
    @functools.wraps(orig_forward)
    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        model = base._streaming_trt_owner
        if cache is None:
            cache = HFStreamingCache(model)  # one-shot streaming forward over this input
        if not isinstance(cache, HFStreamingCache):
            raise UserError(f"a model with streaming enabled needs cache=StreamingCache(model, ...), got "
                            f"{type(cache).__name__}")
        if kwargs.get("output_attentions"):
            raise UserError("output_attentions is not available with streaming attention")
        x = input_ids if input_ids is not None else inputs_embeds
        B, n = x.shape[0], x.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -n:].to(torch.bool)
        elif attention_mask is None:
            valid = torch.ones(B, n, dtype=torch.bool, device=x.device)
        else:
            raise UserError("streaming attention takes a 2D [batch, length] attention mask (1 = token, 0 = padding)")
        start_with_sink_token(model, orig_forward, cache, valid, kwargs)
        step = max(1, min(cache.max_chunk, cache.geometry.window))
        outs = []
        for s in range(0, n, step):
            e = min(n, s + step)
            pos = cache.begin_chunk(valid[:, s:e])
            ACTIVE.cache = cache
            try:
                outs.append(orig_forward(
                    input_ids=None if input_ids is None else input_ids[:, s:e],
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, s:e],
                    attention_mask=None, position_ids=pos, cache=cache, **kwargs))
            finally:
                ACTIVE.cache = None
                cache.end_chunk()
        out = outs[-1]
        if len(outs) > 1:
            out["last_hidden_state"] = torch.cat([o.last_hidden_state for o in outs], dim=1)
            if getattr(out, "hidden_states", None) is not None:
                out["hidden_states"] = tuple(torch.cat(hs, dim=1) for hs in zip(*(o.hidden_states for o in outs)))
        if "cache" in out or hasattr(out, "cache"):
            try:
                out["cache"] = cache
            except Exception:  # noqa: BLE001 - output classes without that field
                pass
        return out

    return forward


def _wrap_generate(model, orig_generate):
    @functools.wraps(orig_generate)
    def generate(*args, **kwargs):
        gc = kwargs.get("generation_config") or model.generation_config
        beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        if beams > 1:
            raise UserError(NO_BEAMS)
        for k in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
            if kwargs.get(k) is not None or getattr(gc, k, None) is not None:
                raise UserError(f"{k} (assisted / speculative decoding) is not supported with streaming: it "
                                f"rolls the cache back, and evicted tokens cannot come back")
        if (kwargs.get("penalty_alpha") or 0) > 0:
            raise UserError("contrastive search is not supported with streaming: use greedy or sampling")
        if kwargs.get("cache_implementation") is not None:
            raise UserError("cache_implementation cannot be combined with streaming: the StreamingCache is the cache")
        if kwargs.get("use_cache") is False:
            raise UserError("use_cache=False re-reads the whole sequence every step, which a bounded cache "
                            "cannot do: drop use_cache=False")
        kwargs["use_cache"] = True  # some configs (MPT) default to False
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = HFStreamingCache(model)
        return orig_generate(*args, **kwargs)

    return generate


def _rope_type(cfg) -> list[str]:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        return [v.get("rope_type", v.get("type", "default")) for v in rp.values()]
    return [rp.get("rope_type", rp.get("type", "default"))] if isinstance(rp, dict) else ["default"]


def enable_streaming(model, sink_tokens: int = 4, window: int = 1020, max_chunk: int = 512,
                     backend: str = "auto"):
    """Turn ``model`` (a transformers 5 ``*ForCausalLM`` of a type in :data:`ARCHITECTURES`) into a
    streaming model, in place; returns it.

    Afterwards ``model.generate(...)`` uses a fresh :class:`HFStreamingCache` per call unless one is passed
    (``cache=``), and ``model(ids, cache=cache)`` continues a stream. ``sink_tokens`` (S >= 0) and
    ``window`` (W >= 1, the current token included) set the default geometry; ``max_chunk`` bounds
    the tokens processed per internal forward (inputs are cut into chunks of ``min(max_chunk, W)``).
    ``backend``: ``"auto"`` (the Triton kernels on CUDA, PyTorch otherwise), ``"torch"`` or
    ``"triton"`` (on a CPU only under ``TRITON_INTERPRET=1``, for tests), as in ``st.load_model``;
    each new cache resolves it for the device the model is on then.
    Calling it again changes the defaults.
    """
    geometry = Geometry(sink_tokens, window)
    if not isinstance(max_chunk, int) or max_chunk < 1:
        raise UserError(f"max_chunk must be an integer >= 1, got {max_chunk!r}")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHITECTURES:
        raise UserError(f"model_type {mt!r} is not supported by streaming_trt.hf; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    for rt in _rope_type(cfg):
        if rt in ("dynamic", "longrope"):
            raise UserError(f"rope type {rt!r} changes its frequencies with the sequence length and cannot be "
                            f"frozen for streaming: use a checkpoint with default, linear, llama3 or yarn rope")
    kernels_for(backend, model)  # a backend that cannot run here is refused now, not at the first forward
    base = model.base_model
    settings = getattr(model, "_streaming_trt", None)
    if settings is None:
        alibi, adapted = ADAPTERS[mt](model) if mt in ADAPTERS else (False, False)
        if not adapted:
            AttentionInterface.register(ATTN_NAME, streaming_attention)
            model.set_attn_implementation(ATTN_NAME)
        if not alibi:
            if not hasattr(base, "rotary_emb"):
                raise UserError(f"{type(base).__name__} has no rotary_emb module: not the rotary + "
                                f"AttentionInterface pattern")
            if not isinstance(base.rotary_emb, ExactRotary):
                base.rotary_emb = ExactRotary(base.rotary_emb)
        attach_sink_logits(model)
        base.__dict__["_streaming_trt_owner"] = model  # not a submodule (no cycle)
        base.forward = _wrap_forward(base, base.forward)
        model.generate = _wrap_generate(model, model.generate)
    else:
        alibi = settings.alibi
    model._streaming_trt = StreamingSettings(geometry=geometry, max_chunk=max_chunk, backend=backend, alibi=alibi)
    return model
