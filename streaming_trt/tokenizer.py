"""Tokenizers: a checkpoint's own (through transformers) or the built-in one that needs no download.

The runtime uses only ``encode``, ``decode``, ``apply_chat_template`` and ``eos_token_id``.
"""
from __future__ import annotations

from pathlib import Path

from .contract import CheckpointError


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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for s, sid in self._special_ids.items():
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


def load_tokenizer(path: str | Path | None):
    """The tokenizer of checkpoint directory ``path`` (via transformers), of a ``.gguf`` file (built by
    transformers from its metadata, chat template included, and cached), of ``builtin:smollm2``, or
    the random model's character tokenizer for ``None`` / ``builtin:random``."""
    if path is None or str(path) == "builtin:random":
        return BuiltinTokenizer()
    if not isinstance(path, (str, Path)):
        raise CheckpointError(f"the tokenizer path must be a str or Path (or None), got {type(path).__name__}")
    if str(path) == "builtin:smollm2":
        from .builtin import INSTALL_HINT, smollm2_path

        path = smollm2_path()
        if path is None:
            raise CheckpointError(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    from .gguf import is_gguf, load_gguf_tokenizer

    if is_gguf(path):
        return load_gguf_tokenizer(path)
    folder = Path(path)
    if not folder.is_dir():  # else transformers takes it for a hub name and talks about repo ids
        raise CheckpointError(f"{path}: {'not a directory' if folder.exists() else 'no such directory'}; "
                              "pass the checkpoint directory that holds the tokenizer files")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any((folder / name).is_file() for name in known):
        raise CheckpointError(f"{path}: no tokenizer files ({', '.join(known)}); copy the checkpoint's "
                              "tokenizer files into this directory")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {e})") from None


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without re-decoding the whole output.

    Keeps only a few recent ids, so memory stays constant however long the stream; text is
    held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, context: int = 4):
        self.tokenizer, self.context = tokenizer, context
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        if len(self.ids) > self.context:
            keep = self.ids[-self.context :]
            self.ids, self.emitted = keep, len(self.tokenizer.decode(keep))
        else:
            self.emitted = len(text)
        return piece
