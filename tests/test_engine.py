"""The engine: a batch of rows in the runner equals each conversation run alone on a batch-1
session (recall rows included, each with its own block store), and a conversation's state goes
through the runner, a file and back unchanged."""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint
from streaming_trt.contract import UserError
from streaming_trt.engine import BatchRunner, StreamState
from streaming_trt.runtime.sampling import SamplingParams

SINK, WINDOW = 4, 40
NAN = float("nan")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-model")
    make_checkpoint(d, "llama", seed=5, vocab_size=97)
    return st.load_model(d)


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 97, (2 * WINDOW + 17 * (i + 1),), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("recall", [None, st.Recall(block_size=8, top_k=2, chunk=16)], ids=["plain", "recall"])
def test_a_batch_of_rows_equals_each_conversation_alone(model, recall, monkeypatch):
    """Four conversations past the window and one short of it, prefilled in whole quanta and
    decoded together (rows placed and swapped by the runner, one row joining late): each row's
    logits at every step equal the same conversation alone; with recall, blocks were selected, the
    selections equal, and the four rows past the window attended to their blocks in one batched
    call beside the short one."""
    import streaming_trt.runtime.recall as recall_module

    batched_calls = []
    one_call = recall_module._attend_recalled_rows
    monkeypatch.setattr(recall_module, "_attend_recalled_rows",
                        lambda cache, layer, q, k, v, plan, rows, *a: batched_calls.append((cache.batch, len(rows)))
                        or one_call(cache, layer, q, k, v, plan, rows, *a))
    runner = BatchRunner(model, st.Geometry(SINK, WINDOW), slots=6, fill_value=NAN, recall=recall)
    ids = prompts(4) + [list(range(3, 23))]  # the last stays short of S + W for the 12 steps
    alone = [model.session(SINK, WINDOW, cache_fill=NAN, recall=recall) for _ in ids]
    rows = [5, 2, 0, 3, 4]  # the caller's names; where they live is the runner's choice
    for row, p, s in zip(rows, ids, alone):
        runner.reset(row)
        piece = max(3 * runner.quantum, 20)  # whole quanta, as the scheduler feeds them
        for lo in range(0, len(p), piece):
            got = runner.prefill(row, p[lo : lo + piece])
            want = s.feed(p[lo : lo + piece], all_logits=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    greedy = SamplingParams(temperature=0.0)
    samplers = [runner.sampler(greedy) for _ in rows]
    recalled = 0
    for step in range(12):
        live = rows if step >= 3 else rows[1:]  # the first row waits three steps
        draws = runner.sample(live, [samplers[rows.index(r)] for r in live], [None] * len(live))
        out = runner.decode(live, [d.token for d in draws])
        for i, (row, d) in enumerate(zip(live, draws)):
            s = alone[rows.index(row)]
            assert d.token == int(s.last_logits[0].argmax())
            want = s.feed([d.token], all_logits=False)[0]
            # A row's float32 products depend on how many rows the BLAS blocks together (MKL's AVX2
            # path, used on AMD CPUs: 2.5e-5 apart after 12 steps): the tolerance of the CUDA variant.
            torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-4)
            if recall is not None:
                mine = runner.cache.stores[runner.where[row]]
                assert mine.selected == s.recall.selected
                recalled += any(mine.selected)
    if recall is not None:
        assert recalled > 0, "no block was recalled: recall was not exercised"
        assert (5, 4) in batched_calls, "the four recall rows never attended in one batched call"
        assert max(alone[-1].seen) < SINK + WINDOW
        stores = [runner.cache.stores[runner.where[r]] for r in rows]
        assert len({id(x) for x in stores}) == len(rows)  # every conversation its own block store


@pytest.mark.parametrize("recall", [None, st.Recall(block_size=8, top_k=2, chunk=16)], ids=["plain", "recall"])
def test_rows_fed_together_equal_each_alone(model, recall):
    """feed (a scheduler step: decoding rows' tokens, what closes a reply, prompt chunks, in one
    forward): rows out of the pool's order with ragged id lists (one past the window, so recall
    rows select blocks; one a new stream), fed in one call, then decoded: each row's logits equal
    the same conversation alone; a wrong call is refused."""
    runner = BatchRunner(model, st.Geometry(SINK, WINDOW), slots=5, fill_value=NAN, recall=recall)
    ids = prompts(3)
    rows = [3, 0, 2]
    alone = [model.session(SINK, WINDOW, cache_fill=NAN, recall=recall) for _ in rows]
    for row, p, s in zip(rows, ids, alone):
        runner.reset(row)
        runner.prefill(row, p)
        s.feed(p, all_logits=False)
    rows.append(4)  # a new stream whose prompt's first chunk comes in the same forward
    alone.append(model.session(SINK, WINDOW, cache_fill=NAN, recall=recall))
    runner.reset(4)
    closing = [[5, 6], [7], [8, 9, 10], list(range(20, 20 + 2 * 16))]
    runner.feed(rows, closing)
    for row, c, s in zip(rows, closing, alone):
        want = s.feed(c, all_logits=False)[0]
        torch.testing.assert_close(runner.logits[runner.where[row]], want, rtol=1e-5, atol=1e-5)
        assert runner.seen(row) == s.seen[0]
    rows, alone = rows[:3], alone[:3]
    out = runner.decode(rows, [11, 12, 13])
    for i, (s, t) in enumerate(zip(alone, [11, 12, 13])):
        torch.testing.assert_close(out[i], s.feed([t], all_logits=False)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="one non-empty id list per row"):
        runner.feed(rows, closing[:2])
    with pytest.raises(UserError, match="one non-empty id list per row"):
        runner.feed(rows, [[1], [], [2]])
    swaps = []
    swap = runner.cache.swap
    runner.cache.swap = lambda a, b: swaps.append((a, b)) or swap(a, b)
    out = runner.decode(rows[::-1], [14, 15, 16])  # the same rows in another order: nothing moves
    assert swaps == []
    for i, (s, t) in enumerate(zip(alone[::-1], [14, 15, 16])):  # logits in the order asked for
        torch.testing.assert_close(out[i], s.feed([t], all_logits=False)[0], rtol=1e-5, atol=1e-5)
    runner.decode(rows[:2], [17, 18])  # two of them: at most the one above places 0, 1 moves
    assert len(swaps) <= 1 and sorted(runner.where[r] for r in rows[:2]) == [0, 1]


@pytest.mark.parametrize("recall", [None, st.Recall(block_size=8, top_k=2, chunk=16)], ids=["plain", "recall"])
def test_state_through_runner_file_and_back(model, recall, tmp_path):
    """A row saved as a StreamState, written, read back and loaded into another row continues
    exactly as the conversation alone; the file is a batch-1 session file; another model's,
    a damaged or a batch-2 file is refused."""
    runner = BatchRunner(model, st.Geometry(SINK, WINDOW), slots=3, fill_value=NAN, recall=recall)
    p = prompts(1)[0]
    alone = model.session(SINK, WINDOW, cache_fill=NAN, recall=recall)
    runner.reset(1)
    runner.prefill(1, p)
    alone.feed(p, all_logits=False)
    state = runner.save(1)
    runner.free(1)
    assert state.seen == len(p) and state.nbytes() > state.keys.nbytes
    state.save(tmp_path / "a.session")
    back = StreamState.load(tmp_path / "a.session", model)
    assert back.seen == state.seen and torch.equal(back.last_logits, state.last_logits)
    assert torch.equal(back.keys.nan_to_num(), state.keys.nan_to_num())
    session = st.Session.load(tmp_path / "a.session", model)  # the same format as a session's
    assert session.seen == [len(p)]
    runner.load(2, back)
    for _ in range(5):
        token = int(alone.last_logits[0].argmax())
        got = runner.decode([2], [token])[0]
        torch.testing.assert_close(got, alone.feed([token], all_logits=False)[0], rtol=1e-5, atol=1e-5)
    (tmp_path / "b.session").write_bytes((tmp_path / "a.session").read_bytes()[:-7] + b"garbage")
    with pytest.raises(UserError, match="b.session"):
        StreamState.load(tmp_path / "b.session", model)
    model.session(SINK, WINDOW, batch=2).save(tmp_path / "c.session")
    with pytest.raises(UserError, match="2 streams"):
        StreamState.load(tmp_path / "c.session", model)
    other = BatchRunner(model, st.Geometry(SINK, WINDOW), slots=1, recall=None if recall else st.Recall(chunk=16))
    with pytest.raises(UserError, match="recall"):
        other.load(0, back)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the runner's captured decode buckets need one")
@pytest.mark.parametrize("recall", [None, st.Recall(block_size=8, top_k=2, chunk=16)], ids=["graphs", "recall"])
def test_runner_on_cuda_equals_each_conversation_alone(model, recall, tmp_path):
    """On CUDA: decode steps replayed from the CUDA graph of each bucket (3 rows in a bucket of 4,
    padded with a free row), or recall rows batched with the Triton backend, equal each
    conversation alone on its own batch-1 session."""
    d = tmp_path / "m"
    make_checkpoint(d, "llama", seed=5, vocab_size=97)
    gpu = st.load_model(d, device="cuda")
    runner = BatchRunner(gpu, st.Geometry(SINK, WINDOW), slots=4, fill_value=NAN, recall=recall)
    assert runner.capture == (recall is None)
    ids = prompts(3)
    alone = [gpu.session(SINK, WINDOW, cache_fill=NAN, recall=recall) for _ in ids]
    rows = [0, 1, 2]
    for row, p, s in zip(rows, ids, alone):
        runner.reset(row)
        for lo in range(0, len(p), 16):
            runner.prefill(row, p[lo : lo + 16])
            s.feed(p[lo : lo + 16], all_logits=False)
    for _ in range(8):
        tokens = [int(s.last_logits[0].argmax()) for s in alone]
        out = runner.decode(rows, tokens)
        for i, (s, t) in enumerate(zip(alone, tokens)):
            torch.testing.assert_close(out[i], s.feed([t], all_logits=False)[0], rtol=1e-4, atol=1e-4)
    if recall is None:
        assert 4 in runner.buckets
