"""The eager runtime against transformers and the streaming contract."""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
from checkpoints import ARCHITECTURES, make_checkpoint
from oracles import close, recompute, stream_with_hf_layers

NAN = float("nan")

# (architecture, config overrides): every architecture, GQA and MHA, head_dim 64 and 128.
SHAPES = [(arch, {}) for arch in ARCHITECTURES] + [
    ("llama", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)),
    ("qwen2", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)),
    ("mistral", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=128)),
    ("qwen3", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=128)),
    ("llama3", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=128)),
]


def _id(shape):
    arch, kw = shape
    return arch + "".join(f"-{k[:8]}{v}" for k, v in kw.items() if k != "hidden_size")


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_dense_window_matches_transformers(checkpoints, shape):
    """A window longer than the text is plain causal attention: logits equal transformers' own."""
    arch, kw = shape
    path, hf = checkpoints(arch, **kw)
    model = st.load_model(path, backend="torch")
    ids = torch.randint(0, 97, (2, 40))
    session = model.session(sink_tokens=4, window=60, batch=2, cache_fill=NAN)
    close(session.feed(ids), hf(ids).logits, 1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
def test_single_layer_equals_recomputation_oracle(checkpoints, arch, sink_tokens):
    """The contract's oracle, exactly: transformers re-run on A(t) at positions 0..|A(t)|-1."""
    window = 5
    path, hf = checkpoints(arch, num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    n = 3 * (sink_tokens + window) + 4
    ids = torch.randint(0, 97, (n,))
    session = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN)
    got = torch.cat([session.feed(ids[i : i + 4].tolist()) for i in range(0, n, 4)], dim=1)[0]
    close(got, recompute(hf, ids, sink_tokens, window), 1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama3"])
@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
def test_deep_model_equals_streaming_oracle(checkpoints, arch, sink_tokens):
    """Three layers, streams three times the capacity, against a naive token-by-token streaming
    cache built from transformers' own modules; and, as a sanity check of the oracles, the
    re-computation baseline differs once tokens are evicted."""
    window = 6
    path, hf = checkpoints(arch, num_hidden_layers=3)
    model = st.load_model(path, backend="torch")
    n = 3 * (sink_tokens + window) + 2
    ids = torch.randint(0, 97, (n,))
    got = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN).feed(ids.tolist())[0]
    close(got, stream_with_hf_layers(hf, ids, sink_tokens, window), 1e-5)
    capacity = sink_tokens + window
    close(got[:capacity], recompute(hf, ids[:capacity], sink_tokens, window), 1e-5)
    assert (got[-1] - recompute(hf, ids, sink_tokens, window)[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("sink_tokens,window", [(0, 3), (1, 4), (4, 6)])
def test_chunking_and_batching_change_nothing(checkpoints, sink_tokens, window):
    path, _ = checkpoints("qwen3")
    model = st.load_model(path, backend="torch")
    n = 5 * (sink_tokens + window) + 3
    ids = torch.randint(0, 97, (n,))

    def fed(chunk):
        s = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN)
        return torch.cat([s.feed(ids[i : i + chunk].tolist()) for i in range(0, n, chunk)], dim=1)[0]

    one_by_one = fed(1)
    for chunk in (7, window + 5, n):
        close(fed(chunk), one_by_one, 1e-5)

    # The same stream as row 1 of a batch whose other streams have other lengths, fed in uneven
    # pieces (rows may be empty in a call).
    others = [torch.randint(0, 97, (m,)) for m in (n + 9, 3)]
    session = model.session(sink_tokens=sink_tokens, window=window, batch=3, cache_fill=NAN)
    got, pos = [], [0, 0, 0]
    streams = [others[0], ids, others[1]]
    for step, sizes in enumerate([(5, 1, 0), (1, 4, 3), (9, 7, 0), (0, 2, 0)] + [(4, 3, 0)] * n):
        rows = [s[p : p + k].tolist() for s, p, k in zip(streams, pos, sizes)]
        logits = session.feed(rows)
        got.append(logits[1, : len(rows[1])])
        pos = [p + len(r) for p, r in zip(pos, rows)]
        if pos[1] >= n:
            break
    close(torch.cat(got)[:n], one_by_one, 1e-5)
    assert session.seen[1] == n and session.seen[2] == 3


def test_save_and_restore_continue_exactly(checkpoints, tmp_path):
    path, _ = checkpoints("llama")
    model = st.load_model(path, backend="torch")
    ids = torch.randint(0, 97, (40,)).tolist()
    whole = model.session(sink_tokens=2, window=8)
    whole.feed(ids[:25])
    expected = whole.feed(ids[25:])[0]
    first = model.session(sink_tokens=2, window=8)
    first.feed(ids[:25])
    first.save(tmp_path / "s.safetensors")
    restored = st.Session.load(tmp_path / "s.safetensors", model)
    assert restored.seen == [25] and (restored.sink_tokens, restored.window) == (2, 8)
    torch.testing.assert_close(restored.last_logits, first.last_logits, rtol=0, atol=0)
    torch.testing.assert_close(restored.feed(ids[25:])[0], expected, rtol=0, atol=0)


def test_restore_refuses_another_model(checkpoints, tmp_path):
    path, _ = checkpoints("llama")
    other, _ = checkpoints("qwen3")
    s = st.load_model(path).session(sink_tokens=1, window=4)
    s.feed([1, 2, 3])
    s.save(tmp_path / "s.safetensors")
    with pytest.raises(st.UserError, match="saved for another model"):
        st.Session.load(tmp_path / "s.safetensors", st.load_model(other))
    (tmp_path / "junk").write_bytes(b"not a session")
    with pytest.raises(st.UserError, match="cannot be read"):
        st.Session.load(tmp_path / "junk", st.load_model(path))


def test_memory_is_constant(checkpoints):
    """20 x capacity tokens end with the very allocation the stream started with."""
    path, _ = checkpoints("llama")
    model = st.load_model(path, backend="torch")
    session = model.session(sink_tokens=4, window=12)
    cache = session.cache
    before = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.nbytes(), tuple(cache.keys.shape))
    ids = torch.randint(0, 97, (20 * cache.capacity,)).tolist()
    for i in range(0, len(ids), 16):
        session.feed(ids[i : i + 16])
    for token in ids[:20]:
        session.feed([token])
    after = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.nbytes(), tuple(cache.keys.shape))
    assert before == after
    assert session.seen == [len(ids) + 20]
    assert torch.isfinite(session.last_logits).all()


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-2), ("bfloat16", 5e-2)])
def test_half_precision_close_to_float32(checkpoints, dtype, tol):
    path, hf = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, dtype=dtype, backend="torch")
    assert model.dtype == getattr(torch, dtype) and model.session(1, 4).cache.keys.dtype == model.dtype
    ids = torch.randint(0, 97, (1, 24))
    close(model.session(sink_tokens=1, window=30).feed(ids), hf(ids).logits, tol)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 97, (1, 12))
    close(st.load_model(tmp_path).session(2, 30).feed(ids), hf(ids).logits, 1e-5)


def test_rotary_table_matches_transformers(checkpoints):
    """llama3 rope scaling: our table against transformers' rotary embedding."""
    from streaming_trt.runtime.rope import rotary_table

    path, hf = checkpoints("llama3")
    cos, sin = rotary_table(st.ModelConfig.from_dir(path), 64)
    x = torch.zeros(1, 1, 16)
    hf_cos, hf_sin = hf.model.rotary_emb(x, torch.arange(64).view(1, -1))
    half = cos.shape[1]
    torch.testing.assert_close(cos, hf_cos[0, :, :half], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, :half], atol=1e-5, rtol=0)
