"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in plain PyTorch over a streaming cache."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_backend import resolve_backend
from .config import ModelConfig
from ..contract import CheckpointError, UserError
from .rope import inverse_frequencies
from .session import Session

if TYPE_CHECKING:
    from .cache import StepPlan, StreamingCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the runtime needs, by Hugging Face name, with its shape."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (c.hidden_size,),
            "post_attention_layernorm.weight": (c.hidden_size,),
            "self_attn.q_proj.weight": (q, c.hidden_size),
            "self_attn.k_proj.weight": (kv, c.hidden_size),
            "self_attn.v_proj.weight": (kv, c.hidden_size),
            "self_attn.o_proj.weight": (c.hidden_size, q),
            "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if c.o_proj_bias:
            layer["self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (c.intermediate_size,), "mlp.up_proj.bias": (c.intermediate_size,),
                          "mlp.down_proj.bias": (c.hidden_size,)})
        if c.qk_norm:
            layer.update({"self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,)})
        if c.sink_logits == "learned":
            layer["self_attn.sinks"] = (c.num_heads,)
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def check_state_dict(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first missing or mis-shaped tensor."""
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name!r} is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, config.json implies {list(shape)}"
            )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        if c.sink_logits:  # [num_heads]; all zero (and frozen in training) for "zero"
            self.sinks = nn.Parameter(torch.zeros(c.num_heads))
        self.sink_logits = c.sink_logits

    def forward(self, x: torch.Tensor, layer: int, cache: "StreamingCache", plan: "StepPlan") -> torch.Tensor:
        """``x [batch, n, hidden]``, or ``[T, hidden]`` (the valid rows) when ``plan.packed`` is set."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if plan.packed is not None:
            q, k, v = plan.unpack(q), plan.unpack(k), plan.unpack(v)
        batch, n, _ = q.shape
        q = q.view(batch, n, self.num_heads, self.head_dim)
        k = k.view(batch, n, self.num_kv_heads, self.head_dim)
        v = v.view(batch, n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = cache.attend(layer, q, k, v, plan, self.head_dim**-0.5, self.sinks if self.sink_logits else None)
        out = out.reshape(batch, n, -1)
        return self.o_proj(out if plan.packed is None else plan.pack(out))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, layer: int, cache: "StreamingCache", plan: "StepPlan") -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A decoder whose attention runs over a :class:`~streaming_trt.runtime.cache.StreamingCache`.

    Module names follow Hugging Face's (``layers.0.self_attn.q_proj`` ...), so a checkpoint loads
    by name. Build one with :meth:`from_state_dict` or :func:`streaming_trt.load_model`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.backend = "torch"
        self.cuda_graphs = True  # on CUDA its sessions replay decode steps from CUDA graphs (Session's default)
        self._inv_freq: torch.Tensor | None = None

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        source: str = "state_dict",
    ) -> "Transformer":
        """Build the model from tensors with Hugging Face names (``model.layers.0...``)."""
        dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        check_device_dtype(device, dtype)
        check_state_dict(config, state_dict, source)
        with torch.device("meta"):
            model = cls(config)
        names = {name for name, _ in model.named_parameters()}
        tensors = {k.removeprefix("model."): v for k, v in state_dict.items() if k.removeprefix("model.") in names}
        if config.sink_logits == "zero":  # softmax-off-by-one: exp(0) in every denominator, nothing stored
            tensors.update({f"layers.{i}.self_attn.sinks": torch.zeros(config.num_heads) for i in range(config.num_layers)})
        model.load_state_dict(tensors, strict=True, assign=True)
        model.to(device=device, dtype=dtype)
        model.backend = resolve_backend(backend, device)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """``[rotary_dim // 2]`` float64 inverse frequencies on the model's device."""
        if self._inv_freq is None or self._inv_freq.device != self.device:
            self._inv_freq = inverse_frequencies(self.config).to(self.device)
        return self._inv_freq

    def session(self, sink_tokens: int = 4, window: int = 1020, batch: int = 1, **kwargs):
        """Open a :class:`~streaming_trt.runtime.session.Session` (a batch of streams) on this model."""
        return Session(self, sink_tokens=sink_tokens, window=window, batch=batch, **kwargs)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: "StreamingCache", lengths: list[int],
                last_only: bool = False) -> torch.Tensor:
        """Feed ``tokens [batch, n]`` (row b valid for its first ``lengths[b]``) through the cache.

        Returns float32 logits ``[batch, n, vocab]`` (padding rows zero), or with ``last_only``
        those of each row's last valid token, ``[batch, vocab]`` (meaningless for a row with no
        tokens); advances the cache.
        """
        n = tokens.shape[1]
        plan = cache.plan(lengths, n)
        return self.run(tokens, cache, plan, last_only)  # run -> cache.advance moves both counters

    def run(self, tokens: torch.Tensor, cache: "StreamingCache", plan: "StepPlan", last_only: bool) -> torch.Tensor:
        """The forward of :meth:`forward` over a ready plan; touches only device state (a decode
        step with :meth:`StreamingCache.decode_plan` can be captured in a CUDA graph)."""
        packed = plan.packed
        x = self.embed_tokens(tokens if packed is None else tokens.reshape(-1).index_select(0, packed))
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, plan)
        cache.advance(plan)
        head = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        n = tokens.shape[1]
        if packed is not None and last_only:  # each row's last valid row (a row with none: any)
            last = (plan.lengths.cumsum(0) - 1).clamp(min=0)
            return F.linear(self.norm(x.index_select(0, last)), head).float()
        if packed is not None:
            x = plan.unpack(x)
        if last_only:
            x = x[:, 0] if n == 1 else x[torch.arange(x.shape[0], device=x.device), (plan.lengths - 1).clamp(min=0)]
            return F.linear(self.norm(x), head).float()
        logits = F.linear(self.norm(x), head).float()
        if not plan.decode:
            valid = torch.arange(n, device=x.device).view(1, -1, 1) < plan.lengths.view(-1, 1, 1)
            logits.masked_fill_(~valid, 0.0)
        return logits


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UserError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device from a name (``auto`` = CUDA when available); UserError for a bad name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None


def check_device_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, with advice, where the device cannot run the dtype."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU cannot run bfloat16; use --dtype float16")
    elif device.type == "cpu":
        try:
            a = torch.ones(2, 2, dtype=dtype)
            (a @ a).sum().item()
        except RuntimeError:
            raise UserError(f"this CPU build of torch cannot run {dtype} matrix products; use --dtype float32") from None
    else:
        raise UserError(f"device {device} is not supported; use cpu or cuda")

