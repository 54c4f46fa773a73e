"""Continuous batching: every conversation turn in flight advances in one step over a pool of slots.

A sink + ring cache has a fixed size per conversation (S + W slots), so the pool is one batched
cache of ``slots`` streams allocated once: no paging, no preemption, and the server's capacity is
an exact number. The pool and every other tensor belong to the
:class:`~streaming_trt.engine.BatchRunner`; this module decides only who runs and what happens to
each turn, with token ids (it imports no torch). A conversation holds a slot only while one of its
turns is in flight; between turns its :class:`~streaming_trt.engine.StreamState` waits in the
:class:`ConversationStore` (host memory, then disk).

Each iteration of the scheduler's thread (Sarathi-Serve's stall-free batching) is one forward:

1. it admits waiting turns into free slots (at most one turn per conversation at a time, in
   arrival order);
2. draws one token for every decoding slot (a reply that has not started waits, once, when the
   prompts still to feed fit this step's budget, so that turns arriving together start together
   and no first gap is stalled by them);
3. and feeds, in one batched forward, those tokens, what closes the replies that ended in the
   step before, and prompt chunks of the turns still prefilling (oldest first) within the step's
   token budget (``token_budget`` minus the decoding slots, at least a quarter of it; the whole
   budget times four when nothing decodes), so a prompt longer than the budget is spread over
   several steps (pieces are whole multiples of the runner's ``quantum``). The runner packs the
   ragged rows: a step costs the tokens it feeds, not the longest row times the rows.

With recall (:mod:`streaming_trt.runtime.recall`) every conversation keeps its own block store, and its
rows decode in the same batched forward as all the others.

Every row has its own sampling parameters, seed, stop tokens, stop strings and max_tokens;
cancellation is checked between steps, during prefill too. What closes a finished reply is fed as
one chunk, as ``Chat.reply`` feeds it, in the next step's forward; the turn's state is then
copied out of its slot;
it is saved by a writer thread, and only then is the turn's final response sent, so a reply the
client saw complete survives a SIGKILL.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from ..contract import UserError
from ..runtime.chat import Chat
from ..engine import BatchRunner
from ..runtime.generation import StopStrings, eos_ids
from ..runtime.generation import IncrementalDecoder
from .lease import LeaseHeld
from .protocol import ErrorKind, Overloaded, ServingError, TokenEvent, TurnRequest, TurnResult

__all__ = ["Scheduler", "Overloaded", "TokenEvent", "TurnRequest", "TurnResult"]

_NOT_PREPARED, _PREPARING, _ENDED, _STOP = object(), object(), object(), object()  # a waiting turn at the loader
CPU_TOKEN_BUDGET = 1024  # a step's tokens on a CPU: a wave of 16 chat prompts fits one step (Scheduler's docstring)


class _Turn:
    """A turn inside the scheduler: its conversation, what is left to feed, its reply so far."""

    def __init__(self, req: TurnRequest, conversation: Chat, ids: list[int], max_tokens: int, sampler):
        self.req, self.conversation, self.ids = req, conversation, ids
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.sampler.observe(list(ids))  # penalties count this turn's prompt and reply
        self.decoder = IncrementalDecoder(conversation.tokenizer)
        self.stops = StopStrings(list(req.stop)) if req.stop else None
        self.seq = 0                  # admission order
        self.fed = 0                  # prompt ids fed so far
        self.row: int | None = None
        self.decoding = False         # the prompt is fed: the turn draws tokens
        self.waited = False           # its first draw waited one step for the prompts admitted after it
        self.forced: list[int] = []   # ids fed without sampling (what closes the reply)
        self.reply_ids: list[int] = []  # what the reply fed: generated ids, then its closing
        self.count, self.finish = 0, None
        self.last: int | None = None  # the last generated id
        self.stops_hit, self.held = False, ""  # a stop string ended the reply; text released at the end


class Scheduler:
    """Batches turns of many conversations on one model (see the module docstring).

    Args:
        model: a :class:`~streaming_trt.runtime.model.Transformer`.
        tokenizer: its tokenizer (chat template).
        store: a :class:`~streaming_trt.serving.store.ConversationStore` (idle conversations).
        slots: B, conversations whose turns run at once (one batched cache of B streams).
        token_budget: tokens one step feeds, decode and prompt tokens together (default: 512 on
            CUDA, where a step is bound by memory traffic and a prompt chunk of that size costs
            about what the decode step costs; 1024 on a CPU, where a step costs what all its
            tokens cost: there a chunk of any useful size already multiplies the step's time, so
            the prompts admitted together are fed in as few steps as possible, and a stream's
            token gaps are stalled once per wave of arriving prompts, not on most of its steps
            (the inter-token p99 counts the stalled gaps; bench/RESULTS.md)).
        max_queue: turns that may wait for a slot; beyond, :meth:`submit` raises :class:`Overloaded`.
        max_new_tokens / max_new_tokens_limit: a request's default and largest reply length.
        max_input_bytes: the largest MESSAGES a request may send.
        capture_decode: run decode steps over a batch bucket (the next power of two of decoding
            slots, padded with free slots), replayed from one CUDA graph per bucket on CUDA
            (default: on CUDA only). Elsewhere the same captured step runs eagerly (how the tests
            check the padding).
        recall: a :class:`~streaming_trt.runtime.recall.Recall`: every conversation keeps its evicted tokens
            in a block store of its own (its rows still decode in the batched step).
        lease_wait: seconds a turn waits (in the queue, the batch runs on) for its conversation's
            lease while another server holds it (finishing a turn, compacting its file, or dead
            until its lease expires); then it is refused as CONVERSATION_BUSY (retryable). Default:
            1.5 x the store's lease TTL, so a turn whose previous server died is served once its
            lease expires.
    """

    def __init__(self, model, tokenizer, store, slots: int = 16, token_budget: int | None = None, max_queue: int = 256,
                 max_new_tokens: int = 256, max_new_tokens_limit: int = 4096, max_input_bytes: int = 256 * 1024,
                 capture_decode: bool | None = None, recall=None, lease_wait: float | None = None):
        if token_budget is None:
            token_budget = 512 if model.device.type == "cuda" else CPU_TOKEN_BUDGET
        for name, value, low in (("slots", slots, 1), ("token_budget", token_budget, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        self.tokenizer, self.store = tokenizer, store
        self.runner = BatchRunner(model, store.geometry, slots, fill_value=store.fill_value, recall=recall,
                                  capture_decode=capture_decode)
        self.rows: list[_Turn | None] = [None] * slots
        self.token_budget, self.max_queue = token_budget, max_queue
        self.max_new_tokens, self.max_new_tokens_limit = max_new_tokens, max_new_tokens_limit
        self.max_input_bytes = max_input_bytes
        self.lease_wait = 1.5 * store.leases.ttl if lease_wait is None else lease_wait
        self.beat = time.monotonic()  # the loop's last round: leases are renewed only while it goes round
        store.leases.alive = lambda: time.monotonic() - self.beat < store.leases.ttl / 2 or not self.thread.is_alive()
        self.loads: queue.SimpleQueue = queue.SimpleQueue()  # turns for the loader to prepare
        self.prepared: dict[int, object] = {}  # id(req) -> _PREPARING, or what the loader prepared
        self.stop_ids = eos_ids(tokenizer, model.config)
        self.vocab_size = model.config.vocab_size
        self.encoder = Chat(tokenizer, self.stop_ids).encoder
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: collections.deque = collections.deque()  # (TurnRequest) in arrival order
        self.busy: set[int] = set()           # conversations with a turn admitted or being saved
        self.queued = 0                       # requests submitted and not yet admitted
        self.lock = threading.Lock()
        self.steps, self.admitted = 0, 0
        self.stopping = threading.Event()
        self.writes: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name="streaming-trt-writer", daemon=True)
        self.loader = threading.Thread(target=self._load_loop, name="streaming-trt-loader", daemon=True)
        self.thread = threading.Thread(target=self._loop, name="streaming-trt-scheduler", daemon=True)
        self.writer.start()
        self.loader.start()
        self.thread.start()

    # ----------------------------------------------------------------- the caller's side
    def submit(self, req: TurnRequest) -> None:
        """Queue a turn; returns at once. Raises :class:`Overloaded` when every slot is busy and
        ``max_queue`` turns already wait (nothing is queued then), :class:`ServingError` when
        ``req`` exceeds the server's limits."""
        req.within(self.max_new_tokens_limit)
        with self.lock:
            if self.queued >= self.max_queue + self.free_slots():
                raise Overloaded(f"server busy: all {len(self.rows)} slots are in use and {self.max_queue} turns are "
                                 "waiting; retry in a moment")
            self.queued += 1
        self.inbox.put(("turn", req))

    def free_slots(self) -> int:
        return sum(r is None for r in self.rows)

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the turns in flight; waiting turns get an error."""
        self.stopping.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout)
        self.loads.put(_STOP)
        self.loader.join(timeout)
        self.writes.put(None)
        self.writer.join(timeout)

    # ----------------------------------------------------------------- the scheduler's thread
    def _loop(self) -> None:
        while True:
            self.beat = time.monotonic()
            active = any(r is not None for r in self.rows)
            self._drain(block=not active and not self.stopping.is_set())
            if self.stopping.is_set() and not active:
                for req in self.waiting:
                    prepared = self.prepared.pop(id(req), _NOT_PREPARED)
                    if not (prepared in (_NOT_PREPARED, _PREPARING) or isinstance(prepared, BaseException)
                            or prepared is _ENDED):
                        self.writes.put(("release", req.cid))
                    self._done(req, None, ServingError("the server is shutting down", ErrorKind.SHUTTING_DOWN))
                self.waiting.clear()
                return
            self._admit()
            try:
                self._step()
            except Exception as e:  # a bug: fail the turns in flight, keep serving the others
                for turn in [t for t in self.rows if t is not None]:
                    self._release(turn, error=ServingError(f"internal error: {type(e).__name__}: {e}",
                                                           ErrorKind.INTERNAL))
            self.steps += 1

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "turn":
                self.waiting.append(value)
            elif kind == "saved":
                self.busy.discard(value)
            elif kind == "prepared":
                req, outcome = value
                self.prepared[id(req)] = outcome
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Start waiting turns, oldest first, one per conversation at a time. A turn is first
        prepared by the loader thread (its conversation's lease taken, its state read and checked
        from the file when it is not in memory): the turn waits for that, the batch does not."""
        blocked, kept = set(), collections.deque()
        while self.waiting:
            req = self.waiting.popleft()
            if req.cid in self.busy or req.cid in blocked:
                blocked.add(req.cid)
                kept.append(req)
                continue
            prepared = self.prepared.pop(id(req), _NOT_PREPARED)
            if req.cancelled() and prepared is not _PREPARING:  # its client left while it waited: nothing of it runs
                with self.lock:
                    self.queued -= 1
                self._done(req, TurnResult(0, 0, "cancelled", self._seen_before(req, prepared)), None)
                continue
            if prepared is _PREPARING or (prepared is _NOT_PREPARED and self.free_slots() <= self._preparing()
                                          and not self._is_end_only(req)):
                if prepared is _PREPARING:
                    self.prepared[id(req)] = prepared
                kept.append(req)
                blocked.add(req.cid)
                continue
            if prepared is _NOT_PREPARED:  # to the loader; the turn waits here meanwhile
                self.prepared[id(req)] = _PREPARING
                self.loads.put(req)
                kept.append(req)
                blocked.add(req.cid)
                continue
            with self.lock:
                self.queued -= 1
            if isinstance(prepared, BaseException):  # the lease or the file refused it; nothing is held
                self._done(req, None, prepared)
                continue
            try:
                self._start(req, prepared)
            except BaseException as e:
                self.writes.put(("release", req.cid))
                self._done(req, None, e if isinstance(e, UserError) else
                           ServingError(f"internal error: {type(e).__name__}: {e}", ErrorKind.INTERNAL))
        self.waiting = kept

    def _preparing(self) -> int:
        """Turns handed to the loader (or prepared by it) and not started yet: each has a slot kept."""
        return len(self.prepared)

    def _seen_before(self, req: TurnRequest, prepared) -> int:
        """The token count of a cancelled waiting turn's conversation (its lease let go)."""
        if prepared is _NOT_PREPARED:  # rare: cancelled before the loader saw it
            fresh = req.start and not req.resume
            return self.store.seen(req.cid) if not fresh and self.store.exists(req.cid) else 0
        if isinstance(prepared, BaseException) or prepared is _ENDED:  # no lease held
            return 0
        self.writes.put(("release", req.cid))
        return 0 if prepared is None or prepared is _ENDED else prepared.seen

    @staticmethod
    def _is_end_only(req: TurnRequest) -> bool:
        return req.end and req.token_ids is None and req.messages in ([], "[]", b"[]")

    # ----------------------------------------------------------------- the loader's thread
    def _load_loop(self) -> None:
        """Prepare turns for :meth:`_admit`: take the conversation's lease (waiting up to
        ``lease_wait`` while another server holds it), then read its state (END: delete it; a new
        conversation: delete what the id held). Reports ``("prepared", (req, outcome))``: the
        state (None for a new conversation, ``_ENDED``), or the error that refuses the turn."""
        pending: list[tuple[TurnRequest, float]] = []  # waiting for a lease another server holds
        while True:
            try:
                req = self.loads.get(timeout=0.05) if pending else self.loads.get()
            except queue.Empty:
                req = None
            if req is _STOP:
                for waiting, _ in pending:
                    self.inbox.put(("prepared", (waiting, ServingError("the server is shutting down",
                                                                       ErrorKind.SHUTTING_DOWN))))
                return
            if req is not None:
                pending.append((req, time.monotonic()))
            still = []
            for req, since in pending:
                try:
                    self.store.take(req.cid)
                except LeaseHeld as e:
                    if time.monotonic() - since < self.lease_wait and not self.stopping.is_set() and not req.cancelled():
                        still.append((req, since))
                        continue
                    self.inbox.put(("prepared", (req, e)))
                    continue
                except Exception as e:  # the directory is unreachable
                    self.inbox.put(("prepared", (req, ServingError(f"internal error: {type(e).__name__}: {e}",
                                                                   ErrorKind.INTERNAL))))
                    continue
                try:
                    outcome = self._prepare(req)
                except Exception as e:  # unknown, or an unreadable file: this turn only
                    self.store.release(req.cid)
                    outcome = e if isinstance(e, UserError) else ServingError(
                        f"internal error: {type(e).__name__}: {e}", ErrorKind.INTERNAL)
                self.inbox.put(("prepared", (req, outcome)))
            pending = still

    def _prepare(self, req: TurnRequest):
        """What a turn starts from, its lease held (the loader's thread)."""
        if self._is_end_only(req):
            if not self.store.exists(req.cid):
                raise ServingError(f"conversation {req.cid} is unknown or has ended", ErrorKind.UNKNOWN_CONVERSATION)
            self.store.end(req.cid)
            self.store.release(req.cid)
            return _ENDED
        if req.start and not req.resume:
            self.store.end(req.cid)  # a new conversation replaces whatever the id held
            return None
        if not self.store.exists(req.cid):
            raise ServingError(f"conversation {req.cid} is unknown or has ended; start it with the START flag",
                               ErrorKind.UNKNOWN_CONVERSATION)
        state = self.store.get(req.cid)  # read and checked here, not on the scheduler's thread
        if req.after is not None and state.seen != req.after:
            raise ServingError(f"conversation {req.cid} is at {state.seen} tokens, not {req.after}: this turn "
                               "(or another) was applied already; it was not fed again", ErrorKind.ALREADY_DONE)
        return state

    def _start(self, req: TurnRequest, state) -> None:
        """Start ``req`` in a free slot from ``state`` (what the loader prepared), its conversation's
        lease held until the turn is saved or dropped."""
        if state is _ENDED:
            self._done(req, TurnResult(0, 0, "ended", 0), None)
            return
        messages = req.messages  # parsed and validated when the request was made (protocol.TurnRequest)
        max_tokens = self.max_new_tokens if req.max_tokens is None else req.max_tokens
        fresh = state is None
        conversation = Chat(self.tokenizer, self.stop_ids, started=not fresh, encoder=self.encoder)
        if req.token_ids is not None:
            if max(req.token_ids) >= self.vocab_size:
                raise ServingError(f"token id {max(req.token_ids)} is out of the model's vocabulary of "
                                   f"{self.vocab_size}", ErrorKind.BAD_REQUEST)
            ids = list(req.token_ids)
            conversation.started = True
        elif req.raw:
            ids = self.tokenizer.encode(messages, add_special_tokens=fresh)
        else:
            ids = conversation.turn_ids(messages)
        turn = _Turn(req, conversation, ids, max_tokens, self.runner.sampler(req.sampling))
        row = next(r for r, t in enumerate(self.rows) if t is None)
        if fresh:
            self.runner.reset(row)
        else:
            self.runner.load(row, state)
        self.admitted += 1
        turn.row, turn.seq = row, self.admitted
        self.rows[row] = turn
        self.busy.add(req.cid)

    # ----------------------------------------------------------------- one step
    def _step(self) -> None:
        """One forward: each decoding row's drawn token, what closes the replies that ended in the
        step before, and prompt chunks within the token budget, fed together (the runner packs the
        ragged rows); then the turns with nothing left to feed are released."""
        live = [t for t in self.rows if t is not None]
        closing = [t for t in live if t.finish is not None and t.forced]
        decoding = [t for t in live if t.decoding and t.finish is None]
        prompting = sorted((t for t in live if not t.decoding), key=lambda t: t.seq)
        pending = sum(len(t.ids) - t.fed for t in prompting)
        if 0 < pending <= self._prompt_budget(len(decoding)):
            # A reply not started yet waits, once, for the prompts this step feeds (admitted just
            # after it): its first gap is then not stalled by them, and turns that arrived together
            # but were admitted over two steps start together.
            held = [t for t in decoding if t.count == 0 and not t.waited]
            for t in held:
                t.waited = True
            decoding = [t for t in decoding if t not in held]
        feeds = [(t, t.forced) for t in closing]
        if decoding:
            draws = self.runner.sample([t.row for t in decoding], [t.sampler for t in decoding],
                                       [t.req.logprobs for t in decoding])
            for turn, draw in zip(decoding, draws):
                if draw.error is not None:  # its own turn fails; the conversation stays as before it
                    self._release(turn, error=ServingError(str(draw.error), ErrorKind.BAD_REQUEST))
                else:
                    feeds.append((turn, [self._take(turn, draw)]))
        budget = self._prompt_budget(len(decoding))
        for turn in prompting:
            if budget == 0:
                break
            if turn.req.cancelled():  # nothing of this turn is kept: the conversation stays as it was
                turn.finish = "cancelled"
                self._release(turn, keep=False)
                continue
            left = len(turn.ids) - turn.fed
            take = min(left, max(min(left, budget) // self.runner.quantum, 1) * self.runner.quantum)
            feeds.append((turn, turn.ids[turn.fed : turn.fed + take]))
            turn.fed += take
            budget = max(budget - take, 0)
        if not feeds:
            return
        self.runner.feed([t.row for t, _ in feeds], [ids for _, ids in feeds])
        for turn, _ in feeds:
            if turn in closing:
                turn.forced = []
            elif not turn.decoding and turn.fed == len(turn.ids):
                turn.decoding = True
                if turn.max_tokens == 0:
                    self._end_reply(turn, "length")
            elif turn.decoding and turn.finish is None and turn.req.cancelled():
                self._end_reply(turn, "cancelled")
        for turn, _ in feeds:
            if turn.finish is not None and not turn.forced:
                self._release(turn)

    def _take(self, turn: _Turn, draw) -> int:
        """A decoding row's drawn token: reported, and the reply ended where it must be; returns
        the id the row feeds now."""
        token = draw.token
        turn.count += 1
        turn.last = token
        turn.reply_ids.append(token)
        if token in self.stop_ids:
            self._end_reply(turn, "stop")
            return token
        text, hit = turn.decoder.push(token), False
        if turn.stops is not None:
            text, hit = turn.stops.push(text)
        event = TokenEvent(token, text)
        if turn.req.logprobs is not None:
            event.logprob = draw.logprob
            if turn.req.logprobs:
                event.top = [[i, self.tokenizer.decode([i]), v] for i, v in draw.top]
        try:
            turn.req.on_token(event)
        except Exception:  # the client is gone: end the reply as if it had cancelled
            self._end_reply(turn, "cancelled")
            return token
        if hit:
            turn.stops_hit = True
            self._end_reply(turn, "stop")
        elif turn.count >= turn.max_tokens:
            self._end_reply(turn, "length")
        return token

    def _end_reply(self, turn: _Turn, reason: str) -> None:
        """The reply is over; what closes it is fed as one chunk in the next step, as
        ``Chat.reply`` feeds it (with recall each chunk selects its own blocks, so the chunking
        must be the same), beside the other rows."""
        turn.finish = reason
        turn.forced = [] if turn.req.raw else turn.conversation.closing_ids(turn.last)
        turn.reply_ids += turn.forced
        if turn.stops is not None and not turn.stops_hit:
            turn.held = turn.stops.flush()

    def _prompt_budget(self, decoding: int) -> int:
        """Prompt tokens a step feeds beside ``decoding`` decoding rows."""
        return max(self.token_budget - decoding, self.token_budget // 4, 1) if decoding else 4 * self.token_budget

    # ----------------------------------------------------------------- slots
    def _release(self, turn: _Turn, error: Exception | None = None, keep: bool = True) -> None:
        """Free the turn's slot; a finished turn's state goes to the store, then its file."""
        row, cid = turn.row, turn.req.cid
        result = None
        if error is None and keep:
            self.store.put(cid, self.runner.save(row, into=self.store.holder(cid)))
        else:  # what the turn changed is dropped (a block store too): the file holds the previous turn
            self.store.forget(cid)
        if error is None:
            seen = self.runner.seen(row) if keep else (self.store.seen(cid) if self.store.exists(cid) else 0)
            result = TurnResult(len(turn.ids), turn.count, turn.finish, seen, turn.held,
                                tuple(turn.reply_ids) if keep else ())
        self.runner.free(row)
        self.rows[row] = None
        if error is None and keep and not turn.req.end:
            self.writes.put((cid, turn.req, result))  # busy until saved
            return
        if error is None and turn.req.end:
            self.store.end(cid)
        self.writes.put(("release", cid))  # file I/O: off this thread
        self.busy.discard(cid)
        self._done(turn.req, result, error)

    @staticmethod
    def _done(req: TurnRequest, result: TurnResult | None, error: Exception | None) -> None:
        try:
            req.on_done(result, error)
        except Exception:  # the client is gone: nobody to tell
            pass

    # ----------------------------------------------------------------- the writer's thread
    def _write_loop(self) -> None:
        while True:
            item = self.writes.get()
            if item is None:
                return
            if item[0] == "release":
                self.store.release(item[1])
                continue
            cid, req, result = item
            try:
                self.store.save(cid, in_use=frozenset(self.busy))
            except Exception as e:  # a full disk: the reply was streamed, but not kept
                self.store.forget(cid)  # the next turn continues from the file: a resent turn is fed once
                self.store.release(cid)
                kind = e.kind if isinstance(e, ServingError) else ErrorKind.INTERNAL  # a lease lost: retryable
                self._done(req, None, ServingError(f"internal error: the conversation could not be saved ({e})",
                                                   kind))
            else:
                self.store.release(cid)
                self._done(req, result, None)
            self.inbox.put(("saved", cid))
