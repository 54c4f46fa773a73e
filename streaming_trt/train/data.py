"""Training text, its tokenizer and the stream of training samples.

The text is a UTF-8 file or ``austen:BOOK`` / ``austen:all`` (Jane Austen's novels, found or
fetched by :mod:`.books`). Its last ``heldout`` share (cut at a line break) is never trained on. The tokenizer is a byte-level BPE learnt here from the training
part, with two special tokens: ``<|endoftext|>`` (id 0) and ``<|sink|>`` (id 1, the dedicated sink
token of a sink-token model).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..contract import UserError
from .books import austen_text

SPECIALS = ("<|endoftext|>", "<|sink|>")
EOS_ID, SINK_ID = 0, 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def read_text(spec: str) -> tuple[str, str]:
    """The text named by ``spec`` (a file or ``austen:BOOK``) and a label saying what it is."""
    if spec.startswith("austen:"):
        return austen_text(spec)
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--text {spec}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise UserError(f"--text {spec}: the file is empty")
    return text, str(path)


def split_text(text: str, heldout: float) -> tuple[str, str]:
    """(training part, held-out part): the last ``heldout`` share of the characters, from a line start."""
    if not 0 < heldout < 1:
        raise UserError(f"--heldout must be a fraction between 0 and 1, got {heldout}")
    cut = int(len(text) * (1 - heldout))
    line = text.find("\n", cut)
    cut = line + 1 if 0 <= line < len(text) - 1 else cut
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int, out: Path):
    """Learn a byte-level BPE of ``vocab_size`` ids from ``text`` and save it in ``out`` the way
    checkpoints ship one (tokenizer.json + tokenizer_config.json); returns the transformers tokenizer."""
    if vocab_size < 256 + len(SPECIALS) + 1:
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIALS) + 1} (256 bytes, the special tokens and one merge)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator((("".join(lines[i:i + 256])) for i in range(0, len(lines), 256)), trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [EOS_ID, SINK_ID]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], additional_special_tokens=[SPECIALS[1]])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def load_tokenizer(folder: Path):
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def encode(tokenizer, text: str) -> torch.Tensor:
    """int64 ``[n]`` ids of ``text``, encoded a block of lines at a time (BPE never merges across
    the byte-level pre-tokenizer's word boundaries, so this equals encoding it whole)."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for i in range(0, len(lines), 2048):
        ids.extend(tokenizer("".join(lines[i:i + 2048]), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


class Samples:
    """Training samples ``[batch, context + 1]``: windows of ``ids`` at offsets drawn by a seeded
    generator; with ``sink_id`` each window is that token followed by ``context`` text tokens.

    Every rank of a DDP job draws the same ``world * batch`` offsets and keeps its own share, so
    one generator state (:meth:`state_dict`) is the data position of the whole job.
    """

    def __init__(self, ids: torch.Tensor, context: int, batch: int, seed: int, sink_id: int | None = None,
                 rank: int = 0, world: int = 1):
        self.ids, self.context, self.batch, self.sink_id = ids, context, batch, sink_id
        self.rank, self.world = rank, world
        self.text_len = context if sink_id is not None else context + 1
        if ids.numel() < self.text_len + 1:
            raise UserError(f"the training text has {ids.numel()} tokens, fewer than one sample needs "
                            f"({self.text_len + 1}); use a longer text or a smaller --context")
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = 0  # batches drawn so far

    def next(self) -> torch.Tensor:
        offsets = torch.randint(0, self.ids.numel() - self.text_len + 1, (self.world * self.batch,), generator=self.gen)
        offsets = offsets[self.rank * self.batch:(self.rank + 1) * self.batch]
        self.drawn += 1
        return window(self.ids, offsets, self.text_len, self.sink_id)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def window(ids: torch.Tensor, offsets: torch.Tensor, length: int, sink_id: int | None) -> torch.Tensor:
    """``[len(offsets), length (+1 with a sink)]`` windows of ``ids``, the sink token first if given."""
    rows = ids[offsets.view(-1, 1) + torch.arange(length).view(1, -1)]
    if sink_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), sink_id, dtype=rows.dtype), rows], 1)


def fixed_windows(ids: torch.Tensor, count: int, context: int, sink_id: int | None) -> torch.Tensor:
    """``count`` evenly spaced samples of held-out ``ids`` (the same at every measurement)."""
    length = context if sink_id is not None else context + 1
    if ids.numel() < length:
        raise UserError(f"the held-out text has {ids.numel()} tokens, fewer than one sample ({length}); raise --heldout")
    offsets = torch.linspace(0, ids.numel() - length, count).long()
    return window(ids, offsets, length, sink_id)
