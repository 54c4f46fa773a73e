"""Model configuration, parsed from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..contract import CheckpointError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SINK_LOGITS = ("zero", "learned")  # config.json "sink_logits": softmax-off-by-one, or gpt-oss per-head logits


def read_json_object(file: Path, needs: str) -> dict[str, Any]:
    """A JSON object from ``file``; CheckpointError naming the file (and ``needs`` when absent)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not found; {needs}")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return d


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections (always on for qwen2)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before rotation
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Models pre-trained with a sink (semantics.md): the dedicated token the runtime puts at position 0
    # of every stream, and the extra softmax term ("zero": exp(0); "learned": self_attn.sinks [heads]).
    sink_token_id: int | None = None
    sink_logits: str | None = None

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            head_dim = d.get("head_dim") or hidden // heads
            bias = bool(d.get("attention_bias", False))
            cfg = cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bias or model_type == "qwen2",
                o_proj_bias=bias and model_type in ("llama", "qwen3"),
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                sink_token_id=None if d.get("sink_token_id") is None else int(d["sink_token_id"]),
                sink_logits=d.get("sink_logits"),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: a field has the wrong type ({e})") from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads ({cfg.num_heads}) must be a multiple of num_key_value_heads ({cfg.num_kv_heads})"
            )
        if cfg.sink_logits not in (None, *SINK_LOGITS):
            raise CheckpointError(f"{source}: sink_logits {cfg.sink_logits!r} is not one of {', '.join(SINK_LOGITS)} (or null)")
        if cfg.sink_token_id is not None and not 0 <= cfg.sink_token_id < cfg.vocab_size:
            raise CheckpointError(f"{source}: sink_token_id {cfg.sink_token_id} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        return cls.from_hf_dict(read_json_object(file, "a model directory needs config.json and *.safetensors"),
                                source=str(file))

    def to_hf_dict(self) -> dict[str, Any]:
        rope = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias if self.model_type != "qwen2" else True,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            # only when set, so the digests of other models' configs (saved sessions) do not change
            **({"sink_token_id": self.sink_token_id} if self.sink_token_id is not None else {}),
            **({"sink_logits": self.sink_logits} if self.sink_logits is not None else {}),
        }

    def fingerprint(self) -> str:
        """A short string identifying the shapes a saved session must match."""
        return (
            f"{self.model_type}:L{self.num_layers}:H{self.num_heads}:KV{self.num_kv_heads}:"
            f"D{self.head_dim}:V{self.vocab_size}:E{self.hidden_size}"
        )
