"""The streaming core: geometry, keys stored rotated, exact angles far into a stream, decode steps
against the oracle, session files that cannot be loaded wrongly, sizes refused before allocation.

Tests that reach into the cache (``cache.seen``, ``cache.keys``) expect the layout of
``streaming_trt.kernels.reference``: keys rotated at their text position.
"""
from __future__ import annotations

import math

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint
from oracles import close, recompute
from streaming_trt.contract import Geometry

NAN = float("nan")


@pytest.mark.parametrize("sink_tokens,window", [(0, 1), (0, 5), (1, 4), (4, 3), (4, 6)])
def test_geometry_slots_ranks_and_attended_sets_agree(sink_tokens, window):
    g = Geometry(sink_tokens, window)
    assert g.capacity == sink_tokens + window
    for seen in range(1, 5 * g.capacity):
        t = seen - 1
        slots = g.slot_tokens(torch.tensor([seen]))[0].tolist()
        assert sorted(u for u in slots if u >= 0) == g.attended(t)  # the cache holds exactly A(t)
        assert all(g.slot(u) == s for s, u in enumerate(slots) if u >= 0)
        assert g.rank(t) == len(g.attended(t)) - 1
        assert g.slot(torch.tensor([t])).item() == g.slot(t)
        visible = g.visible(torch.tensor(t), torch.arange(t + 1))
        assert visible.nonzero().view(-1).tolist() == g.attended(t)


@pytest.mark.parametrize("bad", [dict(sink_tokens=-1, window=4), dict(sink_tokens=1, window=0),
                                 dict(sink_tokens=1, window=True), dict(sink_tokens=False, window=4),
                                 dict(sink_tokens=1, window=2.0), dict(sink_tokens="4", window=4)])
def test_geometry_refuses_bad_sizes(bad):
    with pytest.raises(st.UserError, match="must be an integer"):
        Geometry(**bad)


def test_capacity_warning_boundary(checkpoints):
    path, _ = checkpoints()
    model = st.load_model(path)
    limit = model.config.max_position_embeddings
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.session(sink_tokens=4, window=limit - 4)  # capacity == max_position_embeddings: fine
    with pytest.warns(UserWarning, match=f"choose a window <= {limit - 4}"):
        model.session(sink_tokens=4, window=limit - 3)
    with pytest.warns(UserWarning) as caught:
        model.session(sink_tokens=limit + 5, window=1)
    assert "-" not in str(caught[0].message).split(";")[-1]  # never a negative suggestion


def test_keys_are_stored_rotated_at_their_text_position(checkpoints):
    """Layout check: a key read back from the cache, rotated back by its text position, equals the
    unrotated projection; stored keys are never rewritten while they stay in the cache."""
    from streaming_trt.runtime.rope import apply_rotary, rotary_angles

    path, _ = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    s = model.session(sink_tokens=2, window=5, cache_fill=NAN)
    ids = torch.randint(0, 97, (20,))
    s.feed(ids.tolist())
    attn = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(ids))
    k = attn.k_proj(x).view(20, attn.num_kv_heads, attn.head_dim)
    g = s.geometry
    for slot, u in enumerate(g.slot_tokens(torch.tensor([20]))[0].tolist()):
        cos, sin = rotary_angles(model.inv_freq, torch.tensor(u))
        torch.testing.assert_close(s.cache.keys[0, 0, :, slot], apply_rotary(k[u], cos, sin), atol=1e-5, rtol=0)


def _jump(session, to: int) -> None:
    session.cache.seen = torch.full_like(session.cache.seen, to)
    session.cache.seen_host = [to] * session.batch


@pytest.mark.parametrize("chunk", [1, 3, 11])
def test_logits_four_million_tokens_in_equal_float64_oracle(checkpoints, chunk):
    """A one-layer model whose stream counter jumps to t = 4,000,000 after its sinks: once the window
    holds only real tokens again, every token's logits (decode steps and chunk rows) equal
    transformers re-run in float64 on A(t) at positions 0..|A(t)|-1, within float32 rounding.
    Naive float32 angles miss by far more (checked below)."""
    sink_tokens, window = 4, 8
    path, hf = checkpoints("llama", num_hidden_layers=1)
    hf64 = make_checkpoint(path.parent / "f64", "llama", num_hidden_layers=1).double()
    hf64.load_state_dict(hf.state_dict())
    model = st.load_model(path, backend="torch")
    session = model.session(sink_tokens=sink_tokens, window=window)
    ids = torch.randint(0, 97, (sink_tokens + 3 * window,))
    session.feed(ids[:sink_tokens].tolist())
    t0 = 4_000_000
    _jump(session, t0)
    rest = ids[sink_tokens:]
    got = torch.cat([session.feed(rest[i : i + chunk].tolist()) for i in range(0, len(rest), chunk)], dim=1)[0]
    # Token j of `rest` is text token t0 + j; compare once the window has moved past the jump.
    for j in range(window, len(rest)):
        keep = list(range(sink_tokens)) + [sink_tokens + i for i in range(j - window + 1, j + 1)]
        want = hf64(ids[keep].view(1, -1)).logits[0, -1].float()
        close(got[j], want, 2e-5)
    # The same computation with float32 angles is visibly wrong at this position.
    inv = model.inv_freq.float()
    exact = torch.remainder(torch.tensor(float(t0 + 5), dtype=torch.float64) * model.inv_freq, 2 * math.pi)
    naive = torch.remainder(torch.tensor(float(t0 + 5)) * inv, 2 * math.pi).double()
    assert (exact - naive).abs().max() > 1e-2


@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
def test_decode_steps_equal_oracle_token_by_token(checkpoints, sink_tokens):
    """Every token fed alone (the decode path), against the contract's re-computation oracle."""
    window = 5
    path, hf = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    n = 3 * (sink_tokens + window) + 2
    ids = torch.randint(0, 97, (n,))
    session = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN)
    got = torch.stack([session.feed([int(i)], all_logits=False)[0] for i in ids])
    close(got, recompute(hf, ids, sink_tokens, window), 1e-5)


def test_long_first_chunk_and_ragged_batch(checkpoints):
    """A first chunk longer than capacity, chunks longer than the window, and a ragged batch with
    an empty row, all equal token-by-token feeding."""
    path, _ = checkpoints("qwen3")
    model = st.load_model(path, backend="torch")
    sink_tokens, window = 2, 6
    ids = torch.randint(0, 97, (40,))
    one = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN)
    want = torch.cat([one.feed([int(i)]) for i in ids], dim=1)[0]
    s = model.session(sink_tokens=sink_tokens, window=window, cache_fill=NAN)
    got = torch.cat([s.feed(ids[:25].tolist()), s.feed(ids[25:].tolist())], dim=1)[0]
    close(got, want, 1e-5)
    batch = model.session(sink_tokens=sink_tokens, window=window, batch=3, cache_fill=NAN, max_chunk=9)
    out = batch.feed([ids[:30].tolist(), [], ids[:7].tolist()])
    close(out[0, :30], want[:30], 1e-5)
    close(out[2, :7], want[:7], 1e-5)
    assert out[1].abs().max() == 0 and batch.seen == [30, 0, 7]
    rest = batch.feed([ids[30:].tolist(), ids[:1].tolist(), []])
    close(rest[0, :10], want[30:], 1e-5)
    close(rest[1, :1], want[:1], 1e-5)


# Session files -------------------------------------------------------------------------------


@pytest.fixture
def saved(checkpoints, tmp_path):
    path, _ = checkpoints("llama")
    model = st.load_model(path)
    s = model.session(sink_tokens=2, window=6)
    s.feed(torch.randint(0, 97, (15,)).tolist())
    file = tmp_path / "s.safetensors"
    s.save(file)
    return model, file


def _rewrite(file, change_tensors=None, change_meta=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if change_tensors:
        change_tensors(tensors)
    if change_meta:
        change_meta(meta)
    save_file(tensors, str(file), metadata=meta)


def _resum(tensors, meta):
    from streaming_trt.runtime.session import _checksum

    meta["checksum"] = _checksum(tensors, meta)


def test_session_refuses_same_shape_other_weights(checkpoints, saved, tmp_path):
    model, file = saved
    other = make_checkpoint(tmp_path / "other", "llama", seed=1)
    del other
    with pytest.raises(st.UserError, match="saved for another model"):
        st.Session.load(file, st.load_model(tmp_path / "other"))
    st.Session.load(file, model)  # the model it was saved with loads it


@pytest.mark.parametrize("damage,match", [
    (lambda t, m: t["keys"].view(-1)[:7].fill_(3.0), "checksum"),
    (lambda t, m: t.pop("values"), "checksum"),
    (lambda t, m: m.update(window="7"), "checksum"),
    (lambda t, m: m.update(version="1"), "format version 1"),
    (lambda t, m: m.pop("version"), "format version 1"),
    (lambda t, m: m.update(format="something-else"), "not a streaming-trt session"),
])
def test_session_refuses_damaged_files(saved, damage, match):
    model, file = saved
    holder = {}
    _rewrite(file, lambda t: holder.setdefault("t", t), lambda m: damage(holder["t"], m))
    with pytest.raises(st.UserError, match=match):
        st.Session.load(file, model)


@pytest.mark.parametrize("damage,match", [
    (lambda t, m: t["seen"].fill_(-2), "counters"),
    (lambda t, m: t.pop("values"), "values"),
    (lambda t, m: m.update(window="x"), "mangles"),
    (lambda t, m: t["keys"].view(-1)[:3].fill_(float("inf")), "non-finite"),
    (lambda t, m: t.__setitem__("last_logits", t["last_logits"] * float("nan")), "not finite"),
    (lambda t, m: t.__setitem__("keys", t["keys"].half()), "keys are"),
])
def test_session_validates_every_field_even_with_a_valid_checksum(saved, damage, match):
    """A file re-signed after tampering (a valid checksum) is still checked field by field."""
    model, file = saved
    holder = {}
    _rewrite(file, lambda t: holder.setdefault("t", t), lambda m: (damage(holder["t"], m), _resum(holder["t"], m)))
    with pytest.raises(st.UserError, match=match):
        st.Session.load(file, model)


def test_cli_refuses_damaged_session_with_one_line(saved, tmp_path):
    import subprocess
    import sys

    model, file = saved
    _rewrite(file, lambda t: t["keys"].view(-1)[:7].fill_(3.0))
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, "llama")
    from checkpoints import save_tokenizer

    save_tokenizer(ckpt)
    r = subprocess.run([sys.executable, "-m", "streaming_trt.cli.generate", "--model", str(ckpt), "--load-session",
                        str(file), "--prompt", "a", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "checksum" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# Sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(sink_tokens=4, window=10**9), dict(sink_tokens=10**9, window=4),
                                dict(sink_tokens=4, window=1000, batch=10**7)])
def test_impossible_cache_refused_before_allocation(checkpoints, kw):
    path, _ = checkpoints()
    model = st.load_model(path)
    with pytest.warns(UserWarning) if kw["sink_tokens"] + kw["window"] > 256 else _nothing():
        with pytest.raises(st.UserError, match=r"the cache needs .* free; ") as e:
            model.session(**kw)
    assert "-" not in str(e.value).split("free;")[1]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# The decode step as a CUDA graph captures it ------------------------------------------------


def test_device_only_decode_plan_equals_planned_decode(checkpoints):
    """The step a CUDA graph captures (plan from device state only, rank angles always formed,
    the cache-full variant without a mask), run eagerly, equals the host-planned decode."""
    from streaming_trt.runtime.graphs import DecodeGraphs

    path, _ = checkpoints("llama")
    model = st.load_model(path, backend="torch")
    sink_tokens, window = 2, 5
    ids = torch.randint(0, 97, (4 * (sink_tokens + window),))
    planned = model.session(sink_tokens=sink_tokens, window=window, batch=2, cache_fill=NAN)
    captured = model.session(sink_tokens=sink_tokens, window=window, batch=2, cache_fill=NAN)
    graphs = DecodeGraphs(model, captured.cache)
    planned.feed([[1, 2], [3]]), captured.feed([[1, 2], [3]])
    for token in ids.tolist():
        want = planned.feed([[token], [token]], all_logits=False)
        full = min(captured.cache.seen_host) + 1 >= captured.cache.capacity
        got = graphs.step(torch.tensor([[token], [token]]), full)
        captured.cache.seen_host = [s + 1 for s in captured.cache.seen_host]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert captured.seen == planned.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: CUDA-graph capture needs one")
def test_captured_decode_equals_eager_on_cuda(checkpoints):
    path, _ = checkpoints("llama")
    model = st.load_model(path, device="cuda")
    ids = torch.randint(0, 97, (3 * 12,)).tolist()
    eager = model.session(sink_tokens=4, window=8, batch=2)
    graphed = model.session(sink_tokens=4, window=8, batch=2, capture_decode=True)
    eager.feed([[5, 6, 7], [8]]), graphed.feed([[5, 6, 7], [8]])
    for token in ids:
        want = eager.feed([[token], [token]], all_logits=False).clone()
        got = graphed.feed([[token], [token]], all_logits=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert set(graphed.graphs.graphs) == {False, True}


def test_feed_flags_and_save_paths_refused_clearly(checkpoints, tmp_path):
    path, _ = checkpoints()
    s = st.load_model(path).session(1, 4)
    with pytest.raises(st.UserError, match="all_logits must be True or False"):
        s.feed([1, 2], all_logits="no")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(st.UserError, match="afile is not a directory"):
        s.save(tmp_path / "afile" / "s.safetensors")
    with pytest.raises(st.UserError, match="does not exist"):
        s.save(tmp_path / "missing" / "s.safetensors")
