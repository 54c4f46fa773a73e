"""StreamingLLM inside transformers 5: ``model.generate()`` with attention sinks and a rolling window.

>>> import transformers, streaming_trt.hf as sthf
>>> model = transformers.AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
>>> sthf.enable_streaming(model, sink_tokens=4, window=1020)
>>> out = model.generate(ids, max_new_tokens=100_000, do_sample=True)   # constant memory, any length

or pass a cache explicitly: ``model.generate(ids, cache=sthf.HFStreamingCache(model, 4, 1020))``, and
``model(ids, cache=cache)`` in a loop continues the same streams.

Every token t computes the contract of docs/contract.md: it attends to its stream's first
``sink_tokens`` tokens and its last ``window`` tokens (itself included) at rank positions. How:

- the model's ``rotary_emb`` is replaced by :class:`ExactRotary`: same inverse frequencies and
  attention scaling, but angles ``position * inv_freq`` in float64 reduced mod 2*pi, so that keys can
  be rotated at their (unbounded) *text* position and stored once;
- the keys live in a :class:`HFStreamingCache` of :class:`StreamingLayer` (``S`` sink slots + a ring of
  ``W`` slots per stream, allocated once); scores against window keys depend only on text distance,
  which equals rank distance, so only the query's scores against the sinks need a second rotation,
  from its text position ``t`` to its rank ``min(t, C - 1)``;
- the attention function registered as ``"streaming_trt"`` (:mod:`.attention`) builds the sink + window + padding mask
  itself and does that second rotation;
- the model's base ``forward`` is wrapped: it derives each stream's text positions from its own
  counters and the attention mask (left padding is never a sink, never attended, never counts), and
  feeds inputs longer than ``min(max_chunk, window)`` in chunks, so no query ever sees more than A(t).

Falcon and MPT do not call ``AttentionInterface`` (their attention modules run SDPA / eager math and
add ALiBi themselves), so their attention modules' ``forward`` is replaced by one that projects with
the module's own weights and calls the same attention function (:data:`ADAPTERS`, :mod:`.adapters`). ALiBi models
(MPT, Falcon-RW) rotate nothing: their bias follows the key's rank distance from the query, so the
sinks sit at distance ``min(t, C-1) - i`` exactly as rotary sinks do.

On CUDA (``backend="auto"``) decode steps and unpadded chunks of plain rotary layers run the
project's Triton kernels (:mod:`streaming_trt.kernels`) on the same cache tensors; soft-capped,
sliding-window, ALiBi layers and padded chunks take the PyTorch path.

Refused with :class:`streaming_trt.contract.UserError`: beam search, assisted / prompt-lookup decoding,
``cache_implementation=``, dynamic-NTK and longrope rope scaling (their frequencies depend on the
sequence length and cannot be frozen), architectures outside :data:`ARCHITECTURES` and transformers
versions outside :data:`SUPPORTED_TRANSFORMERS` (:mod:`.compat`; importing this package checks it).

The decode cost against the native runtime: ``python -m bench.hf_cost`` (README.md).
"""
from __future__ import annotations

from .compat import SUPPORTED_TRANSFORMERS, check_transformers
from .cache import HFStreamingCache, StreamingLayer, StreamingSettings
from .rotary import ExactRotary
from .attention import streaming_attention
from .adapters import ADAPTERS
from .enable import ARCHITECTURES, ATTN_NAME, enable_streaming

StreamingCache = HFStreamingCache  # the old name (tests and user code); the runtime's class shares it

__all__ = ["enable_streaming", "HFStreamingCache", "StreamingCache", "StreamingLayer", "StreamingSettings",
           "ExactRotary", "streaming_attention", "check_transformers", "SUPPORTED_TRANSFORMERS", "ARCHITECTURES",
           "ADAPTERS", "ATTN_NAME"]
