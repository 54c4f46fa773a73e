"""Recall of evicted tokens (shared/design/semantics.md, "Recall of evicted tokens").

On one-layer models, where re-computation is exactly the streaming function: every token's logits
equal transformers re-run on A_R(t) (sinks + the tokens of the blocks the selection chose, in text
order + the window) at positions 0 .. |A_R(t)| - 1; with no block selected recall is plain
StreamingLLM bit for bit; the selection equals a brute-force float64 top-k of the stated rule.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

import streaming_trt as st
from oracles import close
from streaming_trt.runtime.recall import BlockStore, Recall

NAN = float("nan")


def recall_set(t: int, sel: list[int], S: int, W: int, B: int) -> list[int]:
    """A_R(t), in order."""
    blocks = [u for j in sel for u in range(S + j * B, S + (j + 1) * B)]
    return list(range(min(S, t + 1))) + blocks + list(range(max(S, t - W + 1), t + 1))


@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
@pytest.mark.parametrize("scorer,chunk", [("bounds", 1), ("representative", 5)])
def test_logits_equal_recomputation_on_the_recall_set(checkpoints, scorer, sink_tokens, chunk):
    S, W, B, K = sink_tokens, 8, 4, 2
    path, hf = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    s = model.session(sink_tokens=S, window=W, cache_fill=NAN,
                      recall=Recall(block_size=B, top_k=K, scorer=scorer, chunk=16))
    torch.manual_seed(S + 10 * chunk)
    n = 60
    ids = torch.randint(0, 97, (n,))
    chosen = []
    for lo in range(0, n, chunk):
        out = s.feed(ids[lo : lo + chunk].tolist())[0]
        sel = list(s.recall.selected[0])
        assert sel == sorted(set(sel)) and len(sel) <= K
        for i in range(out.shape[0]):
            t = lo + i
            assert all(S + (j + 1) * B - 1 <= t - W for j in sel)  # only fully evicted blocks
            want = hf(ids[recall_set(t, sel, S, W, B)].view(1, -1)).logits[0, -1].float()
            close(out[i], want, 1e-5)
        chosen.append(tuple(sel))
    blocks = (n - W - S) // B
    assert any(len(c) == K for c in chosen) and len(set(chosen)) > 3  # recall happened, and changed
    assert max(j for c in chosen for j in c) < blocks


@pytest.mark.parametrize("scorer", ["bounds", "representative"])
def test_no_block_selected_is_plain_streaming_exactly(checkpoints, scorer):
    path, _ = checkpoints("llama", num_hidden_layers=2)
    model = st.load_model(path, backend="torch")
    ids = torch.randint(0, 97, (60,)).tolist()
    for recall in (Recall(block_size=4, top_k=0, scorer=scorer), Recall(block_size=64, top_k=3, scorer=scorer)):
        plain = model.session(sink_tokens=2, window=6, cache_fill=NAN)
        other = model.session(sink_tokens=2, window=6, cache_fill=NAN, recall=recall)
        for piece in (ids[:7], ids[7:8], ids[8:30], *([x] for x in ids[30:])):
            a, b = plain.feed(piece), other.feed(piece)
            assert torch.equal(a, b)
            assert other.recall.selected == [[], []]
        assert torch.equal(plain.cache.keys, other.cache.keys) and torch.equal(plain.cache.values, other.cache.values)


def _store(scorer: str, blocks: int, S: int = 3, W: int = 5, B: int = 6, kv: int = 2, d: int = 8, top_k: int = 3,
           budget: int = 1 << 30, seed: int = 0):
    from streaming_trt.contract import Geometry

    g = Geometry(S, W)
    config = types.SimpleNamespace(num_layers=1, num_kv_heads=kv, head_dim=d)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    store = BlockStore(Recall(block_size=B, top_k=top_k, scorer=scorer, representatives=2, budget_bytes=budget),
                       config, g, torch.float32, torch.device("cpu"), inv)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv, blocks * B, d, generator=gen)
    mass = torch.rand(kv, blocks * B, generator=gen)
    # Pushed in uneven pieces: partly evicted blocks wait in the staging buffer.
    cut = [0, 1, 7, 8, 20, blocks * B]
    for a, b in zip(cut, cut[1:]):
        store._push(0, S + a, keys[:, a:b], keys[:, a:b] * 2, mass[:, a:b])
    return store, keys, mass, inv, g


def _rotate64(x, angle):
    """Rotate-half rotation of float64 ``x [..., d]`` by ``angle [..., d/2]``, written out."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@pytest.mark.parametrize("scorer", ["bounds", "representative"])
@pytest.mark.parametrize("seed", range(4))
def test_selection_equals_brute_force_float64_top_k(scorer, seed):
    S, W, B, blocks, heads, top_k = 3, 5, 6, 9, 4, 3
    store, keys, mass, inv, g = _store(scorer, blocks, S, W, B, seed=seed, top_k=top_k)
    assert store.count[0] == blocks
    q = torch.randn(2, heads, 8, generator=torch.Generator().manual_seed(100 + seed))
    scale = 8**-0.5
    got = store.select(0, q, available=blocks, sm_scale=scale)
    # Brute force: each block's keys rotated back to position 0 and the query set W tokens after.
    votes = torch.zeros(blocks, dtype=torch.float64)
    qd = _rotate64(q.double(), W * inv)
    scores = torch.zeros(2, heads, blocks, dtype=torch.float64)
    for j in range(blocks):
        for kvh in range(2):
            idx = torch.arange(j * B, (j + 1) * B)
            k0 = torch.stack([_rotate64(keys[kvh, i].double(), -(S + i) * inv) for i in idx.tolist()])
            for h in range(kvh * heads // 2, (kvh + 1) * heads // 2):
                for r in range(2):
                    if scorer == "bounds":
                        lo, hi = k0.min(0).values, k0.max(0).values
                        scores[r, h, j] = sum(max(qd[r, h, c] * lo[c], qd[r, h, c] * hi[c]) for c in range(8))
                        assert scores[r, h, j] >= (k0 @ qd[r, h]).max() - 1e-9  # an upper bound
                    else:
                        top = mass[kvh, idx].topk(2).indices
                        scores[r, h, j] = (k0[top] @ qd[r, h]).max()
    for r in range(2):
        for h in range(heads):
            votes += torch.softmax(scores[r, h] * scale, 0)
    want = sorted(votes.topk(top_k).indices.tolist())
    assert got == want
    assert store.select(0, q, available=2, sm_scale=scale) == [0, 1]  # only blocks evicted so far


def test_budget_drops_the_oldest_blocks_and_is_kept():
    probe, *_ = _store("bounds", 1)
    budget = 3 * probe.block_bytes
    store, *_ = _store("bounds", 9, budget=budget)
    assert store.max_blocks == 3 and store.first[0] == 6 and store.count[0] == 9
    q = torch.randn(1, 4, 8)
    assert store.select(0, q, available=9, sm_scale=1.0) == [6, 7, 8]
    kept = sum(t.nbytes for t in store.keys + store.values) + sum(t.nbytes for t in store.summary[0])
    assert kept <= budget


def test_recall_refusals(checkpoints, tmp_path):
    path, _ = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    with pytest.raises(st.UserError, match="batch=1"):
        model.session(sink_tokens=2, window=6, batch=2, recall=Recall(block_size=4))
    with pytest.raises(st.UserError, match="scorer"):
        Recall(scorer="exact")
    with pytest.raises(st.UserError, match="top_k"):
        Recall(top_k=-1)
    with pytest.raises(st.UserError, match="recall must be"):
        model.session(sink_tokens=2, window=6, recall={"top_k": 2})
    with pytest.raises(st.UserError, match="holds no block"):
        model.session(sink_tokens=2, window=6, recall=Recall(block_size=4, budget_bytes=10))


@pytest.mark.parametrize("scorer", ["bounds", "representative"])
def test_saved_session_carries_the_block_store(checkpoints, tmp_path, scorer):
    path, _ = checkpoints("llama", num_hidden_layers=2)
    model = st.load_model(path, backend="torch")
    recall = Recall(block_size=4, top_k=2, scorer=scorer, budget_bytes=1 << 20)
    s = model.session(sink_tokens=2, window=6, cache_fill=NAN, recall=recall)
    ids = torch.randint(0, 97, (70,)).tolist()
    s.feed(ids[:41])
    file = tmp_path / "r.safetensors"
    s.save(file)
    t = st.Session.load(file, model)
    assert t.recall is not None and t.recall.recall == recall and t.seen == s.seen
    for piece in (ids[41:50], *([x] for x in ids[50:])):
        assert torch.equal(s.feed(piece), t.feed(piece))
        assert s.recall.selected == t.recall.selected
    assert any(s.recall.selected)
    plain = model.session(sink_tokens=2, window=6)
    plain.feed(ids[:5])
    plain.save(file)
    assert st.Session.load(file, model).recall is None


def test_generate_with_recall_saves_and_continues(tmp_path, capsys):
    from streaming_trt.cli import generate

    file = tmp_path / "g.safetensors"
    base = ["--model", "builtin:random", "--temperature", "0", "--max-new-tokens", "6"]
    assert generate.main(base + ["--prompt", "a prompt long enough to evict some blocks " * 3, "--recall",
                                 "--sink-tokens", "4", "--window", "8", "--recall-block-size", "4",
                                 "--save-session", str(file)]) == 0
    assert generate.main(base + ["--load-session", str(file), "--prompt", " more"]) == 0
    assert generate.main(base + ["--recall-top-k", "2"]) == 2
    assert "--recall-top-k goes with --recall" in capsys.readouterr().err


def test_benchmarks_run_end_to_end(tmp_path, monkeypatch):
    """bench.passkey (accuracy and latency) and bench.streameval (gate and scoring) on the random
    built-in model: they run and write their files (their figures are meaningless here)."""
    from bench import passkey, streameval

    monkeypatch.setattr(passkey, "RESULTS", tmp_path)
    monkeypatch.setattr(streameval, "RESULTS", tmp_path)
    common = ["--model", "builtin:random", "--cache", "40", "--block-size", "8", "--tag", "_t"]
    assert passkey.main(common + ["--trials", "1", "--distances", "30,90", "--prefix", "10",
                                  "--methods", "streaming,recall-bounds,dense"]) == 0
    rows = (tmp_path / "passkey_t.csv").read_text().splitlines()
    assert rows[0].startswith("method,distance") and len(rows) == 1 + 3 * 2
    assert passkey.main(common + ["--latency", "--latency-stream", "60", "--steps", "3"]) == 0
    assert "recall-representative" in (tmp_path / "passkey_latency_t.csv").read_text()
    assert streameval.main(["--model", "builtin:random", "--gate-queries", "1", "--max-answer", "2", "--tag", "_t"]) == 0
    assert "FAILS the model gate" in (tmp_path / "streameval_t.md").read_text()
    assert streameval.main(["--model", "builtin:random", "--gate-queries", "1", "--gate", "0", "--queries", "2",
                            "--cache", "40", "--methods", "streaming,recall", "--max-answer", "2", "--tag", "_t"]) == 0
    assert "Table 7" in (tmp_path / "streameval_t.md").read_text()


def test_fixed_positions_are_infllm_one_distance(checkpoints):
    """positions="fixed" (outside the contract, for comparison): every recalled key sits W before
    the query, the sinks and window where they are without recall; transformers with those
    position ids is the oracle."""
    S, W, B, K = 4, 8, 4, 2
    path, hf = checkpoints("llama", num_hidden_layers=1)
    model = st.load_model(path, backend="torch")
    s = model.session(sink_tokens=S, window=W, cache_fill=NAN, recall=Recall(block_size=B, top_k=K, positions="fixed"))
    ids = torch.randint(0, 97, (50,))
    recalled = 0
    for t in range(50):
        out = s.feed([int(ids[t])])[0, 0]
        sel = s.recall.selected[0]
        keep = recall_set(t, sel, S, W, B)
        c = min(t, S + W - 1)
        pos = list(range(min(S, t + 1))) + [c - W] * (len(sel) * B) + list(range(min(S, t + 1), c + 1))
        want = hf(ids[keep].view(1, -1), position_ids=torch.tensor([pos])).logits[0, -1].float()
        close(out, want, 1e-5)
        recalled += bool(sel)
    assert recalled > 20
