"""Tiny Hugging Face checkpoints with random weights, written by transformers itself.

Every architecture the runtime supports has an entry; tests load them both with transformers (the
independent reference) and with streaming_trt.
"""
from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def hf_config(arch: str, **overrides):
    import transformers as tf

    kw = dict(BASE)
    if arch == "llama":
        cls = tf.LlamaConfig
    elif arch == "llama3":
        cls = tf.LlamaConfig
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        kw["rope_theta"] = 500000.0
        kw["tie_word_embeddings"] = True
    elif arch == "mistral":
        cls = tf.MistralConfig
        kw["sliding_window"] = None
    elif arch == "qwen2":
        cls = tf.Qwen2Config
        kw["tie_word_embeddings"] = True
    elif arch == "qwen3":
        cls = tf.Qwen3Config
        kw["head_dim"] = 32
    else:
        raise ValueError(arch)
    kw.update(overrides)
    return cls(**kw)


def make_checkpoint(path: Path, arch: str = "llama", seed: int = 0, max_shard_size=None, **overrides):
    """Write a random-weight checkpoint of ``arch`` to ``path``; return the transformers model."""
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init so that logits differ clearly
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tokenizer(path: Path, vocab_size: int = 97):
    """A character-level fast tokenizer with a chat template, saved the way real checkpoints ship it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate((specials + chars)[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def streaming_hf():
    """``streaming_trt.hf``, or a skip naming the transformers found when it lies outside the range the
    package was checked against (or lacks its hooks): drift shows as a skip with its reason, not as a
    collection error."""
    import pytest

    pytest.importorskip("transformers")
    from streaming_trt.contract import UserError

    try:
        import streaming_trt.hf as sthf
    except UserError as e:
        pytest.skip(str(e), allow_module_level=True)
    return sthf


def tiny_chat_model(folder: Path, seed: int = 3, vocab_size: int = 97):
    """A tiny random Llama and its chat tokenizer written to ``folder``, loaded: ``(model, tokenizer)``."""
    import streaming_trt as st

    make_checkpoint(folder, "llama", seed=seed, vocab_size=vocab_size)
    save_tokenizer(folder, vocab_size=vocab_size)
    return st.load_model(folder), st.load_tokenizer(folder)
