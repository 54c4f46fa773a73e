"""StreamingLLM inside transformers 5: ``model.generate()`` with attention sinks and a rolling window.

>>> import transformers, streaming_trt.hf as sthf
>>> model = transformers.AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
>>> sthf.enable_streaming(model, sink_tokens=4, window=1020)
>>> out = model.generate(ids, max_new_tokens=100_000, do_sample=True)   # constant memory, any length

or pass a cache explicitly: ``model.generate(ids, cache=sthf.StreamingCache(model, 4, 1020))``, and
``model(ids, cache=cache)`` in a loop continues the same streams.

Every token t computes the contract of ``shared/design/semantics.md``: it attends to its stream's first
``sink_tokens`` tokens and its last ``window`` tokens (itself included) at rank positions. How:

- the model's ``rotary_emb`` is replaced by :class:`ExactRotary`: same inverse frequencies and
  attention scaling, but angles ``position * inv_freq`` in float64 reduced mod 2*pi, so that keys can
  be rotated at their (unbounded) *text* position and stored once;
- the keys live in a :class:`StreamingCache` of :class:`StreamingLayer` (``S`` sink slots + a ring of
  ``W`` slots per stream, allocated once); scores against window keys depend only on text distance,
  which equals rank distance, so only the query's scores against the sinks need a second rotation,
  from its text position ``t`` to its rank ``min(t, C - 1)``;
- the attention function registered as ``"streaming_trt"`` builds the sink + window + padding mask
  itself and does that second rotation;
- the model's base ``forward`` is wrapped: it derives each stream's text positions from its own
  counters and the attention mask (left padding is never a sink, never attended, never counts), and
  feeds inputs longer than ``min(max_chunk, window)`` in chunks, so no query ever sees more than A(t).

Falcon and MPT do not call ``AttentionInterface`` (their attention modules run SDPA / eager math and
add ALiBi themselves), so their attention modules' ``forward`` is replaced by one that projects with
the module's own weights and calls the same attention function (:data:`ADAPTERS`). ALiBi models
(MPT, Falcon-RW) rotate nothing: their bias follows the key's rank distance from the query, so the
sinks sit at distance ``min(t, C-1) - i`` exactly as rotary sinks do.

On CUDA (``backend="auto"``) decode steps and unpadded chunks of plain rotary layers run the
project's Triton kernels (:mod:`streaming_trt.kernels`) on the same cache tensors; soft-capped,
sliding-window, ALiBi layers and padded chunks take the PyTorch path.

Refused with :class:`streaming_trt.errors.UserError`: beam search, assisted / prompt-lookup decoding,
``cache_implementation=``, dynamic-NTK and longrope rope scaling (their frequencies depend on the
sequence length and cannot be frozen), architectures outside :data:`ARCHITECTURES` and transformers
versions outside :data:`SUPPORTED_TRANSFORMERS`.
"""
from __future__ import annotations

import functools
import threading
import types

import torch
from torch import nn

from .errors import UserError
from .kernels.geometry import Geometry
from .rope import exact_angles

SUPPORTED_TRANSFORMERS = ((5, 0), (6, 0))  # [min, max): the hooks below were checked against 5.x
ATTN_NAME = "streaming_trt"

#: model_type -> how streaming behaves there (the README's table is generated from the same facts).
ARCHITECTURES = {
    "llama": "rotary",
    "mistral": "rotary (its own sliding window applies on top, measured in rank distance)",
    "qwen2": "rotary (sliding-window layers measured in rank distance)",
    "qwen3": "rotary, q/k norms",
    "gemma2": "rotary, attention soft-capping; sliding layers keep their window in rank distance",
    "gemma3_text": "rotary with per-layer-type frequencies; sliding layers keep their window in rank distance",
    "phi3": "rotary (partial rotary allowed)",
    "gpt_neox": "rotary, partial rotary, parallel residual",
    "falcon": "rotary (multi-query or grouped KV) or ALiBi (Falcon-RW); attention module adapted",
    "mpt": "ALiBi by rank distance, no rotation; attention module adapted",
}

_ACTIVE = threading.local()  # the StreamingCache of the forward running on this thread


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    nums = []
    for p in parts[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        nums.append(int(digits or 0))
    return tuple(nums + [0] * (2 - len(nums)))


def check_transformers(version: str | None = None) -> None:
    """Raise UserError unless the installed transformers has the hooks this module relies on.

    Checks the version against :data:`SUPPORTED_TRANSFORMERS` and the presence of ``CacheLayerMixin``
    (with ``update / get_seq_length / get_mask_sizes / lazy_initialization / get_max_length``),
    ``Cache(layers=...)``, ``AttentionInterface.register`` and ``PreTrainedModel.set_attn_implementation``.
    """
    import transformers

    v = version or transformers.__version__
    lo, hi = SUPPORTED_TRANSFORMERS
    if not (lo <= _version_tuple(v) < hi):
        raise UserError(
            f"streaming_trt.hf supports transformers >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} (its Cache, "
            f"AttentionInterface and rotary hooks were checked there); found {v}: "
            f"pip install 'transformers>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'")
    missing = []
    try:
        from transformers.cache_utils import Cache, CacheLayerMixin

        for name in ("update", "get_seq_length", "get_mask_sizes", "lazy_initialization", "get_max_length"):
            if not hasattr(CacheLayerMixin, name):
                missing.append(f"CacheLayerMixin.{name}")
        import inspect

        if "layers" not in inspect.signature(Cache.__init__).parameters:
            missing.append("Cache(layers=...)")
    except ImportError:
        missing.append("transformers.cache_utils.CacheLayerMixin")
    try:
        from transformers import AttentionInterface

        if not hasattr(AttentionInterface, "register"):
            missing.append("AttentionInterface.register")
    except ImportError:
        missing.append("transformers.AttentionInterface")
    if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):
        missing.append("PreTrainedModel.set_attn_implementation")
    if missing:
        raise UserError(f"transformers {v} lacks the hooks streaming_trt.hf needs ({', '.join(missing)}); "
                        f"install a transformers {lo[0]}.x release")


# --------------------------------------------------------------------------------------- rotary
class ExactRotary(nn.Module):
    """Drop-in for a transformers rotary module (``forward(x, position_ids[, layer_type]) -> (cos, sin)``,
    each ``[B, q, rotary_dim]`` in ``x.dtype``) with float64 angles reduced mod 2*pi.

    Uses the wrapped module's ``inv_freq`` / ``attention_scaling`` (or ``{layer_type}_inv_freq`` ...),
    i.e. its rope scaling, frozen at construction.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def frequencies(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        if layer_type is not None and hasattr(self.original, f"{layer_type}_inv_freq"):
            return (getattr(self.original, f"{layer_type}_inv_freq"),
                    float(getattr(self.original, f"{layer_type}_attention_scaling", 1.0)))
        return self.original.inv_freq, float(getattr(self.original, "attention_scaling", 1.0))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        inv_freq, scale = self.frequencies(layer_type)
        ang = exact_angles(inv_freq, position_ids)
        emb = torch.cat((ang, ang), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, q, D]`` (rotate-half convention on its first ``2F`` dims) by float64
    ``angles [B, q, F]`` (a pure rotation: no attention scaling)."""
    rd = 2 * angles.shape[-1]
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    xr, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    return torch.cat((xr * cos + rot * sin, rest), dim=-1)


# --------------------------------------------------------------------------------------- cache
def _layer_base():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


def _make_classes():
    CacheLayerMixin, Cache = _layer_base(), _cache_base()

    class StreamingLayer(CacheLayerMixin):
        """One layer's keys/values: ``[B, KVH, S + W, D]`` allocated once; slot ``u`` for sink ``u < S``,
        ``S + (u - S) % W`` for window token ``u``; ``slot_pos [B, S + W]`` (long) is the text position held
        by each slot, -1 if empty. Keys are stored rotated at their text position."""

        is_compileable = False
        is_sliding = False

        def __init__(self, owner, kernel: bool):
            super().__init__()
            self.owner = owner
            self.kernel = kernel  # this layer may run the Triton kernels (plain rotary, no softcap / sliding)
            self.slot_pos = None
            self.last_kpos = None
            self.pending = None  # a kernel chunk's (keys, values) [B, KVH, q, D], written by the attention

        def lazy_initialization(self, key_states, value_states):
            B, KVH, _, D = key_states.shape
            C = self.owner.capacity
            self.keys = key_states.new_zeros(B, KVH, C, D)
            self.values = value_states.new_zeros(B, KVH, C, value_states.shape[-1])
            self.slot_pos = torch.full((B, C), -1, dtype=torch.long, device=key_states.device)
            self.device, self.dtype = key_states.device, key_states.dtype
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            """``key_states [B, KVH, q, D]`` -> (cache before this chunk ++ chunk) ``[B, KVH, S+W+q, D]``;
            the chunk is then written to its slots. ``last_kpos [B, S+W+q]`` is what the attention reads."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            owner = self.owner
            pos, valid = owner.chunk_pos, owner.chunk_valid
            if pos is None or tuple(pos.shape) != (key_states.shape[0], key_states.shape[2]):
                raise UserError("StreamingCache was updated outside a streaming forward; call the model "
                                "enabled by streaming_trt.hf.enable_streaming")
            if self.kernel and owner.chunk_dense:
                # the kernels read the cache slots themselves and the attention writes the chunk there
                # (after a prefill, before a decode step): nothing is concatenated
                self.pending = (key_states, value_states)
                self.slot_pos.scatter_(1, owner.geometry.slot(pos), pos)
                return self.keys, self.values
            keys = torch.cat([self.keys, key_states], dim=2)
            values = torch.cat([self.values, value_states], dim=2)
            kpos = torch.where(valid, pos, torch.full_like(pos, -1))
            self.last_kpos = torch.cat([self.slot_pos, kpos], dim=1)
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            if b_idx.numel():
                p = pos[b_idx, t_idx]
                slot = owner.geometry.slot(p)
                self.keys[b_idx, :, slot] = key_states[b_idx, :, t_idx]
                self.values[b_idx, :, slot] = value_states[b_idx, :, t_idx]
                self.slot_pos[b_idx, slot] = p
            return keys, values

        def get_mask_sizes(self, query_length: int):
            return self.owner.capacity + query_length, 0

        def get_seq_length(self) -> int:
            return self.owner.columns

        def get_max_length(self) -> int:
            return -1

        def reset(self):
            if self.is_initialized:
                self.keys.zero_()
                self.values.zero_()
                self.slot_pos.fill_(-1)

        def reorder_cache(self, beam_idx):
            raise UserError(_NO_BEAMS)

    class _StreamingCache(Cache):
        def __init__(self, model, sink_tokens: int | None = None, window: int | None = None):
            check_transformers()
            if not getattr(model, "_streaming_trt", None):
                enable_streaming(model, 4 if sink_tokens is None else sink_tokens,
                                 1020 if window is None else window)
            geo = model._streaming_trt
            S = geo["sink_tokens"] if sink_tokens is None else sink_tokens
            W = geo["window"] if window is None else window
            self.geometry = _check_geometry(S, W)
            self.sink_tokens, self.window, self.capacity = S, W, self.geometry.capacity
            self.max_chunk = geo["max_chunk"]
            self.ops = _kernels(geo["backend"], model)  # the Triton kernels, or None for the PyTorch path
            cfg = model.config.get_text_config()
            n = cfg.num_hidden_layers
            layer_types = getattr(cfg, "layer_types", None) or [None] * n
            plain = not geo["alibi"] and not getattr(cfg, "attn_logit_softcapping", None)
            sliding = [lt == "sliding_attention" or (lt is None and bool(getattr(cfg, "sliding_window", None)))
                       for lt in layer_types]
            super().__init__(layers=[StreamingLayer(self, self.ops is not None and plain and not sliding[i])
                                     for i in range(n)])
            # ALiBi models rotate nothing: no second rotation for their sinks, only the rank-distance bias
            rotary = None if geo["alibi"] else model.base_model.rotary_emb
            self.layer_freqs = [None if rotary is None else rotary.frequencies(lt)[0] for lt in layer_types]
            self.columns = 0  # input columns consumed (padding included): what generate() slices by
            self.counts = None  # [B] long: real tokens seen per stream
            self.chunk_pos = self.chunk_valid = None
            self.chunk_dense = False  # the chunk has no padding (the kernels' precondition)
            self.masks = {}  # per-chunk masks and distances shared by every layer

        # ---- per-forward bookkeeping (called by the wrapped base forward)
        def begin_chunk(self, valid: torch.Tensor) -> torch.Tensor:
            """``valid [B, q]`` bool (False = padding) -> text positions ``[B, q]`` long (0 for padding)."""
            if self.counts is None:
                self.counts = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
            elif self.counts.shape[0] != valid.shape[0]:
                raise UserError(f"this StreamingCache holds {self.counts.shape[0]} streams; got a batch of "
                                f"{valid.shape[0]} (make one cache per batch)")
            pos = self.counts.to(valid.device)[:, None] + valid.long().cumsum(1) - 1
            self.chunk_valid = valid
            self.chunk_pos = torch.where(valid, pos, torch.zeros_like(pos))
            self.chunk_dense = self.ops is not None and bool(valid.all())
            self.masks = {}
            return self.chunk_pos

        def end_chunk(self):
            self.counts = self.counts + self.chunk_valid.long().sum(1).to(self.counts.device)
            self.columns += self.chunk_valid.shape[1]
            self.chunk_pos = self.chunk_valid = None

        @property
        def seen(self) -> list[int]:
            """Real tokens seen per stream (padding excluded)."""
            return [] if self.counts is None else self.counts.tolist()

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.columns

        def get_max_length(self, *args, **kwargs) -> int:
            return -1

        def reset(self):
            super().reset()
            self.columns, self.counts = 0, None

        def reorder_cache(self, beam_idx):
            raise UserError(_NO_BEAMS)

        def crop(self, max_length: int):
            raise UserError("a StreamingCache cannot be cropped (assisted / speculative decoding and "
                            "prompt lookup are not supported): evicted tokens are gone for good")

        def batch_repeat_interleave(self, repeats: int):
            raise UserError("a StreamingCache cannot be expanded (beam search, contrastive search, "
                            "num_return_sequences>1 over a filled cache): start one stream per sequence")

        def batch_select_indices(self, indices):
            raise UserError("a StreamingCache cannot select batch rows (beam search / assisted decoding)")

    return StreamingLayer, _StreamingCache


_NO_BEAMS = ("beam search is not supported with a StreamingCache (it reorders caches whose evicted "
             "tokens cannot come back): use greedy or sampling (num_beams=1)")


@functools.lru_cache(maxsize=None)
def _classes():
    return _make_classes()


def StreamingCache(model, sink_tokens: int | None = None, window: int | None = None):
    """A ``transformers.Cache`` for ``model`` (enabled with :func:`enable_streaming` first, or here) with
    ``sink_tokens + window`` slots per layer and stream; pass it as ``cache=`` to ``generate()`` or
    ``model()``. Defaults: the model's enabled geometry. ``cache.seen`` lists each stream's real tokens."""
    return _classes()[1](model, sink_tokens, window)


def streaming_cache_class():
    """The class behind :func:`StreamingCache` (for ``isinstance`` checks)."""
    return _classes()[1]


def _check_geometry(S, W) -> Geometry:
    return Geometry(S, W)


# --------------------------------------------------------------------------------------- attention
def streaming_attention(module, query, key, value, attention_mask=None, *, scaling=None, dropout=0.0,
                        softcap=None, sliding_window=None, alibi_slopes=None, **kwargs):
    """The ``"streaming_trt"`` attention function.

    ``query [B, H, q, D]`` rotated at text positions; ``key / value [B, KVH, S+W+q, D]`` from
    :class:`StreamingLayer.update` (cache slots, then the chunk). Returns ``([B, q, H, D], None)``.
    Token t attends to A(t); its scores against sink slots use the query rotated at ``min(t, C-1)``.
    ``softcap`` (Gemma 2) is applied to the scores; ``sliding_window`` (Gemma, Mistral, Qwen2 sliding
    layers) is measured in rank distance, as re-computation on A(t) would. ``alibi_slopes [H]`` (MPT,
    Falcon-RW, already scaled like the scores) adds ``-slope * rank distance``; such queries come unrotated.
    """
    cache = getattr(_ACTIVE, "cache", None)
    if cache is None:
        raise UserError("the streaming_trt attention runs only inside a forward with a StreamingCache "
                        "(model enabled by streaming_trt.hf.enable_streaming)")
    layer = cache.layers[module.layer_idx]
    S, C = cache.sink_tokens, cache.capacity
    B, H, q, D = query.shape
    qpos = cache.chunk_pos  # [B, q]
    qrank = qpos.clamp(max=C - 1)
    if scaling is None:
        scaling = D ** -0.5
    freqs = cache.layer_freqs[module.layer_idx]
    needs_rank = cache.masks.get("rank")
    if needs_rank is None:  # one host sync per chunk, not per layer
        needs_rank = cache.masks["rank"] = S > 0 and bool((qpos >= C).any())
    needs_rank = needs_rank and freqs is not None
    if layer.pending is not None:
        return _kernel_attention(cache, layer, query, qpos, qrank, freqs if needs_rank else None, scaling), None

    kpos = layer.last_kpos  # [B, L]
    L = kpos.shape[1]
    allowed = cache.masks.get(("allowed", L))  # every layer holds the same positions: one mask per chunk
    if allowed is None:
        kp, qp = kpos[:, None, :], qpos[:, :, None]
        is_sink = (kp >= 0) & (kp < S)
        allowed = (kp >= 0) & (kp <= qp) & (is_sink | (kp >= qp - cache.window + 1))
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
    if not softcap and alibi_slopes is None and (q == 1 or not needs_rank) and not dropout:
        # SDPA: a decode step moves its second rotation onto the S sink keys instead (q_rank . k_i ==
        # q_text . R(t - rank) k_i), a chunk that needs none takes the mask alone
        if needs_rank:
            ang = exact_angles(freqs, qpos[:, 0] - qrank[:, 0])  # [B, F]
            sinks = _rotate(key[:, :, :S], ang[:, None, :].expand(B, S, ang.shape[-1]))
            key = torch.cat([sinks, key[:, :, S:]], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None], scale=scaling, enable_gqa=g > 1)
        return out.transpose(1, 2).contiguous(), None
    k = key.repeat_interleave(g, dim=1) if g > 1 else key
    v = value.repeat_interleave(g, dim=1) if g > 1 else value
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [B, H, q, L]
    if needs_rank:
        # second rotation, text position -> rank, for the scores against the S sink slots only
        q_rank = _rotate(query, exact_angles(freqs, qrank - qpos))
        scores[..., :S] = torch.matmul(q_rank, k[:, :, :S].transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float()
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(scores.device, torch.float32).view(1, H, 1, 1) * dist[:, None].float()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), None


def _kernel_attention(cache, layer, query, qpos, qrank, freqs, scaling) -> torch.Tensor:
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
    q_rank = q_text if freqs is None else _rotate(query, exact_angles(freqs, qrank - qpos)).transpose(1, 2)
    start = cache.counts
    lengths = torch.full_like(start, q)
    if q == 1:
        ops.cache_write(k_new, v_new, layer.keys, layer.values, start, lengths, geo)
        out = ops.decode_attention(q_text[:, 0], q_rank[:, 0], layer.keys, layer.values, start + 1, geo, scaling)
        return out.view(B, 1, H, D)
    out = ops.prefill_attention(q_text, q_rank, k_new, v_new, layer.keys, layer.values, start, lengths, geo, scaling)
    ops.cache_write(k_new, v_new, layer.keys, layer.values, start, lengths, geo)
    return out


# --------------------------------------------------------------------------------------- adapters
# Falcon and MPT run their own attention math instead of calling AttentionInterface; their attention
# modules get a forward that projects with the module's own weights and calls streaming_attention.

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
    slopes = getattr(self, "_streaming_alibi", None)
    if slopes is None:
        from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = layer_past.update(k, v, self.layer_idx)
    out, _ = streaming_attention(self, q, k, v, scaling=self.inv_norm_factor, alibi_slopes=slopes)
    return self.dense(out.reshape(*hidden_states.shape[:2], -1)), None


def _mpt_attention(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
    B, L = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, L, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    k, v = cache.update(k, v, self.layer_idx)
    out, _ = streaming_attention(self, q, k, v, scaling=self.softmax_scale, alibi_slopes=self._streaming_alibi)
    return self.out_proj(out.reshape(B, L, -1)), None


def _require(module, names: tuple[str, ...]) -> None:
    """The adapters read these attributes of transformers' modules: say so clearly if a release renamed them."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        import transformers

        raise UserError(f"transformers {transformers.__version__} changed {type(module).__name__} (no "
                        f"{', '.join(missing)}): streaming_trt.hf's adapter for it was written against 5.24")


def _adapt_falcon(model) -> bool:
    """Replace every Falcon attention forward; returns whether the model uses ALiBi."""
    from transformers.models.falcon import modeling_falcon as mf

    base, alibi = model.base_model, bool(model.config.alibi)
    _require(base, ("h", "use_alibi", "rotary_emb"))
    for block in base.h:  # all checked before any is changed
        _require(block.self_attention, ("query_key_value", "dense", "num_heads", "head_dim", "num_kv_heads",
                                        "multi_query", "new_decoder_architecture", "inv_norm_factor", "layer_idx"))
    for block in base.h:
        attn = block.self_attention
        if alibi:  # the model's slopes (bf16-rounded, as it uses them) times its 1/sqrt(head_dim)
            ones = torch.ones(1, 2, dtype=torch.long, device=attn.dense.weight.device)
            slopes = mf.build_alibi_tensor(ones, attn.num_heads, torch.float32)[:, 0, 1]
            attn._streaming_alibi = slopes * attn.inv_norm_factor
        attn.forward = types.MethodType(_falcon_attention, attn)
    base.use_alibi = False  # its own ALiBi tensor grows with the stream and is not used
    return alibi


def _adapt_mpt(model) -> bool:
    base = model.base_model
    _require(base, ("wte", "blocks", "num_heads", "build_mpt_alibi_tensor"))
    for block in base.blocks:
        _require(block.attn, ("Wqkv", "out_proj", "n_heads", "head_dim", "softmax_scale", "clip_qkv", "layer_idx"))
    device = base.wte.weight.device
    slopes = -base.build_mpt_alibi_tensor(base.num_heads, 2, device=device)[:, 0, 0].float()  # what forward builds
    for block in base.blocks:
        block.attn._streaming_alibi = slopes
        block.attn.forward = types.MethodType(_mpt_attention, block.attn)
    return True


#: model_type -> installs streaming attention in a model that does not call AttentionInterface; returns
#: whether the model uses ALiBi (no rotation) instead of rotary positions.
ADAPTERS = {"falcon": _adapt_falcon, "mpt": _adapt_mpt}


# --------------------------------------------------------------------------------------- model
def _wrap_forward(base, orig_forward):
    @functools.wraps(orig_forward)
    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        model = base._streaming_trt_owner
        if cache is None:
            cache = StreamingCache(model)  # one-shot streaming forward over this input
        if not isinstance(cache, streaming_cache_class()):
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
        step = max(1, min(cache.max_chunk, cache.window))
        outs = []
        for s in range(0, n, step):
            e = min(n, s + step)
            pos = cache.begin_chunk(valid[:, s:e])
            _ACTIVE.cache = cache
            try:
                outs.append(orig_forward(
                    input_ids=None if input_ids is None else input_ids[:, s:e],
                    inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, s:e],
                    attention_mask=None, position_ids=pos, cache=cache, **kwargs))
            finally:
                _ACTIVE.cache = None
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
            raise UserError(_NO_BEAMS)
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
            kwargs["cache"] = StreamingCache(model)
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

    Afterwards ``model.generate(...)`` uses a fresh :func:`StreamingCache` per call unless one is passed
    (``cache=``), and ``model(ids, cache=cache)`` continues a stream. ``sink_tokens`` (S >= 0) and
    ``window`` (W >= 1, the current token included) set the default geometry; ``max_chunk`` bounds
    the tokens processed per internal forward (inputs are cut into chunks of ``min(max_chunk, W)``).
    ``backend``: ``"auto"`` (the Triton kernels on CUDA, PyTorch otherwise), ``"torch"`` or
    ``"triton"`` (on a CPU only under ``TRITON_INTERPRET=1``, for tests), as in ``st.load_model``;
    each new cache resolves it for the device the model is on then.
    Calling it again changes the defaults.
    """
    check_transformers()
    _check_geometry(sink_tokens, window)
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
    _kernels(backend, model)  # a backend that cannot run here is refused now, not at the first forward
    base = model.base_model
    state = getattr(model, "_streaming_trt", None)
    if state is None:
        alibi = False
        if mt in ADAPTERS:
            alibi = ADAPTERS[mt](model)
        else:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTN_NAME, streaming_attention)
            model.set_attn_implementation(ATTN_NAME)
        if not alibi:
            if not hasattr(base, "rotary_emb"):
                raise UserError(f"{type(base).__name__} has no rotary_emb module: not the rotary + "
                                f"AttentionInterface pattern")
            if not isinstance(base.rotary_emb, ExactRotary):
                base.rotary_emb = ExactRotary(base.rotary_emb)
        base.__dict__["_streaming_trt_owner"] = model  # not a submodule (no cycle)
        base.forward = _wrap_forward(base, base.forward)
        model.generate = _wrap_generate(model, model.generate)
    else:
        alibi = state["alibi"]
    model._streaming_trt = dict(sink_tokens=sink_tokens, window=window, max_chunk=max_chunk, alibi=alibi,
                                backend=backend)
    return model


def _kernels(backend: str, model):
    """The kernel module for ``backend`` on the model's current device (None: the PyTorch path)."""
    from .kernel_backend import kernel_ops, resolve_backend

    device = next(model.parameters()).device
    return kernel_ops("triton") if resolve_backend(backend, device) == "triton" else None


# --------------------------------------------------------------------------------------- cost CLI
_BENCH_ARCHS = ("llama", "gpt_neox", "phi3", "qwen3", "gemma2", "falcon", "mpt")


def _bench_config(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int):
    import transformers as tf

    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden if arch == "gpt_neox" else
              (8 * hidden) // 3, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=4096)
    if arch == "gpt_neox":  # Pythia: partial rotary 0.25, parallel residual, MHA
        return tf.GPTNeoXConfig(partial_rotary_factor=0.25, use_parallel_residual=True, **kw)
    if arch == "falcon":  # Falcon-7B's layout: multi-query, parallel attention
        return tf.FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               multi_query=True, parallel_attn=True, bias=False)
    if arch == "mpt":  # MPT-7B's layout: ALiBi, MHA
        return tf.MptConfig(vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=heads, max_seq_len=4096)
    kw.update(num_key_value_heads=kv_heads)
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "phi3":
        return tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=hidden // heads, **kw)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=hidden // heads, pad_token_id=0, **kw)
    raise UserError(f"--archs: unknown architecture {arch!r}; choose from {', '.join(_BENCH_ARCHS)}")


def main(argv=None) -> int:
    """``python -m streaming_trt.hf``: decode cost through streaming_trt.hf vs the native runtime."""
    import argparse
    import sys
    import tempfile
    import time

    p = argparse.ArgumentParser(
        prog="python -m streaming_trt.hf",
        description="Time greedy decoding, per token, after the cache is full: the native runtime (Llama) "
                    "against transformers models streaming through streaming_trt.hf, all with random weights of "
                    "the same shape. Prints a markdown table.")
    p.add_argument("--archs", default=",".join(_BENCH_ARCHS), help="comma-separated transformers architectures "
                   f"to run through streaming_trt.hf (default: {','.join(_BENCH_ARCHS)})")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default 768: Pythia-160M)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=12, help="key/value heads where the architecture has GQA")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary size (default 50304)")
    p.add_argument("--sink-tokens", type=int, default=4, help="attention sinks S (default 4)")
    p.add_argument("--window", type=int, default=508, help="window W, current token included (default 508)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed after the cache is full (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="attention kernels of both paths: auto = the Triton kernels on CUDA, PyTorch otherwise")
    args = p.parse_args(argv)
    try:
        from tqdm import tqdm

        import streaming_trt as st

        archs = [a for a in args.archs.split(",") if a]
        for a in archs:
            if a not in _BENCH_ARCHS:
                raise UserError(f"--archs: unknown architecture {a!r}; choose from {', '.join(_BENCH_ARCHS)}")
        geometry = _check_geometry(args.sink_tokens, args.window)
        if args.tokens < 1 or args.hidden % args.heads or args.heads % max(1, args.kv_heads):
            raise UserError("--tokens must be >= 1, --hidden a multiple of --heads, --heads of --kv-heads")
        if args.threads:
            torch.set_num_threads(args.threads)
        import transformers as tf

        cap = geometry.capacity
        prompt = torch.randint(3, args.vocab, (1, cap), generator=torch.Generator().manual_seed(0)).tolist()[0]
        rows = []

        def interleaved(step, ref):
            """Median ms of ``step`` and of the native ``ref`` step, taken alternately so that both see the
            same load from other jobs sharing the machine."""
            for _ in range(3):
                step(), ref()
            a, b = [], []
            for _ in tqdm(range(args.tokens), leave=False, file=sys.stderr):
                for fn, out in ((step, a), (ref, b)):
                    t0 = time.perf_counter()
                    fn()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    out.append(time.perf_counter() - t0)
            med = lambda x: 1000 * sorted(x)[len(x) // 2]  # noqa: E731
            return med(a), med(b)

        torch.manual_seed(0)
        hf = tf.AutoModelForCausalLM.from_config(_bench_config("llama", args.hidden, args.layers, args.heads,
                                                               args.kv_heads, args.vocab), dtype=torch.float32)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            native = st.load_model(d, device=args.device, backend=args.backend)
        del hf
        session = native.session(sink_tokens=args.sink_tokens, window=args.window)
        session.feed(prompt, all_logits=False)
        native_step = lambda: session.feed([7], all_logits=False)  # noqa: E731
        for arch in tqdm(archs, desc="models", file=sys.stderr):
            torch.manual_seed(0)
            cfg = _bench_config(arch, args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
            hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().to(args.device)
            enable_streaming(hf, args.sink_tokens, args.window, backend=args.backend)
            cache = StreamingCache(hf)
            with torch.inference_mode():
                hf(torch.tensor([prompt], device=args.device), cache=cache, logits_to_keep=1)
                tok = torch.tensor([[7]], device=args.device)
                ms, ref = interleaved(lambda: hf(tok, cache=cache, logits_to_keep=1), native_step)
            rows.append((arch, ms, ref))
        print(f"decode after {cap} tokens (S={args.sink_tokens}, W={args.window}), hidden {args.hidden}, "
              f"{args.layers} layers, {args.heads} heads, vocab {args.vocab}, {args.device}, backend {args.backend}, "
              f"{torch.get_num_threads()} threads, transformers {tf.__version__}; median step, each "
              f"architecture timed alternately with the native runtime's Llama of the same shape")
        print("| architecture | streaming_trt.hf ms / token | native Llama ms / token (same run) | ratio |\n"
              "| --- | --- | --- | --- |")
        for arch, ms, ref in rows:
            print(f"| {arch} | {ms:.1f} | {ref:.1f} | {ms / ref:.2f}x |")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
