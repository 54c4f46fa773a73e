"""The batched scheduler in-process: every conversation's tokens equal the same conversation run
alone with ``Chat.reply`` on a batch-1 session (greedy), under random arrivals, prompts from
one token to 3x the window, mixed max_tokens, cancellations and eviction to disk and back."""
from __future__ import annotations

import random
import threading
import time

import pytest

import streaming_trt as st
from checkpoints import make_checkpoint, save_tokenizer, tiny_chat_model
from streaming_trt.runtime.chat import Chat
from streaming_trt.contract import UserError
from streaming_trt.runtime.generation import eos_ids
from streaming_trt.runtime.sampling import Sampler, SamplingParams
from streaming_trt.serving.scheduler import Overloaded, Scheduler, TurnRequest
from streaming_trt.serving.store import ConversationStore

SINK, WINDOW = 4, 40
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("sched-model"))


def alone(local, turns: list[tuple[str, int]]) -> list[list[int]]:
    """The reference: one conversation on its own batch-1 session, turn after turn."""
    model, tok = local
    session = model.session(SINK, WINDOW, cache_fill=float("nan"))
    conv = Chat(tok, eos_ids(tok, model.config))
    return [[t for t, _ in conv.reply(session, text, max_tokens, Sampler(GREEDY))] for text, max_tokens in turns]


class Waiter:
    """Collects one turn's tokens; ``wait()`` returns them once the turn is done."""

    def __init__(self):
        self.tokens, self.result, self.error, self.done = [], None, None, threading.Event()

    def on_token(self, event):
        self.tokens.append(event.token)

    def on_done(self, result, error):
        self.result, self.error = result, error
        self.done.set()

    def wait(self, timeout=120):
        assert self.done.wait(timeout), "the turn did not finish"
        if self.error is not None:
            raise self.error
        return self.tokens


def turn(sched, cid, text, max_tokens, start, **kw):
    w = Waiter()
    sched.submit(TurnRequest(cid, [{"role": "user", "content": text}], start=start, max_tokens=max_tokens,
                             sampling=GREEDY, on_token=w.on_token, on_done=w.on_done, **kw))
    return w


def make(local, tmp_path, slots=4, host_bytes=1 << 30, **kw):
    model, tok = local
    store = ConversationStore(model, st.Geometry(SINK, WINDOW), tmp_path / "sessions", host_bytes,
                              fill_value=float("nan"))
    return Scheduler(model, tok, store, slots=slots, **kw), store


def run_users(sched, scripts: dict, first_id: int, arrive=lambda: None) -> dict:
    """Each conversation of ``scripts`` from its own thread, turn after turn (``arrive()`` first);
    closes the scheduler; returns their reply tokens."""
    got, errors = {}, []

    def user(c):
        try:
            arrive()
            got[c] = [turn(sched, first_id + c, text, n, start=(i == 0)).wait()
                      for i, (text, n) in enumerate(scripts[c])]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(c,)) for c in scripts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.close()
    assert not errors, errors
    return got


def script(c: int, rng: random.Random) -> list[tuple[str, int]]:
    """A conversation of 3 turns: prompts from 1 character to 3x the window, mixed lengths."""
    lengths = [1, rng.randint(2, 20), 3 * WINDOW]
    rng.shuffle(lengths)
    return [("".join(rng.choice("abcdefgh ") for _ in range(n)).strip() or "x", rng.choice([0, 1, 5, 9]))
            for n in lengths]


@pytest.mark.parametrize("slots,host_bytes,capture", [(3, 1 << 30, False), (8, 0, False), (16, 1 << 30, True)],
                         ids=["fewer-slots", "evict-to-disk", "bucketed-decode"])
def test_batched_equals_alone(local, tmp_path, slots, host_bytes, capture):
    """8 conversations at random arrival times, more than the slots (turns wait), every idle
    conversation evicted to disk between turns (host budget 0), or decode steps over power-of-two
    buckets padded with free (NaN-filled) slots, as CUDA graphs replay them: tokens equal each one
    alone."""
    rng = random.Random(slots)
    scripts = {c: script(c, rng) for c in range(8)}
    sched, store = make(local, tmp_path, slots=slots, host_bytes=host_bytes, capture_decode=capture)
    got = run_users(sched, scripts, 100, lambda: time.sleep(rng.random() * 0.2))
    for c, turns in scripts.items():
        assert got[c] == alone(local, turns), f"conversation {c}"
    if host_bytes == 0:
        assert store.loads >= 8  # every later turn came back from disk


def test_cancel_mid_reply_and_during_prefill(local, tmp_path):
    """A reply cancelled after 3 tokens keeps those tokens (and what closes the reply); a turn
    cancelled while its prompt is still being fed leaves the conversation as it was."""
    sched, store = make(local, tmp_path, token_budget=2)
    turn(sched, 1, "hello there", 4, start=True).wait()
    seen_before = store.seen(1)
    count = {"n": 0}

    def cancel_after_3():
        return count["n"] >= 3

    w = Waiter()
    w.on_token = lambda e: (w.tokens.append(e.token), count.__setitem__("n", count["n"] + 1))
    sched.submit(TurnRequest(1, [{"role": "user", "content": "go on"}], max_tokens=40, sampling=GREEDY,
                             on_token=w.on_token, on_done=w.on_done, cancelled=cancel_after_3))
    assert len(w.wait()) == 3 and w.result.finish_reason == "cancelled"
    reference = alone(local, [("hello there", 4), ("go on", 3)])
    assert [w.tokens] == reference[1:]
    after_cancel = store.seen(1)
    assert after_cancel > seen_before

    w2 = turn(sched, 1, "y" * (3 * WINDOW), 5, start=False, cancelled=lambda: True)
    w2.wait()
    assert w2.result.finish_reason == "cancelled" and w2.tokens == [] and store.seen(1) == after_cancel
    # the conversation goes on exactly as if the cancelled turn had never been sent
    last = turn(sched, 1, "and then", 4, start=False).wait()
    sched.close()
    assert last == alone(local, [("hello there", 4), ("go on", 3), ("and then", 4)])[2]


def test_bad_requests_and_overload(local, tmp_path):
    sched, store = make(local, tmp_path, slots=1, max_queue=1)
    with pytest.raises(UserError, match="unknown"):
        turn(sched, 5, "hi", 2, start=False).wait()
    with pytest.raises(UserError, match="max_tokens"):
        turn(sched, 5, "hi", 10**6, start=True).wait()
    with pytest.raises(UserError, match="last message"):
        w = Waiter()
        sched.submit(TurnRequest(5, [{"role": "assistant", "content": "x"}], start=True, on_done=w.on_done))
        w.wait()
    # one turn decoding, one waiting: the third is refused at once, not queued
    release = threading.Event()
    first = turn(sched, 6, "a" * 60, 30, start=True, cancelled=lambda: release.is_set())
    second = turn(sched, 7, "b", 2, start=True)
    with pytest.raises(Overloaded, match="busy"):
        turn(sched, 8, "c", 2, start=True)
    release.set()
    first.wait()
    second.wait()
    sched.close()
    assert not store.exists(8)


def test_identical_turns_beside_a_long_cancelled_decode(local, tmp_path):
    """A 120-token reply runs (and is cancelled mid-way) while four identical fresh turns are
    prefilled and decoded beside it: the four equal each other and the turn run alone, and the
    long reply's tokens so far equal its own run alone."""
    sched, store = make(local, tmp_path, slots=6, token_budget=8)
    count = {"n": 0}
    long_turn = Waiter()
    long_turn.on_token = lambda e: (long_turn.tokens.append(e.token), count.__setitem__("n", count["n"] + 1))
    sched.submit(TurnRequest(1, [{"role": "user", "content": "tell me a long story " * 3}], start=True,
                             max_tokens=120, sampling=GREEDY, on_token=long_turn.on_token, on_done=long_turn.on_done,
                             cancelled=lambda: count["n"] >= 60))
    while count["n"] < 10:
        time.sleep(0.01)
    same = [turn(sched, 10 + c, "the very same question", 12, start=True) for c in range(4)]
    replies = [w.wait() for w in same]
    long_tokens = long_turn.wait()
    sched.close()
    expected = alone(local, [("the very same question", 12)])[0]
    assert replies == [expected] * 4
    assert long_tokens == alone(local, [("tell me a long story " * 3, 120)])[0][: len(long_tokens)]
    assert long_turn.result.finish_reason in ("cancelled", "stop", "length")


def test_recall_conversations_equal_their_run_alone(local, tmp_path):
    """With recall every conversation runs on its own session with its block store: under
    concurrent turns, prompts past the window and eviction to disk between turns (the files carry
    the store), each equals the same conversation alone with recall."""
    recall = st.Recall(block_size=8, top_k=2, chunk=16)
    model, tok = local
    store = ConversationStore(model, st.Geometry(SINK, WINDOW), tmp_path / "sessions", 0, fill_value=float("nan"))
    sched = Scheduler(model, tok, store, slots=3, token_budget=20, recall=recall)
    scripts = {c: [("q" * (3 * WINDOW), 6), (f"then {c}", 9), ("z" * WINDOW, 5)] for c in range(4)}
    got = run_users(sched, scripts, 300)
    assert store.loads >= 8
    for c, turns in scripts.items():
        session = model.session(SINK, WINDOW, cache_fill=float("nan"), recall=recall)
        conv = Chat(tok, eos_ids(tok, model.config))
        want = [[t for t, _ in conv.reply(session, text, n, Sampler(GREEDY))] for text, n in turns]
        assert min(session.recall.count) >= 2 * recall.top_k  # blocks were evicted and could be recalled
        assert got[c] == want, f"conversation {c}"


def test_the_scheduler_imports_no_torch():
    """The scheduler decides who runs and what happens to each turn, with token ids: no module it
    imports itself is torch (the runner below it owns every tensor)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import streaming_trt.serving.scheduler as scheduler

    tree = ast.parse(Path(scheduler.__file__).read_text())
    named = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    named |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert not {m for m in named if m == "torch" or m.startswith("torch.")}, named
    probe = ("import types, streaming_trt.serving.scheduler as s; print(sorted(k for k, v in vars(s).items() "
             "if (getattr(v, '__module__', None) or getattr(v, '__name__', '') or '').split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"scheduler.py holds torch names: {out.stdout}"


def test_sink_token_model_conversations_equal_their_run_alone(tmp_path):
    """A model pre-trained with a sink token: the runner's feed path (the one Session uses) gives
    each new conversation token 0 once, batched turns equal each conversation alone."""
    import json

    d = tmp_path / "sink-model"
    make_checkpoint(d, "llama", seed=4, vocab_size=97)
    save_tokenizer(d, vocab_size=97)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, sink_token_id=1)))
    sink_local = (st.load_model(d), st.load_tokenizer(d))
    assert sink_local[0].config.sink_token_id == 1
    sched, _ = make(sink_local, tmp_path, slots=2)
    scripts = {c: [(f"hello {c}" * (c + 1), 5), ("and more", 4)] for c in range(3)}
    got = run_users(sched, scripts, 500)
    for c, turns in scripts.items():
        assert got[c] == alone(sink_local, turns), f"conversation {c}"


def test_a_turn_without_a_distribution_fails_alone(local, tmp_path, monkeypatch):
    """One row's sampler finds no distribution mid-reply: only its turn fails (BAD_REQUEST, the
    reason named), the turn beside it goes on, and its conversation continues as before that turn."""
    from streaming_trt.runtime.sampling import SamplingError
    from streaming_trt.serving.protocol import ErrorKind, kind_of

    sched, store = make(local, tmp_path, slots=4)
    real = sched.runner.sampler

    class Poisoned(Sampler):
        draws = 0

        def __call__(self, logits):
            Poisoned.draws += 1
            if Poisoned.draws == 3:
                raise SamplingError("no next-token distribution for row(s) [0]: test")
            return super().__call__(logits)

    monkeypatch.setattr(sched.runner, "sampler", lambda p: Poisoned(p) if p.seed == 4242 else real(p))
    a1, b1 = turn(sched, 31, "hello", 4, start=True), turn(sched, 32, "other", 4, start=True)
    a1.wait(), b1.wait()
    w = Waiter()
    sched.submit(TurnRequest(31, [{"role": "user", "content": "poisoned"}], max_tokens=8, on_token=w.on_token,
                             sampling=SamplingParams(temperature=0.0, seed=4242), on_done=w.on_done))
    b2 = turn(sched, 32, "more", 8, start=False)
    with pytest.raises(UserError, match="no next-token distribution") as e:
        w.wait()
    assert kind_of(e.value) is ErrorKind.BAD_REQUEST
    b2_tokens = b2.wait()
    a3 = turn(sched, 31, "and then", 4, start=False).wait()
    sched.close()
    assert b2_tokens == alone(local, [("other", 4), ("more", 8)])[1]
    assert a3 == alone(local, [("hello", 4), ("and then", 4)])[1]  # the failed turn left no trace


def test_waiting_turns_whose_client_left_never_run_and_busy_files_are_not_reaped(local, tmp_path):
    """A turn cancelled while it waits for a slot is dropped at admission (nothing fed, no file);
    the disk policy applied after a save never deletes a conversation with a turn in flight."""
    sched, store = make(local, tmp_path, slots=1)
    release = threading.Event()
    first = turn(sched, 41, "a" * 40, 30, start=True, cancelled=lambda: release.is_set())
    gone = turn(sched, 42, "b", 2, start=True, cancelled=lambda: True)
    assert gone.wait() == [] and gone.result.finish_reason == "cancelled" and gone.result.prompt_tokens == 0
    deadline = time.monotonic() + 60
    while not first.tokens and time.monotonic() < deadline:  # the first turn runs (its file will exist)
        time.sleep(0.01)
    release.set()
    first.wait()
    sched.close()
    assert store.exists(41) and not store.exists(42)
    store.idle_ttl = 1e-9  # everything idle is now expired
    store.put(43, store.get(41))
    store.save(43, in_use=frozenset({41}))
    assert store.exists(41) and store.exists(43)
    store.save(43)
    if store.exists(41):  # its file changed after the listing (a compaction): reaping defers it one pass
        store.reap()
    assert not store.exists(41)


def test_a_turn_whose_save_failed_leaves_no_trace(local, tmp_path, monkeypatch):
    """The disk refuses one turn's save: that turn fails (INTERNAL), and the conversation continues
    from the turn before it, so a client that resends the turn has it fed once, not twice."""
    sched, store = make(local, tmp_path, slots=2)
    turn(sched, 51, "hello", 4, start=True).wait()
    real = store.journal.save
    calls = []

    def full_disk(cid, state):
        calls.append(cid)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(cid, state)

    monkeypatch.setattr(store.journal, "save", full_disk)
    with pytest.raises(UserError, match="could not be saved"):
        turn(sched, 51, "go on", 5, start=False).wait()
    resent = turn(sched, 51, "go on", 5, start=False).wait()
    sched.close()
    assert resent == alone(local, [("hello", 4), ("go on", 5)])[1]
