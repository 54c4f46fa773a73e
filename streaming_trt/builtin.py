"""A built-in small Llama with seeded random weights, so every command runs on a fresh machine.

Its output is random text: it exists to exercise the runtime, not to be read.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .tokenizer import BuiltinTokenizer

NOTICE = (
    "[streaming-trt] no --model given: using the built-in small Llama with RANDOM weights "
    "(seed {seed}); its text is gibberish. Pass --model DIR for a real checkpoint."
)


def builtin_config() -> ModelConfig:
    tok = BuiltinTokenizer()
    return ModelConfig(
        model_type="llama",
        vocab_size=tok.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def builtin_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Seeded random weights for ``config``: norm weights one, the embedding std 1, other tensors
    std ``fan_in ** -0.5``.

    By default float32 on the CPU (the built-in model's weights). With ``dtype`` / ``device`` they
    are drawn there directly, from a generator on that device (a 7B shape never passes through host
    memory); the values then depend on the device.
    """
    from .checkpoint import expected_shapes

    dtype = torch.float32 if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = 1.0 if "embed" in name else fan_in**-0.5
            tensors[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)
    return tensors


def builtin_model(dtype="float32", device="cpu", backend="auto", seed: int = 0):
    from .model import Transformer

    config = builtin_config()
    return Transformer.from_state_dict(config, builtin_state_dict(config, seed), dtype=dtype, device=device,
                                       backend=backend, source="built-in model")
