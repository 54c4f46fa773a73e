"""The conversation journal (streaming_trt.serving.journal): a turn costs the slots it wrote, a
restore is bit-exact (NaN-filled unwritten slots included) through compactions, a torn last record
restores the turn before it, a damaged or foreign file is refused, never loaded wrong."""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import streaming_trt as st
from bench import persist
from checkpoints import make_checkpoint
from streaming_trt.contract import Geometry, UserError
from streaming_trt.engine import BatchRunner, StreamState
from streaming_trt.serving import journal as jr
from streaming_trt.serving.journal import Journal, read_file, written_slots
from streaming_trt.serving.store import ConversationStore

SINK, WINDOW = 3, 13
NAN = float("nan")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("journal-model")
    make_checkpoint(d, "llama", seed=5, vocab_size=61)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return st.load_model(model_dir)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("journal-model-2")
    make_checkpoint(d, "llama", seed=6, vocab_size=61)
    return st.load_model(d)


def raw(t: torch.Tensor | None):
    """The exact bytes of a tensor (NaN equals NaN of the same bits)."""
    return None if t is None else t.detach().cpu().contiguous().view(torch.uint8)


def as_state(x) -> StreamState:
    """A batch-1 session's stream as the StreamState the store keeps (a StreamState as it is)."""
    if isinstance(x, StreamState):
        return x
    state = StreamState(x.model, x.geometry, NAN)
    state.keys.copy_(x.cache.keys[:, 0])
    state.values.copy_(x.cache.values[:, 0])
    state.seen = x.seen[0]
    state.last_logits = None if x.last_logits is None else x.last_logits[0].float().clone()
    return state


def assert_same_state(got, want):
    got, want = as_state(got), as_state(want)
    assert got.seen == want.seen
    for name in ("keys", "values"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and torch.equal(raw(a), raw(b)), f"{name} differ"
    assert (got.last_logits is None) == (want.last_logits is None)
    if want.last_logits is not None:
        assert torch.equal(raw(got.last_logits), raw(want.last_logits)), "newest logits differ"


def snapshot(session):
    """A detached copy of a session's state, to compare against later."""
    copy = st.Session(session.model, session.geometry.sink_tokens, session.geometry.window, cache_fill=NAN)
    copy.cache.keys.copy_(session.cache.keys)
    copy.cache.values.copy_(session.cache.values)
    copy.cache.set_seen(session.seen)
    copy.last_logits = None if session.last_logits is None else session.last_logits.clone()
    return copy


def turns(seed: int, n: int, longest: int = 30):
    rng = random.Random(seed)
    return [[rng.randrange(61) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def test_written_slots_are_exactly_the_slots_a_turn_changes():
    rng = random.Random(0)
    for _ in range(3000):
        g = Geometry(rng.randint(0, 5), rng.randint(1, 12))
        before = rng.randint(0, 40)
        after = before + rng.randint(0, 30)
        held = [u for u in range(before, after) if u < g.sink_tokens or u >= after - g.window]
        want = {g.slot(u) for u in held}
        got = written_slots(g, before, after)
        slots = [s for a, b in got for s in range(a, b)]
        assert len(slots) == len(set(slots)) == len(want) and set(slots) == want, (g, before, after, got)
        assert len(got) <= 3 and all(0 <= a < b <= g.capacity for a, b in got)
        # and they are the slots whose token changed
        t0, t1 = g.slot_tokens(torch.tensor([before]))[0], g.slot_tokens(torch.tensor([after]))[0]
        assert set((t0 != t1).nonzero().view(-1).tolist()) <= want


def test_bytes_per_turn_are_the_turns_slots_plus_a_constant(model, tmp_path):
    g = Geometry(SINK, WINDOW)
    j = Journal(tmp_path, model, g, NAN, compact_ratio=1e9)
    c = model.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # keys + values, float32
    constant = 4 * c.vocab_size + 200  # newest logits + record framing
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    session.feed([1, 2])
    j.append(1, as_state(session))  # the file's header, once
    for ids in turns(1, 12, longest=2 * (SINK + WINDOW)):
        before = session.seen[0]
        session.feed(ids, all_logits=False)
        written = j.append(1, as_state(session))
        held = sum(1 for u in range(before, session.seen[0]) if u < SINK or u >= session.seen[0] - WINDOW)
        assert held * per_token < written <= held * per_token + constant, (len(ids), written)
    assert j.size(1) < 13 * ((SINK + WINDOW) * per_token + constant) + 1000


@pytest.mark.parametrize("background", [False, True])
def test_restore_is_bit_exact_after_many_turns_and_compactions(model, tmp_path, background):
    g = Geometry(SINK, WINDOW)
    log = []
    j = Journal(tmp_path, model, g, NAN, compact_ratio=0.3, background=background, log=log.append)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    session.feed([1, 2, 3, 4, 5])
    j.append(7, as_state(session))
    restored = Journal(tmp_path, model, g, NAN).load(7)
    assert bool(restored.keys.isnan().any()), "slots never written keep the fill value"
    assert_same_state(restored, session)
    for k, ids in enumerate(turns(2, 24)):
        session.feed(ids, all_logits=False)
        j.append(7, as_state(session))
        if k % 7 == 3:
            assert_same_state(Journal(tmp_path, model, g, NAN).load(7), session)
    assert session.seen[0] > 3 * (SINK + WINDOW), "the ring wrapped several times"
    j.join(60)
    assert j.compactions >= 3 and not log, log
    restored = j.load(7)
    assert_same_state(restored, session)
    # a restored conversation continues exactly as the live one
    runner = BatchRunner(model, g, slots=1, fill_value=NAN)
    runner.load(0, restored)
    assert torch.equal(raw(runner.prefill(0, [5, 6, 7])), raw(session.feed([5, 6, 7], all_logits=False)[0]))
    j.append(7, runner.save(0))
    assert_same_state(Journal(tmp_path, model, g, NAN).load(7), session)


def test_a_compaction_keeps_the_records_appended_while_it_ran(model, tmp_path, monkeypatch):
    g = Geometry(SINK, WINDOW)
    j = Journal(tmp_path, model, g, NAN, compact_ratio=1e9)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    for ids in turns(3, 5):
        session.feed(ids, all_logits=False)
        j.append(2, as_state(session))
    replay, late = jr._replay, []

    def replay_then_append(data, m, path):  # a turn finishes while the compaction reads the file
        r = replay(data, m, path)
        if not late:
            late.append(1)
            session.feed([9, 8, 7], all_logits=False)
            j.append(2, as_state(session))
        return r

    monkeypatch.setattr(jr, "_replay", replay_then_append)
    assert j.compact(2) > 0
    monkeypatch.setattr(jr, "_replay", replay)
    assert late
    assert_same_state(Journal(tmp_path, model, g, NAN).load(2), session)
    session.feed([1], all_logits=False)
    j.append(2, as_state(session))
    assert_same_state(Journal(tmp_path, model, g, NAN).load(2), session)


def _history(model, tmp_path, n_turns=4, compact_after=None):
    """A journal of ``n_turns`` turns; returns (journal, the state after each turn, record offsets)."""
    g = Geometry(SINK, WINDOW)
    j = Journal(tmp_path, model, g, NAN, compact_ratio=1e9)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    states, ends = [], []
    for k, ids in enumerate(turns(4, n_turns, longest=8)):
        session.feed(ids, all_logits=False)
        j.append(3, as_state(session))
        if compact_after == k:
            j.compact(3)
        states.append(snapshot(session))
        ends.append(j.size(3))
    return j, states, ends


@pytest.mark.parametrize("compact_after", [None, 1])
def test_a_torn_last_record_restores_the_turn_before(model, tmp_path, compact_after):
    j, states, ends = _history(model, tmp_path / "s", compact_after=compact_after)
    path = j.path(3)
    whole = path.read_bytes()
    start, end = ends[-2], ends[-1]
    assert end == len(whole)
    # every offset of the prefix and of the digest, a sample in between
    cuts = sorted(set(range(start, start + 30)) | set(range(start, end, max(1, (end - start) // 60)))
                  | set(range(end - 20, end)))
    for cut in cuts:
        path.write_bytes(whole[:cut])
        log = []
        fresh = Journal(tmp_path / "s", model, j.geometry, NAN, background=False, log=log.append)
        assert_same_state(fresh.load(3), states[-2])
        if cut > start:
            assert "torn" in log[0], log
        assert path.stat().st_size == start, "the torn bytes were not cut off"
        # the next turn appends after the good records
        fresh.append(3, as_state(states[-1]))
        assert_same_state(Journal(tmp_path / "s", model, j.geometry, NAN).load(3), states[-1])
    # zeros where the last record was being written (a crash after the size grew)
    path.write_bytes(whole[:start] + bytes(end - start))
    assert_same_state(Journal(tmp_path / "s", model, j.geometry, NAN).load(3), states[-2])


def test_damaged_or_foreign_files_are_refused(model, other_model, tmp_path):
    j, states, ends = _history(model, tmp_path / "s", n_turns=4, compact_after=0)
    path = j.path(3)
    whole = path.read_bytes()

    def load_with(data):
        path.write_bytes(data)
        return Journal(tmp_path / "s", model, j.geometry, NAN).load(3)

    def flip(at):
        b = bytearray(whole)
        b[at] ^= 0x40
        return bytes(b)

    middle = (ends[1] + ends[2]) // 2  # inside the third record, a turn recorded after it
    for at, match in [(3, "header"), (40, "header"), (ends[0] - 100, "base snapshot"),
                      (ends[1] + 2, "prefix"), (ends[1] + 10, "prefix"), (middle, "checksum")]:
        with pytest.raises(UserError, match=match):
            load_with(flip(at))
    # a damaged last record was never acknowledged or the disk lost it: dropped, and said so
    log = []
    path.write_bytes(flip(ends[-1] - 30))
    assert_same_state(Journal(tmp_path / "s", model, j.geometry, NAN, log=log.append).load(3), states[-2])
    assert "torn" in log[0]
    # records swapped: the chain is checked
    with pytest.raises(UserError, match="does not follow"):
        load_with(whole[: ends[1]] + whole[ends[2]: ends[3]] + whole[ends[1]: ends[2]])
    with pytest.raises(UserError, match="another model"):
        path.write_bytes(whole)
        Journal(tmp_path / "s", other_model, j.geometry, NAN).load(3)
    with pytest.raises(UserError, match="sink tokens"):
        Journal(tmp_path / "s", model, Geometry(SINK, WINDOW + 1), NAN).load(3)
    with pytest.raises(UserError):
        load_with(b"not a session file at all")


def test_another_version_is_refused_by_name(model, tmp_path, monkeypatch):
    j, _, _ = _history(model, tmp_path, n_turns=2)
    monkeypatch.setattr(jr, "VERSION", 2)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    session.feed([1, 2, 3])
    Journal(tmp_path, model, j.geometry, NAN).append(9, as_state(session))
    monkeypatch.setattr(jr, "VERSION", 1)
    with pytest.raises(UserError, match="format version 2"):
        Journal(tmp_path, model, j.geometry, NAN).load(9)


def test_whole_state_files_load_and_become_a_journal_base(model, tmp_path):
    g = Geometry(SINK, WINDOW)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    session.feed(turns(5, 1, longest=40)[0])
    j = Journal(tmp_path, model, g, NAN, compact_ratio=1e9)
    session.save(j.path(4))  # written before the journal
    assert not jr.is_journal(j.path(4))
    assert_same_state(j.load(4), session)
    session.feed([4, 5, 6])
    j.append(4, as_state(session))  # the state becomes the base
    assert jr.is_journal(j.path(4))
    session.feed([7])
    assert j.append(4, as_state(session)) < j.snapshot_bytes / 4
    assert_same_state(Journal(tmp_path, model, g, NAN).load(4), session)
    assert_same_state(read_file(j.path(4), model), session)


def test_the_store_saves_turns_and_restores_them(model, tmp_path):
    g = Geometry(SINK, WINDOW)
    store = ConversationStore(model, g, tmp_path, host_bytes=0, fill_value=NAN)
    live = model.session(SINK, WINDOW, cache_fill=NAN)
    for ids in turns(6, 10, longest=3):
        if store.exists(11):  # host_bytes=0: read back from the file each turn
            assert_same_state(store.get(11), live)
        live.feed(ids, all_logits=False)
        store.put(11, as_state(live))
        store.save(11)
        assert store.files[11][1] == store.path(11).stat().st_size
    assert store.journal.appended < 10 * store.journal.snapshot_bytes / 2
    assert_same_state(ConversationStore(model, g, tmp_path, host_bytes=0, fill_value=NAN).get(11), live)
    store.end(11)
    assert not store.path(11).exists() and not store.exists(11)


def test_recall_sessions_keep_the_whole_file(model, tmp_path):
    g = Geometry(SINK, WINDOW)
    store = ConversationStore(model, g, tmp_path, host_bytes=0, fill_value=NAN)
    runner = BatchRunner(model, g, slots=1, fill_value=NAN, recall=st.Recall(block_size=4, top_k=1))
    runner.reset(0)
    runner.prefill(0, turns(7, 1, longest=60)[0] + [1] * 30)
    state = runner.save(0)
    store.put(12, state)
    store.save(12)
    assert not jr.is_journal(store.path(12))
    again = store.get(12)
    assert again.recall is not None and again.seen == state.seen
    assert torch.equal(raw(again.keys), raw(state.keys))


def test_files_are_private(model, tmp_path):
    j, _, _ = _history(model, tmp_path, n_turns=3, compact_after=1)
    assert j.path(3).stat().st_mode & 0o077 == 0


def test_persist_bench_smoke(tmp_path):
    assert persist.main(["--turns", "6", "--conversations", "1", "--window", "60", "--turn-tokens", "20",
                         "--compact-ratio", "0.5", "--out", str(tmp_path), "--dir", str(tmp_path / "files"),
                         "--no-progress"]) == 0
    with open(tmp_path / "persist_summary.csv") as f:
        summary = next(csv.DictReader(f))
    assert int(summary["journal_compactions"]) >= 1
    assert float(summary["journal_vs_turn_kv"]) < float(summary["full_vs_turn_kv"])
    with open(tmp_path / "persist.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(int(r["journal_write_calls"]) >= int(r["journal_record_bytes"]) > 0 for r in rows)


CHILD = """
import sys, torch, random
import streaming_trt as st
from streaming_trt.contract import Geometry
from streaming_trt.engine import StreamState
from streaming_trt.serving.journal import Journal
torch.set_num_threads(1)


def as_state(x):
    s = StreamState(x.model, x.geometry, float("nan"))
    s.keys.copy_(x.cache.keys[:, 0])
    s.values.copy_(x.cache.values[:, 0])
    s.seen = x.seen[0]
    s.last_logits = x.last_logits[0].float().clone()
    return s


model = st.load_model(sys.argv[1])
j = Journal(sys.argv[2], model, Geometry({sink}, {window}), float("nan"), compact_ratio=0.5)
session = model.session({sink}, {window}, cache_fill=float("nan"))
rng = random.Random(8)
for turn in range(10_000):
    session.feed([rng.randrange(61) for _ in range(rng.randint(1, 30))], all_logits=False)
    j.append(5, as_state(session))
    print(turn, flush=True)  # acknowledged
"""


def test_sigkill_loses_no_acknowledged_turn(model, model_dir, tmp_path):
    """A process appending turns (compacting in the background) is SIGKILLed at a few moments; the
    file then holds the last acknowledged turn or the one after it, bit-exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same sums in the same order
    try:
        _kill_and_restore(model, model_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_and_restore(model, model_dir, tmp_path):
    rng = random.Random(8)
    feeds = [[rng.randrange(61) for _ in range(rng.randint(1, 30))] for _ in range(400)]
    for kill_after in (3, 11, 26):
        files = tmp_path / f"k{kill_after}"
        code = CHILD.format(sink=SINK, window=WINDOW)
        child = subprocess.Popen([sys.executable, "-c", code, str(model_dir), str(files)],
                                 stdout=subprocess.PIPE, text=True)
        acked = -1
        deadline = time.monotonic() + 120
        while acked < kill_after and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, f"the child stopped by itself (status {child.poll()})"
            acked = int(line)
        time.sleep(random.Random(kill_after).random() * 0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        acked = max([acked] + [int(line) for line in child.stdout.read().split()])
        restored = Journal(files, model, Geometry(SINK, WINDOW), NAN).load(5)
        live = model.session(SINK, WINDOW, cache_fill=NAN)
        for turn, ids in enumerate(feeds):
            live.feed(ids, all_logits=False)
            if live.seen[0] == restored.seen:
                break
        assert turn in (acked, acked + 1), f"restored turn {turn}, the last acknowledged was {acked}"
        assert_same_state(restored, live)


def test_the_session_directory_is_private_and_crash_leftovers_go(model, tmp_path):
    """0700 (ids are file names); temporary files a crash left are removed at start and counted;
    a link planted at a temporary name is replaced, never written through."""
    g = Geometry(SINK, WINDOW)
    d = tmp_path / "sessions"
    d.mkdir(mode=0o755)
    (d / f".{1:020d}.session.new").write_bytes(b"half")
    (d / f".{2:020d}.session.tmp").write_bytes(b"half")
    store = ConversationStore(model, g, d, host_bytes=0, fill_value=NAN)
    assert d.stat().st_mode & 0o077 == 0
    assert store.leftovers == 2 and not list(d.glob(".*"))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (d / f".{3:020d}.session.new").symlink_to(victim)
    session = model.session(SINK, WINDOW, cache_fill=NAN)
    session.feed([1, 2, 3])
    store.put(3, as_state(session))
    store.save(3)
    assert victim.read_text() == "keep me"
    assert_same_state(ConversationStore(model, g, d, host_bytes=0, fill_value=NAN).get(3), session)
