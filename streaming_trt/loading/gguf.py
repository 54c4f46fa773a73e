"""llama.cpp GGUF checkpoints: read with the ``gguf`` package, dequantize, map to Hugging Face names.

``load_gguf(path)`` returns ``(ModelConfig, {hf_name: float32 tensor})``, the same shape of result
as :func:`streaming_trt.loading.checkpoint.load_checkpoint`. What it does:

- reads the file with ``gguf.GGUFReader`` and dequantizes each tensor with ``gguf.quants.dequantize``
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; others are refused);
- maps llama.cpp's tensor names (``blk.N.attn_q.weight``, ...) back to Hugging Face names and undoes
  the row permutation llama.cpp's converter applies to Llama's q/k projections (HF stores each
  head's rotary halves as ``[first half; second half]``, llama.cpp interleaves them);
- builds the config from the ``llama.*`` metadata (tied embeddings when there is no ``output.weight``);
- caches the dequantized tensors as one safetensors file (and the tokenizer transformers builds from
  the file) under ``$STREAMING_TRT_CACHE`` or ``~/.cache/streaming-trt``, keyed by the SHA-256 of the
  file's bytes, so a second load skips parsing and dequantization.

A corrupt, truncated or unsupported file (architecture, quantization type, rope variant) raises
:class:`~streaming_trt.contract.CheckpointError` / :class:`~streaming_trt.contract.UnsupportedModelError`.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..runtime.model import check_state_dict
from ..runtime.config import ModelConfig
from ..contract import CheckpointError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
CACHE_FORMAT = 1  # bump when the cached layout changes

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_IGNORED = ("rope_freqs.weight",)  # handled (refused) in the config


def is_gguf(path) -> bool:
    """True when ``path`` names a file ending in ``.gguf``."""
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    """Where dequantized checkpoints are kept: ``$STREAMING_TRT_CACHE`` or ``~/.cache/streaming-trt``."""
    env = os.environ.get("STREAMING_TRT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streaming-trt"


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the file's bytes: the cache key, so a renamed copy hits the cache too."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: ``w`` ``[heads * head_dim, ...]`` with each head's rows
    interleaved (pairs ``2i, 2i+1``) back to Hugging Face's ``[first halves; second halves]``."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# GGUF value types (gguf.GGUFValueType): byte size of each fixed-size one; 8 is STRING, 9 ARRAY.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def check_header(path: Path) -> None:
    """Walk the header (metadata and tensor infos) with every count and length bounded by the bytes
    left in the file, before ``GGUFReader`` parses it: the reader loops once per array element a
    header declares, so a crafted count (2**63) would never end."""
    def bad(why: str):
        raise CheckpointError(f"{path}: not a readable GGUF file ({why})")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            bad(f"{size} bytes, shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                bad("no GGUF magic at its start")
            endian = "<" if struct.unpack_from("<I", m, 4)[0] & 0xFFFF else ">"
            pos = 8

            def take(fmt: str, what: str):
                nonlocal pos
                n = struct.calcsize(fmt)
                if pos + n > size:
                    bad(f"{what} at byte {pos} runs past the end of the file ({size} bytes)")
                value = struct.unpack_from(endian + fmt, m, pos)[0]
                pos += n
                return value

            def skip(n: int, what: str):
                nonlocal pos
                if n > size - pos:
                    bad(f"{what} at byte {pos} declares {n} bytes, more than the {size - pos} left in the file")
                pos += n

            def value(kind: int, what: str, depth: int = 0):
                if kind in _SCALAR_SIZES:
                    skip(_SCALAR_SIZES[kind], what)
                elif kind == _STRING:
                    skip(take("Q", what), what)
                elif kind == _ARRAY and depth == 0:
                    item, count = take("I", what), take("Q", what)
                    least = _SCALAR_SIZES.get(item, 8)  # a string is at least its 8-byte length
                    if count > (size - pos) // least:
                        bad(f"{what}: an array of {count} elements cannot fit in the {size - pos} bytes left")
                    if item in _SCALAR_SIZES:
                        skip(count * least, what)
                    else:
                        for _ in range(count):
                            value(item, what, depth + 1)
                elif kind == _ARRAY:
                    bad(f"{what} is an array of arrays, which GGUF readers do not support")
                else:
                    bad(f"{what} has value type {kind}, which GGUF does not define")

            tensors, fields = take("Q", "the tensor count"), take("Q", "the metadata count")
            if fields > (size - pos) // 12 or tensors > (size - pos) // 24:
                bad(f"it declares {fields} metadata fields and {tensors} tensors, more than its {size} bytes hold")
            for i in range(fields):
                key_len = take("Q", f"metadata field {i}")
                skip(key_len, f"metadata field {i}'s key")
                value(take("I", f"metadata field {i}"), f"metadata field {i}")
            for i in range(tensors):
                skip(take("Q", f"tensor {i}'s name"), f"tensor {i}'s name")
                dims = take("I", f"tensor {i}'s dimension count")
                if dims > 8:
                    bad(f"tensor {i} has {dims} dimensions")
                skip(8 * dims + 4 + 8, f"tensor {i}'s shape, type and offset")


def _reader(path: Path):
    check_header(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # GGUFReader raises ValueError, struct errors, IndexError on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise CheckpointError(f"{reader.path}: metadata {key!r} cannot be read ({e})") from None


def config_from_metadata(reader, source: str) -> ModelConfig:
    """A :class:`ModelConfig` from the file's ``general.*`` / ``<arch>.*`` / ``tokenizer.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise CheckpointError(f"{source}: GGUF metadata {arch}.{key} is missing")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{source}: partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(f"{source}: rope_freqs (Llama 3.1-style rope scaling baked into the GGUF) "
                                    "is not supported; use the Hugging Face checkpoint directory instead")
    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise UnsupportedModelError(f"{source}: rope scaling {kind!r} is not supported (only linear)")
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)]
    return ModelConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
    )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name (None for tensors the runtime ignores)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def read_gguf(path: str | Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """Parse and dequantize a GGUF file, without the cache.

    Returns the config, float32 CPU tensors by Hugging Face name (Hugging Face shapes,
    ``[out_features, in_features]`` for projections), and the open ``GGUFReader``.
    """
    path = Path(path)
    source = str(path)
    reader = _reader(path)
    config = config_from_metadata(reader, source)
    tensors: dict[str, torch.Tensor] = {}
    items = reader.tensors
    items = tqdm(items, desc=f"dequantizing {path.name}", unit="tensor", disable=not progress, file=sys.stderr,
                 leave=False)
    for t in items:
        name = hf_name(t.name)
        if name is None:
            if t.name in _IGNORED:
                continue
            raise CheckpointError(f"{source}: unexpected tensor {t.name!r} for a llama GGUF")
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedModelError(f"{source}: tensor {t.name!r} uses quantization {qtype.name}, which is not "
                                        f"supported; supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            data = np.asarray(dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
        except Exception as e:  # truncated data, block size mismatch
            raise CheckpointError(f"{source}: tensor {t.name!r} cannot be dequantized as {qtype.name} "
                                  f"with shape {list(shape)} ({type(e).__name__}: {e})") from None
        w = torch.from_numpy(data.copy())
        if not torch.isfinite(w).all():
            raise CheckpointError(f"{source}: tensor {t.name!r} holds NaN or infinite values (corrupt file?)")
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rows(w, config.num_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_rows(w, config.num_kv_heads)
        tensors[name] = w.contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    check_state_dict(config, tensors, source)
    return config, tensors, reader


def _cache_dir(path: Path) -> Path:
    return cache_root() / "gguf" / f"{file_digest(path)}-v{CACHE_FORMAT}"


def _atomic_dir(final: Path, fill) -> None:
    """Create ``final`` by filling a temporary sibling and renaming it (concurrent loads are safe)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        fill(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(path: str | Path, use_cache: bool = True, progress: bool = True
              ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 tensors (Hugging Face names) of a GGUF file, through the dequantization cache.

    The first load parses and dequantizes the file and writes ``model.safetensors`` + ``config.json``
    into ``cache_root()/gguf/<sha256>-v1/``; later loads of the same bytes read only those.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a .gguf file or a Hugging Face checkpoint directory")
    if not use_cache:
        config, tensors, _ = read_gguf(path, progress)
        return config, tensors
    cdir = _cache_dir(path)
    weights, cfg_file = cdir / "model.safetensors", cdir / "config.json"
    if weights.is_file() and cfg_file.is_file():
        try:
            return ModelConfig(**json.loads(cfg_file.read_text())), load_file(str(weights))
        except Exception:  # a damaged cache entry: rebuild it
            shutil.rmtree(cdir, ignore_errors=True)
    config, tensors, _ = read_gguf(path, progress)

    def fill(tmp: Path):
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"source": path.name})
        (tmp / "config.json").write_text(json.dumps(config.__dict__))

    try:
        _atomic_dir(cdir, fill)
    except OSError as e:  # read-only home and the like: the model still loads
        print(f"[streaming-trt] warning: cannot write the GGUF cache under {cdir.parent} ({e}); "
              "set STREAMING_TRT_CACHE to a writable directory", file=sys.stderr)
    return config, tensors


def load_gguf_tokenizer(path: str | Path, use_cache: bool = True):
    """The tokenizer (with its chat template) transformers builds from the file's ``tokenizer.*``
    metadata, saved next to the cached weights so later loads skip the GGUF parse."""
    from transformers import AutoTokenizer  # heavy (seconds): only GGUF tokenizers need it

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    tdir = _cache_dir(path) / "tokenizer" if use_cache else None
    if tdir is not None and (tdir / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(tdir))
        except Exception:
            shutil.rmtree(tdir, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for a GGUF without a usable vocabulary
        raise CheckpointError(f"{path}: no usable tokenizer in the GGUF metadata ({type(e).__name__}: {e})") from None
    if tdir is not None:
        try:
            _atomic_dir(tdir, lambda tmp: tok.save_pretrained(str(tmp)))
        except OSError:
            pass
    return tok
