"""Hugging Face Llama-family tensors <-> TensorRT-LLM checkpoints, with torch and safetensors only.

A TensorRT-LLM checkpoint is a directory with ``config.json`` and one ``rank{r}.safetensors`` per
rank, ``r = pp_rank * tp_size + tp_rank``. The rules implemented here (those of TensorRT-LLM's own
``LLaMAForCausalLM`` conversion):

- Pipeline parallelism: stage ``p`` holds layers ``p * L/pp .. (p+1) * L/pp - 1``, renumbered from 0
  (``transformer.layers.0`` is the stage's first layer). The embedding lives on the first stage,
  ``ln_f`` and ``lm_head`` on the last.
- Tensor parallelism: every rank holds its ``num_heads / tp`` query heads and its share of the KV
  heads, fused as ``concat(q, k, v)`` in ``attention.qkv``. When there are fewer KV heads than
  ranks, each KV head is repeated ``tp / num_kv_heads`` times first, so rank ``r`` gets KV head
  ``r // (tp / num_kv_heads)``: the one its query heads use.
- Column-parallel weights (qkv, mlp.fc, mlp.gate, lm_head) split on dim 0, row-parallel ones
  (attention.dense, mlp.proj) on dim 1; norms and the dense bias are whole on every rank.
- ``mlp.fc`` is Hugging Face's ``gate_proj`` (the branch that goes through SiLU) and ``mlp.gate``
  is ``up_proj``: the names are swapped, not the maths.
- ``lm_head`` rows are zero-padded to a multiple of ``tp`` (the vocab embedding is not padded:
  it is not split, ``use_parallel_embedding`` is false). A tied ``lm_head`` is written out too.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from streaming_trt.runtime.config import ModelConfig, read_json_object
from streaming_trt.contract import CheckpointError, UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ARCHITECTURE = "LlamaForCausalLM"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Tensor- and pipeline-parallel sizes; rank ``r = pp_rank * tp + tp_rank``."""

    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """``(tp_rank, pp_rank)`` of a rank."""
        return rank % self.tp, rank // self.tp

    def stage_layers(self, pp_rank: int, num_layers: int) -> range:
        """Global indices of the layers pipeline stage ``pp_rank`` holds."""
        per = num_layers // self.pp
        return range(pp_rank * per, (pp_rank + 1) * per)


def check_mapping(config: ModelConfig, mapping: Mapping) -> None:
    """Raise UserError unless ``mapping`` splits this model the way TensorRT-LLM can."""
    tp, pp = mapping.tp, mapping.pp
    if tp < 1 or pp < 1:
        raise UserError(f"--tp and --pp must be >= 1, got tp={tp}, pp={pp}")
    if config.num_heads % tp:
        raise UserError(f"--tp {tp} does not divide the model's {config.num_heads} attention heads")
    kv = config.num_kv_heads
    if kv >= tp and kv % tp:
        raise UserError(f"--tp {tp} does not divide the model's {kv} key/value heads")
    if kv < tp and tp % kv:
        raise UserError(
            f"--tp {tp} is not a multiple of the model's {kv} key/value heads, so they cannot be duplicated evenly"
        )
    if config.intermediate_size % tp:
        raise UserError(f"--tp {tp} does not divide the MLP width intermediate_size={config.intermediate_size}")
    if config.num_layers % pp:
        raise UserError(f"--pp {pp} does not divide the model's {config.num_layers} layers")


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def kv_heads_per_rank(config: ModelConfig, tp: int) -> int:
    return max(1, config.num_kv_heads // tp)


def _split(x: torch.Tensor, parts: int, index: int, dim: int = 0) -> torch.Tensor:
    return torch.chunk(x, parts, dim=dim)[index]


def _dup_kv(x: torch.Tensor, config: ModelConfig, tp: int) -> torch.Tensor:
    """Repeat each KV head ``tp / num_kv_heads`` times (rows of ``x`` are heads * head_dim)."""
    kv = config.num_kv_heads
    if kv >= tp:
        return x
    heads = x.reshape(kv, config.head_dim, *x.shape[1:])
    return heads.repeat_interleave(tp // kv, dim=0).reshape(tp * config.head_dim, *x.shape[1:])


def rank_tensors(
    config: ModelConfig, hf: dict[str, torch.Tensor], mapping: Mapping, rank: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of one rank, TensorRT-LLM names, from a Hugging Face state dict.

    ``hf`` uses Hugging Face names (``model.layers.0.self_attn.q_proj.weight`` ...). A model with
    q/k/v biases but no o_proj bias (Qwen2) gets a zero ``attention.dense.bias``: TensorRT-LLM's
    Llama puts a bias on both or neither.
    """
    tp_rank, pp_rank = mapping.coords(rank)
    tp = mapping.tp
    c = config
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(dtype).clone().contiguous()  # clone: no two saved tensors may share storage

    layers = mapping.stage_layers(pp_rank, c.num_layers)
    for local, g in enumerate(layers):
        src, dst = f"model.layers.{g}.", f"transformer.layers.{local}."
        a = src + "self_attn."
        qkv = [_split(hf[a + "q_proj.weight"], tp, tp_rank)]
        qkv += [_split(_dup_kv(hf[a + f"{n}_proj.weight"], c, tp), tp, tp_rank) for n in "kv"]
        put(dst + "attention.qkv.weight", torch.cat(qkv, dim=0))
        if c.attention_bias:
            b = [_split(hf[a + "q_proj.bias"], tp, tp_rank)]
            b += [_split(_dup_kv(hf[a + f"{n}_proj.bias"], c, tp), tp, tp_rank) for n in "kv"]
            put(dst + "attention.qkv.bias", torch.cat(b, dim=0))
            dense_bias = hf.get(a + "o_proj.bias")
            put(dst + "attention.dense.bias", torch.zeros(c.hidden_size) if dense_bias is None else dense_bias)
        put(dst + "attention.dense.weight", _split(hf[a + "o_proj.weight"], tp, tp_rank, dim=1))
        put(dst + "mlp.fc.weight", _split(hf[src + "mlp.gate_proj.weight"], tp, tp_rank))
        put(dst + "mlp.gate.weight", _split(hf[src + "mlp.up_proj.weight"], tp, tp_rank))
        put(dst + "mlp.proj.weight", _split(hf[src + "mlp.down_proj.weight"], tp, tp_rank, dim=1))
        put(dst + "input_layernorm.weight", hf[src + "input_layernorm.weight"])
        put(dst + "post_layernorm.weight", hf[src + "post_attention_layernorm.weight"])
    if pp_rank == 0:
        put("transformer.vocab_embedding.weight", hf["model.embed_tokens.weight"])
    if pp_rank == mapping.pp - 1:
        head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
        pad = padded_vocab(c.vocab_size, tp) - c.vocab_size
        if pad:
            head = torch.cat([head, head.new_zeros(pad, head.shape[1])], dim=0)
        put("lm_head.weight", _split(head, tp, tp_rank))
        put("transformer.ln_f.weight", hf["model.norm.weight"])
    return out


def expected_rank_shapes(config: ModelConfig, mapping: Mapping, rank: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of one rank with its shape, derived from the rules above (used to verify)."""
    c, tp = config, mapping.tp
    tp_rank, pp_rank = mapping.coords(rank)
    d, hidden = c.head_dim, c.hidden_size
    qkv_rows = (c.num_heads // tp + 2 * kv_heads_per_rank(c, tp)) * d
    shapes: dict[str, tuple[int, ...]] = {}
    for local in range(c.num_layers // mapping.pp):
        p = f"transformer.layers.{local}."
        shapes.update({
            p + "attention.qkv.weight": (qkv_rows, hidden),
            p + "attention.dense.weight": (hidden, c.num_heads // tp * d),
            p + "mlp.fc.weight": (c.intermediate_size // tp, hidden),
            p + "mlp.gate.weight": (c.intermediate_size // tp, hidden),
            p + "mlp.proj.weight": (hidden, c.intermediate_size // tp),
            p + "input_layernorm.weight": (hidden,),
            p + "post_layernorm.weight": (hidden,),
        })
        if c.attention_bias:
            shapes[p + "attention.qkv.bias"] = (qkv_rows,)
            shapes[p + "attention.dense.bias"] = (hidden,)
    if pp_rank == 0:
        shapes["transformer.vocab_embedding.weight"] = (c.vocab_size, hidden)
    if pp_rank == mapping.pp - 1:
        shapes["lm_head.weight"] = (padded_vocab(c.vocab_size, tp) // tp, hidden)
        shapes["transformer.ln_f.weight"] = (hidden,)
    return shapes


def rotary_scaling_for_trtllm(config: ModelConfig) -> dict | None:
    """TensorRT-LLM's ``rotary_scaling``: the Hugging Face dict with both ``type`` and ``rope_type``."""
    if not config.rope_scaling:
        return None
    scaling = dict(config.rope_scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"type": kind, "rope_type": kind, **scaling}


def trtllm_config(config: ModelConfig, mapping: Mapping, dtype: str, source: dict | None = None) -> dict:
    """The checkpoint's ``config.json`` (TensorRT-LLM ``PretrainedConfig`` / ``LLaMAConfig`` fields)."""
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_size": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta,
        "rotary_scaling": rotary_scaling_for_trtllm(config),
        "attn_bias": config.attention_bias,
        "mlp_bias": False,
        "residual_mlp": False,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp, "pp_size": mapping.pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        # a model pre-trained with a sink token: whoever starts a stream puts this token first, once
        "streaming_trt": dict(source or {}, **({"sink_token_id": config.sink_token_id}
                                               if config.sink_token_id is not None else {})),
    }


def write_trtllm_checkpoint(
    config: ModelConfig,
    hf: dict[str, torch.Tensor],
    out_dir: str | Path,
    mapping: Mapping,
    dtype: str,
    source: dict | None = None,
    progress: Callable[[Iterator[int], int], Iterator[int]] | None = None,
) -> Path:
    """Write ``config.json`` and every ``rank{r}.safetensors`` into the existing directory ``out_dir``."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    check_mapping(config, mapping)
    if config.mlp_bias:
        raise UserError("MLP biases are not part of TensorRT-LLM's Llama checkpoint format; cannot export")
    if config.qk_norm:
        raise UserError("q/k RMSNorm (Qwen3) is not part of TensorRT-LLM's Llama checkpoint format; cannot export")
    if config.sink_logits:
        raise UserError(f"sink_logits {config.sink_logits!r} (an extra softmax term) is not part of TensorRT-LLM's "
                        "Llama attention; cannot export")
    out_dir = Path(out_dir)
    ranks = range(mapping.world_size)
    for rank in (progress(iter(ranks), len(ranks)) if progress else ranks):
        tensors = rank_tensors(config, hf, mapping, rank, DTYPES[dtype])
        save_file(tensors, str(out_dir / f"rank{rank}.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(trtllm_config(config, mapping, dtype, source), indent=2) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading a TensorRT-LLM checkpoint back (any tp/pp), merged into Hugging Face names.


def _require(d: dict, key: str, source: str):
    if key not in d:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return d[key]


def _optional_int(x) -> int | None:
    return None if x is None else int(x)


def model_config_from_trtllm(d: dict, source: str = "config.json") -> tuple[ModelConfig, Mapping]:
    """The runtime's ModelConfig (``model_type`` llama) and the mapping of a TensorRT-LLM config.json."""
    arch = _require(d, "architecture", source)
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported; only {ARCHITECTURE}")
    if d.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise CheckpointError(
            f"{source}: position_embedding_type {d['position_embedding_type']!r} is not rope_gpt_neox")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {d['hidden_act']!r} is not silu")
    quant = d.get("quantization") or {}
    if quant.get("quant_algo") or quant.get("kv_cache_quant_algo"):
        raise CheckpointError(f"{source}: quantized checkpoints are not supported ({quant})")
    if d.get("mlp_bias") or d.get("residual_mlp") or (d.get("moe") or {}).get("num_experts"):
        raise CheckpointError(f"{source}: MLP biases, residual MLPs and MoE are not supported")
    m = d.get("mapping") or {}
    mapping = Mapping(tp=int(m.get("tp_size", 1)), pp=int(m.get("pp_size", 1)))
    if int(m.get("world_size", mapping.world_size)) != mapping.world_size:
        raise CheckpointError(f"{source}: mapping.world_size is not tp_size * pp_size ({m})")
    scaling = d.get("rotary_scaling")
    if scaling:
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", "default")
        scaling.pop("type", None)
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    try:
        heads, hidden = int(_require(d, "num_attention_heads", source)), int(_require(d, "hidden_size", source))
        attn_bias = bool(d.get("attn_bias", False))
        config = ModelConfig(
            model_type="llama",
            vocab_size=int(_require(d, "vocab_size", source)),
            hidden_size=hidden,
            intermediate_size=int(_require(d, "intermediate_size", source)),
            num_layers=int(_require(d, "num_hidden_layers", source)),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_size") or hidden // heads),
            rms_norm_eps=float(d.get("norm_epsilon", 1e-6)),
            rope_theta=float(d.get("rotary_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attn_bias,
            o_proj_bias=attn_bias,
            sink_token_id=_optional_int((d.get("streaming_trt") or {}).get("sink_token_id")),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: a field has the wrong type ({e})") from None
    if config.num_kv_heads < 1 or config.num_heads % config.num_kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads")
    try:
        check_mapping(config, mapping)
    except UserError as e:
        raise CheckpointError(f"{source}: inconsistent mapping: {e}") from None
    return config, mapping


def read_trtllm_checkpoint(path: str | Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """``config.json`` as a dict and the tensors of every rank, checked against the rules."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a TensorRT-LLM checkpoint directory")
    file = path / "config.json"
    d = read_json_object(file, "a TensorRT-LLM checkpoint needs config.json and rank*.safetensors")
    config, mapping = model_config_from_trtllm(d, str(file))
    ranks = []
    for rank in range(mapping.world_size):
        f = path / f"rank{rank}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f}: not found (mapping has world_size {mapping.world_size})")
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot be read as safetensors ({e})") from None
        for name, shape in expected_rank_shapes(config, mapping, rank).items():
            if name not in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} is missing (expected shape {list(shape)})")
            if tuple(tensors[name].shape) != shape:
                raise CheckpointError(
                    f"{f}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        ranks.append(tensors)
    return d, ranks


def merge_trtllm_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Merge every rank of a TensorRT-LLM checkpoint back into one Hugging Face state dict."""
    d, ranks = read_trtllm_checkpoint(path)
    config, mapping = model_config_from_trtllm(d, str(Path(path) / "config.json"))
    c, tp = config, mapping.tp
    reps = tp // c.num_kv_heads if c.num_kv_heads < tp else 1
    q_rows, kv_rows = c.num_heads // tp * c.head_dim, kv_heads_per_rank(c, tp) * c.head_dim
    hf: dict[str, torch.Tensor] = {}
    for pp_rank in range(mapping.pp):
        stage = [ranks[mapping.rank(t, pp_rank)] for t in range(tp)]
        for local, g in enumerate(mapping.stage_layers(pp_rank, c.num_layers)):
            src, dst = f"transformer.layers.{local}.", f"model.layers.{g}."

            def parts(name: str, lo: int, hi: int) -> list[torch.Tensor]:
                return [r[src + name][lo:hi] for r in stage]

            for suffix in ("weight", "bias") if c.attention_bias else ("weight",):
                name = f"attention.qkv.{suffix}"
                hf[dst + f"self_attn.q_proj.{suffix}"] = torch.cat(parts(name, 0, q_rows))
                for i, n in enumerate("kv"):
                    lo = q_rows + i * kv_rows
                    hf[dst + f"self_attn.{n}_proj.{suffix}"] = torch.cat(parts(name, lo, lo + kv_rows)[::reps])
            if c.attention_bias:
                hf[dst + "self_attn.o_proj.bias"] = stage[0][src + "attention.dense.bias"]
            hf[dst + "self_attn.o_proj.weight"] = torch.cat([r[src + "attention.dense.weight"] for r in stage], 1)
            hf[dst + "mlp.gate_proj.weight"] = torch.cat([r[src + "mlp.fc.weight"] for r in stage])
            hf[dst + "mlp.up_proj.weight"] = torch.cat([r[src + "mlp.gate.weight"] for r in stage])
            hf[dst + "mlp.down_proj.weight"] = torch.cat([r[src + "mlp.proj.weight"] for r in stage], 1)
            hf[dst + "input_layernorm.weight"] = stage[0][src + "input_layernorm.weight"]
            hf[dst + "post_attention_layernorm.weight"] = stage[0][src + "post_layernorm.weight"]
    first, last = ranks[mapping.rank(0, 0)], [ranks[mapping.rank(t, mapping.pp - 1)] for t in range(tp)]
    hf["model.embed_tokens.weight"] = first["transformer.vocab_embedding.weight"]
    hf["model.norm.weight"] = last[0]["transformer.ln_f.weight"]
    head = torch.cat([r["lm_head.weight"] for r in last])[: c.vocab_size]
    if c.tie_word_embeddings and not torch.equal(head, hf["model.embed_tokens.weight"]):
        config = dataclasses.replace(config, tie_word_embeddings=False)
    if not config.tie_word_embeddings:
        hf["lm_head.weight"] = head
    return config, hf
