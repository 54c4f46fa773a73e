"""Reading Hugging Face checkpoint directories (config.json + safetensors, sharded or not)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ModelConfig
from .contract import CheckpointError


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


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but not found")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    return files


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read ``config.json`` and every tensor the model needs, with Hugging Face names.

    Returns the config and a dict of CPU tensors in their stored dtype. Tensors the model does not
    use (rotary buffers, a duplicated tied lm_head) are dropped.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face checkpoint directory")
    config = ModelConfig.from_dir(path)
    wanted = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for file in _shard_files(path):
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
        tensors.update({k: v for k, v in loaded.items() if k in wanted})
    check_state_dict(config, tensors, str(path))
    return config, tensors
