"""The transformers ``Cache`` of :mod:`streaming_trt.hf`: sink slots plus a ring per layer and stream,
allocated once, and the settings :func:`~streaming_trt.hf.enable_streaming` leaves on a model."""
from __future__ import annotations

import dataclasses
from types import ModuleType

import torch

from ..contract import Geometry, UserError
from ..runtime.kernel_backend import kernel_ops, resolve_backend
from .compat import check_transformers

check_transformers()  # a clear UserError on another release, before the imports below fail on it
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

NO_BEAMS = ("beam search is not supported with a StreamingCache (it reorders caches whose evicted "
            "tokens cannot come back): use greedy or sampling (num_beams=1)")


@dataclasses.dataclass(frozen=True)
class StreamingSettings:
    """What :func:`~streaming_trt.hf.enable_streaming` leaves on a model (``model._streaming_trt``):
    the default ``geometry`` of its caches, ``max_chunk`` (tokens per internal forward), the
    attention ``backend`` asked for (resolved per cache) and whether the model uses ALiBi."""

    geometry: Geometry
    max_chunk: int
    backend: str
    alibi: bool


def kernels_for(backend: str, model) -> ModuleType | None:
    """The kernel module for ``backend`` on the model's current device (None: the PyTorch path)."""
    device = next(model.parameters()).device
    return kernel_ops("triton") if resolve_backend(backend, device) == "triton" else None


class StreamingLayer(CacheLayerMixin):
    """One layer's keys/values: ``[B, KVH, C, D]`` (``C = geometry.capacity``) allocated once, token
    ``u`` in slot ``geometry.slot(u)``; ``slot_pos [B, C]`` (long) is the text position held by each
    slot, -1 if empty. Keys are stored rotated at their text position."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "HFStreamingCache", kernel: bool):
        super().__init__()
        self.owner = owner
        self.kernel = kernel  # this layer may run the Triton kernels (plain rotary, no softcap / sliding)
        self.slot_pos = None
        self.last_kpos = None
        self.pending = None  # a kernel chunk's (keys, values) [B, KVH, q, D], written by the attention

    def lazy_initialization(self, key_states, value_states):
        B, KVH, _, D = key_states.shape
        C = self.owner.geometry.capacity
        self.keys = key_states.new_zeros(B, KVH, C, D)
        self.values = value_states.new_zeros(B, KVH, C, value_states.shape[-1])
        self.slot_pos = torch.full((B, C), -1, dtype=torch.long, device=key_states.device)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """``key_states [B, KVH, q, D]`` -> (cache before this chunk ++ chunk) ``[B, KVH, C+q, D]``;
        the chunk is then written to its slots. ``last_kpos [B, C+q]`` is what the attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        pos, valid, slot_of = owner.chunk_pos, owner.chunk_valid, owner.geometry.slot
        if pos is None or tuple(pos.shape) != (key_states.shape[0], key_states.shape[2]):
            raise UserError("StreamingCache was updated outside a streaming forward; call the model "
                            "enabled by streaming_trt.hf.enable_streaming")
        if self.kernel and owner.chunk_dense:
            # the kernels read the cache slots themselves and the attention writes the chunk there
            # (after a prefill, before a decode step): nothing is concatenated
            self.pending = (key_states, value_states)
            self.slot_pos.scatter_(1, slot_of(pos), pos)
            return self.keys, self.values
        keys = torch.cat([self.keys, key_states], dim=2)
        values = torch.cat([self.values, value_states], dim=2)
        kpos = torch.where(valid, pos, torch.full_like(pos, -1))
        self.last_kpos = torch.cat([self.slot_pos, kpos], dim=1)
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        if b_idx.numel():
            p = pos[b_idx, t_idx]
            slot = slot_of(p)
            self.keys[b_idx, :, slot] = key_states[b_idx, :, t_idx]
            self.values[b_idx, :, slot] = value_states[b_idx, :, t_idx]
            self.slot_pos[b_idx, slot] = p
        return keys, values

    def get_mask_sizes(self, query_length: int):
        return self.owner.geometry.capacity + query_length, 0

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
        raise UserError(NO_BEAMS)


class HFStreamingCache(Cache):
    """A ``transformers.Cache`` for a model enabled by :func:`~streaming_trt.hf.enable_streaming`, with
    ``sink_tokens + window`` slots per layer and stream (defaults: the model's enabled geometry); pass
    it as ``cache=`` to ``generate()`` or ``model()``. ``seen`` lists each stream's real tokens.

    Not the runtime's :class:`streaming_trt.runtime.cache.StreamingCache` (that one serves
    :class:`streaming_trt.runtime.model.Transformer`); ``streaming_trt.hf.StreamingCache`` is this class's old name.
    """

    def __init__(self, model, sink_tokens: int | None = None, window: int | None = None):
        settings = getattr(model, "_streaming_trt", None)
        if not isinstance(settings, StreamingSettings):
            raise UserError("this model is not enabled for streaming: call "
                            "streaming_trt.hf.enable_streaming(model, sink_tokens, window) first")
        default = settings.geometry
        self.geometry = Geometry(default.sink_tokens if sink_tokens is None else sink_tokens,
                                 default.window if window is None else window)
        self.max_chunk = settings.max_chunk
        self.ops = kernels_for(settings.backend, model)  # the Triton kernels, or None for the PyTorch path
        cfg = model.config.get_text_config()
        n = cfg.num_hidden_layers
        layer_types = getattr(cfg, "layer_types", None) or [None] * n
        plain = not settings.alibi and not getattr(cfg, "attn_logit_softcapping", None)
        sliding = [lt == "sliding_attention" or (lt is None and bool(getattr(cfg, "sliding_window", None)))
                   for lt in layer_types]
        super().__init__(layers=[StreamingLayer(self, self.ops is not None and plain and not sliding[i])
                                 for i in range(n)])
        # ALiBi models rotate nothing: no second rotation for their sinks, only the rank-distance bias
        rotary = None if settings.alibi else model.base_model.rotary_emb
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
        raise UserError(NO_BEAMS)

    def crop(self, max_length: int):
        raise UserError("a StreamingCache cannot be cropped (assisted / speculative decoding and "
                        "prompt lookup are not supported): evicted tokens are gone for good")

    def batch_repeat_interleave(self, repeats: int):
        raise UserError("a StreamingCache cannot be expanded (beam search, contrastive search, "
                        "num_return_sequences>1 over a filled cache): start one stream per sequence")

    def batch_select_indices(self, indices):
        raise UserError("a StreamingCache cannot select batch rows (beam search / assisted decoding)")
