"""TensorRT-LLM's StreamingLLM computation (0.9 to 0.21), emulated in PyTorch for one sequence.

What an engine built with ``--streamingllm enable`` computes, from its kernels:

- Context phase (the prompt, n tokens): *dense* causal attention, queries and keys rotated at
  their text positions 0..n-1, however long the prompt. Keys go to the cache unrotated
  (position shift); only the sinks and the last ``ring`` prompt tokens stay there.
- Cache slots (the slot map): token u < S sits in slot u; a later token in the ring slot
  ``S + bubble + (u - S) % ring``. ``bubble`` pads the sinks to a KV block boundary in a paged
  cache (``tokens_per_block - S % tokens_per_block`` unless 0); it moves slots, not results.
- Generation of token t: the kernel attends to ``m = min(t, past)`` cached tokens plus the current
  one, where ``past = max_attention_window_size`` (``"exclusive"`` convention, every version
  that builds sink engines) or ``max_attention_window_size - 1`` (``"inclusive"``, later
  kernels). Cached keys are re-rotated at their index in the cache (sinks 0..S-1, then the ring
  oldest first: ``shiftKCache``), the query and the current key at position ``m``.
  The ring keeps ``past - S`` tokens.

With ``max_attention_window_size = S + W - 1`` (exclusive) generation is the contract exactly;
prompts longer than S + W are where the two differ, and :func:`expected_agreement` says which
logits must agree. Everything runs in float64 on the CPU (or the weights' device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import Geometry, UserError
from streaming_trt.runtime.rope import inverse_frequencies

from .settings import CONVENTIONS


def hf_weights(model) -> dict[str, torch.Tensor]:
    """Hugging Face names for the parameters of a :class:`streaming_trt.runtime.model.Transformer`."""
    return {(k if k.startswith("lm_head.") else "model." + k): v for k, v in model.state_dict().items()}


class TrtllmSinkEmulator:
    """One sequence through a sink-token engine: :meth:`context` once, then :meth:`step` per token.

    Args:
        config: the model's :class:`~streaming_trt.runtime.config.ModelConfig`.
        weights: tensors with Hugging Face names (see :func:`hf_weights`).
        sink_token_length, max_attention_window_size: the engine's run-time settings.
        convention: ``"exclusive"`` (0.9 to 0.21) or ``"inclusive"``; see the module doc.
        tokens_per_block: paged-cache block size (adds the sink bubble); None for a contiguous cache.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], sink_token_length: int,
                 max_attention_window_size: int, convention: str = "exclusive",
                 tokens_per_block: int | None = None, dtype: torch.dtype = torch.float64):
        if convention not in CONVENTIONS:
            raise UserError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if config.qk_norm or config.mlp_bias:
            raise UserError("the emulation covers Llama-architecture models only (no q/k norm, no MLP bias)")
        self.config, self.dtype = config, dtype
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        self.sinks = sink_token_length
        self.past = max_attention_window_size - (convention == "inclusive")
        self.ring = self.past - self.sinks
        if self.sinks < 0 or self.ring < 1:
            raise UserError(f"max_attention_window_size={max_attention_window_size} leaves no ring slot after "
                            f"{self.sinks} sinks ({convention} convention)")
        s = self.sinks
        tpb = tokens_per_block
        self.bubble = 0 if not tpb or s % tpb == 0 else tpb - s % tpb
        self.num_slots = s + self.bubble + self.ring
        self.inv_freq = inverse_frequencies(config).to(dtype)
        device = self.w["model.embed_tokens.weight"].device
        shape = (config.num_layers, self.num_slots, config.num_kv_heads, config.head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)  # unrotated keys
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.t = 0  # tokens of the sequence so far

    # -- the slot map ---------------------------------------------------------------------------
    def slot_of(self, token: int) -> int:
        s = self.sinks
        return token if token < s else s + self.bubble + (token - s) % self.ring

    def kept_after(self, t: int) -> list[int]:
        """Tokens whose K/V the cache holds once ``t`` tokens have been processed (sinks, then oldest first)."""
        m = min(t, self.past)
        sinks = list(range(min(self.sinks, t)))
        return sinks + list(range(t - (m - len(sinks)), t))

    # -- the model ------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * self.w[name]

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of ``x [n, heads, d]`` at ``positions [n]``."""
        angles = positions.to(self.dtype)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = self.inv_freq.shape[0]
        x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _qkv(self, i: int, h: torch.Tensor):
        c, p = self.config, f"model.layers.{i}.self_attn."
        n = h.shape[0]
        q = self._linear(h, p + "q_proj").view(n, c.num_heads, c.head_dim)
        k = self._linear(h, p + "k_proj").view(n, c.num_kv_heads, c.head_dim)
        v = self._linear(h, p + "v_proj").view(n, c.num_kv_heads, c.head_dim)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``q [n, H, d]`` (rotated) over ``k, v [m, KV, d]`` (rotated keys); ``mask [n, m]`` True = visible."""
        group = self.config.num_heads // self.config.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,mhd->hnm", q, k) * self.config.head_dim ** -0.5
        p = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
        return torch.einsum("hnm,mhd->nhd", p, v).reshape(q.shape[0], -1)

    def _block_tail(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}."
        x = x + self._linear(attn, p + "self_attn.o_proj")
        h = self._rms(x, p + "post_attention_layernorm.weight")
        mlp = F.silu(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
        return x + self._linear(mlp, p + "mlp.down_proj")

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return F.linear(self._rms(x, "model.norm.weight"), head)

    # -- the two phases -------------------------------------------------------------------------
    @torch.no_grad()
    def context(self, prompt: list[int]) -> torch.Tensor:
        """The prompt, densely: float64 logits ``[n, vocab]``; the cache keeps sinks + the last ``ring`` tokens."""
        if self.t:
            raise UserError("context() starts a sequence; make a new emulator for another prompt")
        n = len(prompt)
        if n < 1:
            raise UserError("the prompt must have at least one token")
        ids = torch.as_tensor(prompt, device=self.k_cache.device)
        positions = torch.arange(n, device=ids.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        kept = self.kept_after(n)
        slots = torch.as_tensor([self.slot_of(u) for u in kept], device=ids.device)
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.config.num_layers):
            q, k, v = self._qkv(i, self._rms(x, f"model.layers.{i}.input_layernorm.weight"))
            attn = self._attend(self._rotate(q, positions), self._rotate(k, positions), v, causal)
            self.k_cache[i, slots], self.v_cache[i, slots] = k[kept], v[kept]
            x = self._block_tail(i, x, attn)
        self.t = n
        return self._logits(x)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """One generation step for ``token`` (token index ``t``): float64 logits ``[vocab]``."""
        if not self.t:
            raise UserError("call context() with the prompt first")
        t = self.t
        cached = self.kept_after(t)
        m = len(cached)  # min(t, past)
        slots = torch.as_tensor([self.slot_of(u) for u in cached], dtype=torch.long, device=self.k_cache.device)
        positions = torch.arange(m + 1, device=self.k_cache.device)  # cached keys at 0..m-1, current at m
        visible = torch.ones(1, m + 1, dtype=torch.bool, device=positions.device)
        x = self.w["model.embed_tokens.weight"][torch.as_tensor([token], device=positions.device)]
        for i in range(self.config.num_layers):
            q, k, v = self._qkv(i, self._rms(x, f"model.layers.{i}.input_layernorm.weight"))
            keys = torch.cat([self.k_cache[i, slots], k])
            values = torch.cat([self.v_cache[i, slots], v])
            attn = self._attend(self._rotate(q, positions[m:]), self._rotate(keys, positions), values, visible)
            # every generated token enters the cache: a sink slot, or the ring slot of the oldest token
            self.k_cache[i, self.slot_of(t)], self.v_cache[i, self.slot_of(t)] = k[0], v[0]
            x = self._block_tail(i, x, attn)
        self.t = t + 1
        return self._logits(x)[0]

    def run(self, prompt: list[int], continuation: list[int]) -> torch.Tensor:
        """Context for ``prompt``, then one step per continuation token (teacher forcing).

        Returns ``[len(prompt) + len(continuation), vocab]``: row i holds the logits computed for
        token i, the same layout as ``Session.feed(prompt + continuation)``.
        """
        rows = [self.context(prompt)]
        rows += [self.step(tok)[None] for tok in continuation]
        return torch.cat(rows)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Greedy generation: the new tokens and the logits each was chosen from ``[max_new_tokens, vocab]``."""
        logits = [self.context(prompt)[-1]]
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < max_new_tokens:
            logits.append(self.step(tokens[-1]))
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.stack(logits)


def expected_agreement(prompt_len: int, total_len: int, sink_tokens: int, window: int,
                       num_layers: int) -> torch.Tensor:
    """Which logits rows of an engine (translated with L = S + W - 1) must equal the contract's.

    A stream of ``total_len`` tokens whose first ``prompt_len`` are the prompt; returns a bool
    ``[total_len]``. The two computations differ only through the dense context phase, so the
    difference is traced through the layers:

    - a prompt token t >= S + W attends, densely, to tokens the contract has evicted: its output
      differs from layer 0 on, so its keys/values of layers 1.. differ;
    - a prompt token t < S + W attends to 0..t in both;
    - a generated token attends to the same cached set at the same rank positions in both, so its
      output at a layer differs exactly when its own input there, or a cached entry it reads at
      that layer, differs.

    Layer-0 keys and values depend only on the embeddings and never differ. Hence a one-layer
    model agrees on every generated row, and deeper models agree again once the window has moved
    past the long prompt's tail by as many windows as the difference needs layers to fade.
    """
    geometry = Geometry(sink_tokens, window)
    capacity = geometry.capacity
    # dirty[l][u]: the keys/values token u stores at layer l differ from the contract's.
    dirty = [[False] * total_len for _ in range(num_layers + 1)]
    rows = torch.zeros(total_len, dtype=torch.bool)
    for t in range(total_len):
        visible = geometry.attended(t)
        for layer in range(num_layers):
            if t < prompt_len:
                out = t >= capacity  # dense context phase vs A(t); before that both see 0..t, all clean
            else:
                out = dirty[layer][t] or any(dirty[layer][u] for u in visible)
            dirty[layer + 1][t] = out
        rows[t] = not dirty[num_layers][t]
    return rows
