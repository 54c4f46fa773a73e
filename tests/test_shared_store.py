"""Several servers on one session directory (replicas, Dynamo workers; NFS): two ConversationStores
(and two Schedulers) on one directory in one process stand for two servers. A conversation another
server saved is found; a copy in memory older than the file is never used; reaping never deletes a
leased conversation; two servers never both continue one conversation (the second is refused,
retryable); a dead server's lease is taken over after its TTL; a torn write is still told apart
from another writer's turn. Every restore is checked bit-exact against the state that was saved."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import streaming_trt as st
from checkpoints import tiny_chat_model
from streaming_trt.engine import StreamState
from streaming_trt.serving.journal import FileChanged, Journal
from streaming_trt.serving.lease import LeaseHeld, Leases
from streaming_trt.serving.protocol import ErrorKind
from streaming_trt.serving.scheduler import Scheduler, TurnRequest
from streaming_trt.serving.store import ConversationStore
from test_scheduler import GREEDY, SINK, WINDOW, Waiter, alone

NAN = float("nan")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("shared-model"))


def store(local, directory, host_bytes=1 << 30, **kw) -> ConversationStore:
    return ConversationStore(local[0], st.Geometry(SINK, WINDOW), directory, host_bytes, fill_value=NAN, **kw)


class Live:
    """A conversation run on a batch-1 session: ``feed(ids)`` then ``state()``, a StreamState copy."""

    def __init__(self, model):
        self.session = model.session(SINK, WINDOW, cache_fill=NAN)

    def feed(self, ids):
        self.session.feed(ids, all_logits=False)
        return self

    def state(self) -> StreamState:
        s = self.session
        state = StreamState(s.model, s.geometry, NAN)
        state.keys.copy_(s.cache.keys[:, 0])
        state.values.copy_(s.cache.values[:, 0])
        state.seen = s.seen[0]
        state.last_logits = s.last_logits[0].float().clone()
        return state


def same(a: StreamState, b: StreamState) -> bool:
    raw = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (NaN equals NaN of the same bits)
    return (a.seen == b.seen and torch.equal(raw(a.keys), raw(b.keys)) and torch.equal(raw(a.values), raw(b.values))
            and torch.equal(raw(a.last_logits), raw(b.last_logits)))


def save_turn(s: ConversationStore, cid: int, state: StreamState) -> None:
    """One turn's end: its state put, then saved (``save`` holds the lease while it writes)."""
    s.put(cid, state)
    s.save(cid)


def test_a_conversation_another_server_saved_is_found(local, tmp_path):
    """Before: a store learned the directory's files at start-up only: "unknown"."""
    a, b = store(local, tmp_path), store(local, tmp_path)
    live = Live(local[0]).feed([5, 6, 7])
    save_turn(a, 3, live.state())
    assert b.exists(3)
    assert same(b.get(3), live.state())
    a.end(3)
    assert not b.exists(3)
    with pytest.raises(st.UserError, match="unknown"):
        b.get(3)


def test_a_stale_copy_in_memory_is_never_used(local, tmp_path):
    """The conversation moves A -> B -> A: A's copy in memory is of the first turn, its file of the
    second; A reads the file (before: A continued from its stale copy, and its journal appended a
    record after the other server's)."""
    a = store(local, tmp_path)
    live = Live(local[0]).feed([1, 2, 3, 4])
    save_turn(a, 8, live.state())
    b = store(local, tmp_path)  # started after the first turn: B knew the file at start-up too
    assert same(a.get(8), live.state()) and 8 in a.resident
    assert same(b.get(8), live.state())
    save_turn(b, 8, live.feed(list(range(10, 40))).state())  # past the window: the ring wraps
    assert same(a.get(8), live.state())
    save_turn(a, 8, live.feed([41, 42]).state())  # A continues and saves: the chain stays whole
    assert same(store(local, tmp_path, host_bytes=0).get(8), live.state())
    assert same(b.get(8), live.state())
    assert a.stale == b.stale == 1


def test_reaping_never_deletes_a_leased_conversation(local, tmp_path):
    """B's idle TTL and disk budget skip the conversation A holds (a turn in flight on A) and delete
    an expired one nobody holds (before: B deleted A's file, or never saw it)."""
    a = store(local, tmp_path)
    b = store(local, tmp_path, idle_ttl=60, disk_bytes=0, rescan_seconds=0)
    save_turn(a, 1, Live(local[0]).feed([1, 2]).state())
    save_turn(a, 2, Live(local[0]).feed([3, 4]).state())
    a.take(1)  # A is running a turn of conversation 1
    later = time.time() + 3600
    assert b.reap(now=later) == [2]
    assert a.path(1).exists() and not a.path(2).exists()
    a.release(1)
    assert b.reap(now=later) == [1] and not a.path(1).exists()


def test_sidecars_go_with_their_conversation(local, tmp_path):
    """The gateway's map entry and the Dynamo worker's history record beside a session file are
    deleted when the conversation is reaped or ended (before: Dynamo's records stayed forever)."""
    from streaming_trt.serving.dynamo import history_path

    s = store(local, tmp_path, idle_ttl=60, rescan_seconds=0)
    for cid in (1, 2):
        save_turn(s, cid, Live(local[0]).feed([cid, 5]).state())
        s.sidecar(cid, ".history").write_text("{}")
        history_path(tmp_path, cid).write_text("{}")
    assert s.sidecar(1, ".dynamo") == history_path(tmp_path, 1)
    with pytest.raises(ValueError, match="sidecar"):
        s.sidecar(1, ".json")
    s.end(2)
    assert not s.path(2).exists() and not s.sidecar(2, ".history").exists() and not history_path(tmp_path, 2).exists()
    assert history_path(tmp_path, 1).exists()
    assert s.reap(now=time.time() + 3600) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leases"]


def test_two_servers_never_both_continue_one_conversation(local, tmp_path):
    a, b = store(local, tmp_path), store(local, tmp_path)
    live = Live(local[0]).feed([9, 9, 9])
    save_turn(a, 4, live.state())
    a.take(4)
    with pytest.raises(LeaseHeld) as refused:
        b.take(4)
    assert refused.value.kind is ErrorKind.CONVERSATION_BUSY and "retry" in str(refused.value)
    b.put(4, Live(local[0]).feed([1]).state())
    with pytest.raises(LeaseHeld):  # B cannot save, end or reap it either
        b.save(4)
    b.forget(4)
    with pytest.raises(LeaseHeld):
        b.end(4)
    assert same(store(local, tmp_path, host_bytes=0).get(4), live.state())
    a.release(4)
    b.take(4)  # free again
    b.release(4)


def test_the_journal_never_appends_over_another_writers_turn(local, tmp_path):
    """Two journals (a lease lost to a hung server) continue one conversation from the same turn:
    the second append is refused and the first writer's turn stays (before: the second cut the
    first's record off and wrote its own, a fork nobody noticed). A torn record (a crash of a
    writer that never acknowledged it) is still cut off and written over."""
    model = local[0]
    j1, j2 = Journal(tmp_path, model, st.Geometry(SINK, WINDOW), NAN), Journal(tmp_path, model, st.Geometry(SINK, WINDOW), NAN)
    base = Live(model).feed([1, 2, 3])
    j1.append(6, base.state())
    assert j2.load(6).seen == 3
    first = Live(model).feed([1, 2, 3]).feed([4, 5])
    j1.append(6, first.state())
    with pytest.raises(FileChanged) as refused:
        j2.append(6, Live(model).feed([1, 2, 3]).feed([7, 8]).state())
    assert refused.value.kind is ErrorKind.CONVERSATION_BUSY
    assert same(Journal(tmp_path, model, st.Geometry(SINK, WINDOW), NAN).load(6), first.state())
    # a torn record after the end j1 knows: j1's next turn cuts it off
    size = j1.path(6).stat().st_size
    with open(j1.path(6), "ab") as f:
        f.write(b"TURN" + b"\x00" * 7)
    nxt = first.feed([6])
    j1.append(6, nxt.state())
    assert j1.path(6).stat().st_size > size
    assert same(Journal(tmp_path, model, st.Geometry(SINK, WINDOW), NAN).load(6), nxt.state())


def test_a_dead_servers_lease_is_taken_over_after_its_ttl(local, tmp_path):
    """A takes a conversation and dies (no renewal): B is refused until the TTL passes, then takes it;
    A, were it only hung, finds its lease gone at its next write (fencing) and writes nothing."""
    now = [time.time()]
    a = store(local, tmp_path)
    live = Live(local[0]).feed([2, 4, 6])
    save_turn(a, 9, live.state())
    a.leases.stopped.set()  # "dies": no more renewals
    a.take(9)
    b = store(local, tmp_path)
    b.leases.clock = lambda: now[0]
    with pytest.raises(LeaseHeld):
        b.take(9)
    now[0] += b.leases.ttl + 1
    b.take(9)
    assert same(b.get(9), live.state())
    a.put(9, Live(local[0]).feed([2, 4, 6, 8]).state())
    with pytest.raises(LeaseHeld, match="took it over"):
        a.save(9)
    b.put(9, live.feed([3]).state())
    b.save(9)
    b.release(9)
    assert same(store(local, tmp_path, host_bytes=0).get(9), live.state())


def test_a_lease_of_a_killed_process_on_this_machine_is_taken_at_once(tmp_path):
    """A server restarted after a SIGKILL takes its conversations back without waiting for the TTL:
    the holder was a process of this machine that no longer runs. A live holder keeps its lease."""
    code = ("import sys, time; from streaming_trt.serving.lease import Leases; "
            "Leases(sys.argv[1], ttl=600, renew=False).take(5); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = Leases(tmp_path, ttl=600, renew=False)
        with pytest.raises(LeaseHeld):
            mine.take(5)
    finally:
        holder.kill()
        holder.wait(30)
    mine.take(5)
    mine.check(5)


def test_leases_are_exclusive_under_contention(tmp_path):
    """Eight would-be holders race for one lease, many times: exactly one wins each round."""
    holders = [Leases(tmp_path, ttl=30, renew=False) for _ in range(8)]
    for round_ in range(20):
        wins, barrier = [], threading.Barrier(len(holders))

        def race(lease):
            barrier.wait()
            try:
                lease.take(round_)
                wins.append(lease)
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=race, args=(h,)) for h in holders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, round_
        wins[0].check(round_)
        wins[0].release(round_)
    assert not any(os.listdir(d) for d in (tmp_path / "leases").iterdir())  # every holding let go


# ----------------------------------------------------------------- two schedulers on one directory
def chat(sched, cid, text, max_tokens, start, on_token=None):
    w = Waiter()

    def token(event):
        w.on_token(event)
        if on_token is not None:
            on_token(event)

    sched.submit(TurnRequest(cid, [{"role": "user", "content": text}], start=start, max_tokens=max_tokens,
                             sampling=GREEDY, on_token=token, on_done=w.on_done))
    return w


def test_a_conversation_moving_between_servers_continues_exactly(local, tmp_path):
    """Turns alternate between two servers with host memory (each keeps a copy of the turns it
    ran): every reply equals the conversation run alone (before: the second server did not know
    the conversation, and the first continued from its stale copy)."""
    model, tok = local
    a, b = (Scheduler(model, tok, store(local, tmp_path), slots=2) for _ in range(2))
    script = [("hello there", 5), ("more", 4), ("and " * 30, 3), ("last", 6)]
    try:
        got = [chat([a, b][i % 2], 70, text, n, start=(i == 0)).wait() for i, (text, n) in enumerate(script)]
    finally:
        a.close()
        b.close()
    assert got == alone(local, script)
    assert a.store.stale >= 1
    assert not any(os.listdir(d) for d in (tmp_path / "leases").iterdir()), "a lease outlived its turn"


def test_the_same_turn_sent_to_two_servers_runs_once(local, tmp_path):
    """A failover sends a conversation's turn to B while A still runs one: B refuses it after
    ``lease_wait`` (CONVERSATION_BUSY, retryable); a turn sent to B that A releases in time waits
    for the lease and continues from A's turn; every turn is fed once."""
    model, tok = local
    a, b = (Scheduler(model, tok, store(local, tmp_path), slots=2, lease_wait=0.5) for _ in range(2))
    go, started = threading.Event(), threading.Event()

    def hold(event):  # A's turn stays in flight until B has been refused
        started.set()
        go.wait(30)

    try:
        chat(a, 71, "hello", 3, start=True).wait()
        running = chat(a, 71, "go on", 6, start=False, on_token=hold)
        assert started.wait(60)
        refused = chat(b, 71, "go on", 6, start=False)
        with pytest.raises(st.UserError, match="retry") as e:
            refused.wait()
        assert e.value.kind is ErrorKind.CONVERSATION_BUSY
        b.lease_wait = 60.0
        late = chat(b, 71, "then", 4, start=False)  # waits for the lease (the batch does not)
        time.sleep(0.2)
        go.set()
        second = running.wait()
        third = late.wait()
    finally:
        go.set()
        a.close()
        b.close()
    assert [second, third] == alone(local, [("hello", 3), ("go on", 6), ("then", 4)])[1:]
    assert not any(os.listdir(d) for d in (tmp_path / "leases").iterdir()), "a lease outlived its turn"


def test_files_are_read_off_the_scheduler_thread(local, tmp_path, monkeypatch):
    """A continuation whose state must be read from its file (slow storage: 1.5 s here) waits for it
    on the loader thread while another conversation's reply streams on (before: the scheduler's
    thread read and checked the file, and every stream stalled for as long)."""
    model, tok = local
    sched = Scheduler(model, tok, store(local, tmp_path, host_bytes=0), slots=2)
    real, readers, began = sched.store.journal.load, [], []

    def slow_load(cid):
        readers.append(threading.current_thread().name)
        began.append(time.monotonic())
        time.sleep(1.5)
        return real(cid)

    try:
        chat(sched, 81, "hello", 3, start=True).wait()
        monkeypatch.setattr(sched.store.journal, "load", slow_load)
        stamps, streaming = [], threading.Event()

        def tick(event):
            stamps.append(time.monotonic())
            if len(stamps) == 3:
                streaming.set()

        long = chat(sched, 82, "tell me a long story", 400, start=True, on_token=tick)
        assert streaming.wait(60)
        cont = chat(sched, 81, "go on", 4, start=False).wait()
        long.wait()
    finally:
        sched.close()
    assert readers and "streaming-trt-scheduler" not in readers, readers
    while_read = [t for t in stamps if began[0] < t < began[0] + 1.5]
    assert len(while_read) >= 3, f"{len(while_read)} tokens streamed while the file was read"
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if a >= began[0] - 0.05]
    assert max(gaps) < 1.0, f"a token waited {max(gaps):.2f} s behind the load"
    assert cont == alone(local, [("hello", 3), ("go on", 4)])[1]
