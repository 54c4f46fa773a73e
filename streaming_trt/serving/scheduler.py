"""Continuous batching: every conversation turn in flight advances in one step over a pool of slots.

A sink + ring cache has a fixed size per conversation (S + W slots), so the pool is one batched
:class:`~streaming_trt.cache.StreamingCache` of ``slots`` streams allocated once: no paging, no
preemption, and the server's capacity is an exact number. A conversation holds a slot only while
one of its turns is in flight; between turns its state waits in the :class:`ConversationStore`
(host memory, then disk).

Each iteration of the scheduler's thread (Sarathi-Serve's stall-free batching):

1. decodes one token for every decoding slot, in one forward over rows ``0 .. decoding - 1``
   (decoding slots are kept contiguous at the bottom of the pool, so that forward is a view of
   the cache, never a copy);
2. then feeds prompt chunks of the turns that are still prefilling (oldest first) with what is
   left of the step's token budget (``token_budget`` minus the decoding slots, at least a quarter
   of it; the whole budget times four when nothing decodes), so a long prompt never stalls the
   others' token streams;
3. admits waiting turns into free slots (at most one turn per conversation at a time, in arrival
   order).

With recall (:mod:`streaming_trt.recall`, one stream per block store) every turn runs on its
conversation's own batch-1 session instead, one forward per conversation: the same order of work,
without batching.

Every row has its own sampling parameters, seed, stop tokens, stop strings and max_tokens;
cancellation is checked between steps, during prefill too. A finished turn's state is copied out
of its slot; it is saved by a writer thread, and only then is the turn's final response sent, so a
reply the client saw complete survives a SIGKILL.
"""
from __future__ import annotations

import collections
import queue
import threading

import torch

from ..conversation import Conversation
from ..contract import UserError
from ..generation import StopStrings, eos_ids
from ..graphs import DecodeGraphs
from ..sampling import Sampler, token_logprobs
from ..session import Session
from ..tokenizer import IncrementalDecoder
from .protocol import ErrorKind, Overloaded, ServingError, TokenEvent, TurnRequest, TurnResult

__all__ = ["Scheduler", "Overloaded", "TokenEvent", "TurnRequest", "TurnResult"]


class _Turn:
    """A turn inside the scheduler: its conversation, what is left to feed, its reply so far."""

    def __init__(self, req: TurnRequest, conversation: Conversation, ids: list[int], max_tokens: int, device):
        self.req, self.conversation, self.ids = req, conversation, ids
        self.max_tokens = max_tokens
        self.sampler = Sampler(req.sampling, device)
        self.sampler.observe(list(ids))  # penalties count this turn's prompt and reply
        self.decoder = IncrementalDecoder(conversation.tokenizer)
        self.stops = StopStrings(list(req.stop)) if req.stop else None
        self.seq = 0                  # admission order
        self.fed = 0                  # prompt ids fed so far
        self.row: int | None = None
        self.session: Session | None = None  # with recall: the conversation's own stream
        self.forced: list[int] = []   # ids fed without sampling (what closes the reply)
        self.count, self.finish = 0, None
        self.last: int | None = None  # the last generated id
        self.stops_hit, self.held = False, ""  # a stop string ended the reply; text released at the end


class Scheduler:
    """Batches turns of many conversations on one model (see the module docstring).

    Args:
        model: a :class:`~streaming_trt.model.Transformer`.
        tokenizer: its tokenizer (chat template).
        store: a :class:`~streaming_trt.serving.store.ConversationStore` (idle conversations).
        slots: B, conversations whose turns run at once (one batched cache of B streams).
        token_budget: tokens one step feeds, decode and prompt tokens together (default: 512 on
            CUDA, where a step is bound by memory traffic, 64 on a CPU, where a prompt chunk costs
            as much as its tokens: the budget bounds the inter-token latency).
        max_queue: turns that may wait for a slot; beyond, :meth:`submit` raises :class:`Overloaded`.
        max_new_tokens / max_new_tokens_limit: a request's default and largest reply length.
        max_input_bytes: the largest MESSAGES a request may send.
        capture_decode: run decode steps over a batch bucket (the next power of two of decoding
            slots, padded with free slots), replayed from one CUDA graph per bucket on CUDA
            (default: on CUDA only). Elsewhere the same captured step runs eagerly (how the tests
            check the padding).
        recall: a :class:`~streaming_trt.recall.Recall`: every conversation keeps its evicted tokens
            in a block store of its own, and its turns run on its own session (not batched).
    """

    def __init__(self, model, tokenizer, store, slots: int = 16, token_budget: int | None = None, max_queue: int = 256,
                 max_new_tokens: int = 256, max_new_tokens_limit: int = 4096, max_input_bytes: int = 256 * 1024,
                 capture_decode: bool | None = None, recall=None):
        if token_budget is None:
            token_budget = 512 if model.device.type == "cuda" else 64
        for name, value, low in (("slots", slots, 1), ("token_budget", token_budget, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.geometry = store.geometry
        self.recall = recall
        self.pool = Session(model, store.geometry.sink_tokens, store.geometry.window,
                            batch=1 if recall is not None else slots, cache_fill=store.fill_value)
        self.logits = torch.zeros(slots, model.config.vocab_size, device=model.device)
        self.rows: list[_Turn | None] = [None] * slots
        self.decoding = 0                      # rows 0 .. decoding-1 are decoding
        self.token_budget, self.max_queue = token_budget, max_queue
        self.max_new_tokens, self.max_new_tokens_limit = max_new_tokens, max_new_tokens_limit
        self.max_input_bytes = max_input_bytes
        self.capture = recall is None and (model.device.type == "cuda" if capture_decode is None else capture_decode)
        self.buckets: dict[int, DecodeGraphs] = {}
        self.stop_ids = eos_ids(tokenizer, model.config)
        self.encoder = Conversation(tokenizer, self.stop_ids).encoder
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: collections.deque = collections.deque()  # (TurnRequest) in arrival order
        self.busy: set[int] = set()           # conversations with a turn admitted or being saved
        self.queued = 0                       # requests submitted and not yet admitted
        self.lock = threading.Lock()
        self.steps, self.admitted = 0, 0
        self.stopping = threading.Event()
        self.writes: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name="streaming-trt-writer", daemon=True)
        self.thread = threading.Thread(target=self._loop, name="streaming-trt-scheduler", daemon=True)
        self.writer.start()
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
        self.writes.put(None)
        self.writer.join(timeout)

    # ----------------------------------------------------------------- the scheduler's thread
    def _loop(self) -> None:
        while True:
            active = self.decoding or any(r is not None for r in self.rows)
            self._drain(block=not active and not self.stopping.is_set())
            if self.stopping.is_set() and not active:
                for req in self.waiting:
                    self._done(req, None, ServingError("the server is shutting down", ErrorKind.SHUTTING_DOWN))
                self.waiting.clear()
                return
            self._admit()
            try:
                self._decode_step()
                self._prefill_step()
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
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Start waiting turns, oldest first, one per conversation at a time."""
        blocked, kept = set(), collections.deque()
        while self.waiting:
            req = self.waiting.popleft()
            if req.cid in self.busy or req.cid in blocked:
                blocked.add(req.cid)
                kept.append(req)
                continue
            if self.free_slots() == 0 and not self._is_end_only(req):
                kept.append(req)
                blocked.add(req.cid)
                continue
            with self.lock:
                self.queued -= 1
            try:
                self._start(req)
            except UserError as e:
                self._done(req, None, e)
            except Exception as e:  # a bug or an unreadable file: this turn only
                self._done(req, None, ServingError(f"internal error: {type(e).__name__}: {e}", ErrorKind.INTERNAL))
        self.waiting = kept

    @staticmethod
    def _is_end_only(req: TurnRequest) -> bool:
        return req.end and req.messages in ([], "[]", b"[]")

    def _start(self, req: TurnRequest) -> None:
        if self._is_end_only(req):
            if not self.store.exists(req.cid):
                raise ServingError(f"conversation {req.cid} is unknown or has ended", ErrorKind.UNKNOWN_CONVERSATION)
            self.store.end(req.cid)
            self._done(req, TurnResult(0, 0, "ended", 0), None)
            return
        messages = req.messages  # parsed and validated when the request was made (protocol.TurnRequest)
        max_tokens = self.max_new_tokens if req.max_tokens is None else req.max_tokens
        fresh = req.start and not req.resume
        if not fresh and not self.store.exists(req.cid):
            raise ServingError(f"conversation {req.cid} is unknown or has ended; start it with the START flag",
                               ErrorKind.UNKNOWN_CONVERSATION)
        conversation = Conversation(self.tokenizer, self.stop_ids, started=not fresh, encoder=self.encoder)
        if req.raw:
            ids = self.tokenizer.encode(messages, add_special_tokens=fresh)
        else:
            ids = conversation.turn_ids(messages)
        sink = self.model.config.sink_token_id
        if fresh and sink is not None and self.recall is None:  # a sink-token model's stream starts with it
            ids = [sink] + ids  # (a private session feeds it itself)
        turn = _Turn(req, conversation, ids, max_tokens, self.model.device)
        row = max(r for r, t in enumerate(self.rows) if t is None)  # prefill rows fill the pool from the top
        if self.recall is not None:
            if fresh:
                self.store.end(req.cid)
            g = self.geometry
            turn.session = (Session(self.model, g.sink_tokens, g.window, cache_fill=self.store.fill_value,
                                    recall=self.recall) if fresh else self.store.get(req.cid))
            self.logits[row] = 0 if turn.session.last_logits is None else turn.session.last_logits[0]
        elif fresh:
            self.store.end(req.cid)
            self.pool.reset([row])
            self.logits[row] = 0
        else:
            saved = self.store.get(req.cid)
            self._copy_in(saved, row)
        self.admitted += 1
        turn.row, turn.seq = row, self.admitted
        self.rows[row] = turn
        self.busy.add(req.cid)

    # ----------------------------------------------------------------- one step
    def _decode_step(self) -> None:
        n = self.decoding
        if n == 0:
            return
        turns = self.rows[:n]
        inputs = [self._next_input(turn, self.logits[r : r + 1]) for r, turn in enumerate(turns)]
        if self.recall is not None:
            for r, (turn, token) in enumerate(zip(turns, inputs)):
                self.logits[r] = turn.session.feed([token], all_logits=False)[0]
                self._close_private(turn)
        else:
            tokens = torch.tensor(inputs, dtype=torch.int64, device=self.model.device).view(n, 1)
            self.logits[:n] = self._decode(tokens)
        for turn in turns:
            if turn.finish is None and turn.req.cancelled():
                self._end_reply(turn, "cancelled")
                self._close_private(turn)
            if turn.finish is not None and not turn.forced:
                self._release(turn)

    def _next_input(self, turn: _Turn, logits: torch.Tensor) -> int:
        """The id a decoding row feeds now: a closing id, or a token drawn (and reported)."""
        if turn.forced:
            return turn.forced.pop(0)
        token = int(turn.sampler(logits)[0])
        turn.count += 1
        turn.last = token
        if token in self.stop_ids:
            self._end_reply(turn, "stop")
            return token
        text, hit = turn.decoder.push(token), False
        if turn.stops is not None:
            text, hit = turn.stops.push(text)
        event = TokenEvent(token, text)
        if turn.req.logprobs is not None:
            event.logprob, best = token_logprobs(logits[0], token, turn.req.logprobs)
            if turn.req.logprobs:
                event.top = [[i, self.tokenizer.decode([i]), v] for i, v in best]
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
        """The reply is over; what closes it is fed in the next decode steps."""
        turn.finish = reason
        turn.forced = [] if turn.req.raw else turn.conversation.closing_ids(turn.last)
        if turn.stops is not None and not turn.stops_hit:
            turn.held = turn.stops.flush()

    def _close_private(self, turn: _Turn) -> None:
        """With recall, what closes a finished reply is fed at once, as one chunk, as the chat CLI
        feeds it (each chunk selects its own blocks, so the chunking must be the same)."""
        if turn.session is not None and turn.finish is not None and turn.forced:
            self.logits[turn.row] = turn.session.feed(turn.forced, all_logits=False)[0]
            turn.forced = []

    def _prefill_step(self) -> None:
        budget = (max(self.token_budget - self.decoding, self.token_budget // 4, 1) if self.decoding
                  else 4 * self.token_budget)
        prefilling = sorted((t for t in self.rows[self.decoding :] if t is not None), key=lambda t: t.seq)
        for turn in prefilling:
            if budget == 0:
                return
            if turn.req.cancelled():  # nothing of this turn is kept: the conversation stays as it was
                turn.finish = "cancelled"
                self._release(turn, keep=False)
                continue
            take = min(len(turn.ids) - turn.fed, budget)
            if turn.session is not None:  # whole recall chunks, as one feed of the prompt would make them
                take = min(len(turn.ids) - turn.fed, max(take // self.recall.chunk, 1) * self.recall.chunk)
            part = turn.ids[turn.fed : turn.fed + take]
            if turn.session is not None:
                self.logits[turn.row] = turn.session.feed(part, all_logits=False)[0]
            else:
                chunk = torch.tensor(part, device=self.model.device).view(1, -1)
                self.logits[turn.row] = self._forward(turn.row, turn.row + 1, chunk, [take])[0]
            turn.fed += take
            budget = max(budget - take, 0)
            if turn.fed == len(turn.ids):
                self._to_decoding(turn)
                if turn.max_tokens == 0:
                    self._end_reply(turn, "length")
                    self._close_private(turn)
                    if not turn.forced:
                        self._release(turn)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step of rows ``0 .. n-1``: over a bucket of rows padded with free slots (a
        padded row's state is garbage afterwards, and every admitted turn overwrites its row), or
        eagerly over exactly ``n`` rows when capture is off or a prefilling row sits in the bucket."""
        n = tokens.shape[0]
        b = min(1 << (n - 1).bit_length(), len(self.rows))
        if not self.capture or any(t is not None for t in self.rows[n:b]):
            return self._forward(0, n, tokens, [1] * n)
        cache = self.pool.cache
        if b not in self.buckets:
            self.buckets[b] = DecodeGraphs(self.model, cache.rows(0, b))
        graphs = self.buckets[b]
        graphs.cache.seen_host = cache.seen_host[:b]
        padded = torch.zeros(b, 1, dtype=torch.int64, device=tokens.device)
        padded[:n] = tokens
        if tokens.device.type == "cuda":
            out = graphs(padded)
        else:
            out = graphs.step(padded, graphs.cache.full_after_decode())
            graphs.cache.count_host([1] * b)
        cache.seen_host[:b] = graphs.cache.seen_host
        return out[:n]

    def _forward(self, lo: int, hi: int, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Feed rows ``lo .. hi-1`` of the pool; returns their newest logits ``[hi - lo, vocab]``."""
        cache = self.pool.cache
        view = cache.rows(lo, hi)
        out = self.model(tokens, view, lengths, last_only=True)
        cache.seen_host[lo:hi] = view.seen_host
        return out

    # ----------------------------------------------------------------- slots
    def _to_decoding(self, turn: _Turn) -> None:
        target = self.decoding
        if turn.row != target:
            self._swap(turn.row, target)
        self.decoding += 1

    def _swap(self, a: int, b: int) -> None:
        idx, rev = [a, b], [b, a]
        if self.recall is None:
            c = self.pool.cache
            c.keys[:, idx] = c.keys[:, rev]
            c.values[:, idx] = c.values[:, rev]
            c.seen[idx] = c.seen[rev]
            c.seen_host[a], c.seen_host[b] = c.seen_host[b], c.seen_host[a]
        self.logits[idx] = self.logits[rev]
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        for r in (a, b):
            if self.rows[r] is not None:
                self.rows[r].row = r

    def _copy_in(self, saved: Session, row: int) -> None:
        c = self.pool.cache
        c.keys[:, row].copy_(saved.cache.keys[:, 0])
        c.values[:, row].copy_(saved.cache.values[:, 0])
        c.seen[row] = saved.cache.seen[0]
        c.seen_host[row] = saved.cache.seen_host[0]
        self.logits[row] = 0 if saved.last_logits is None else saved.last_logits[0]

    def _release(self, turn: _Turn, error: Exception | None = None, keep: bool = True) -> None:
        """Free the turn's slot; a finished turn's state goes to the store, then its file."""
        row, cid = turn.row, turn.req.cid
        c = self.pool.cache
        result = None
        if turn.session is not None:  # the conversation's own stream is its state
            if error is None and keep:
                turn.session.last_logits = self.logits[row : row + 1].clone()
                self.store.put(cid, turn.session)
            else:  # what the turn changed is dropped: the file holds the previous turn
                self.store.forget(cid)
        elif error is None and keep:
            holder = self.store.holder(cid)
            holder.cache.keys[:, 0].copy_(c.keys[:, row])
            holder.cache.values[:, 0].copy_(c.values[:, row])
            holder.cache.seen[0] = c.seen[row]
            holder.cache.seen_host[0] = c.seen_host[row]
            holder.last_logits = self.logits[row : row + 1].clone()
            self.store.put(cid, holder)
        if error is None:
            now = turn.session.seen[0] if turn.session is not None else c.seen_host[row]
            seen = now if keep else (self.store.seen(cid) if self.store.exists(cid) else 0)
            result = TurnResult(len(turn.ids), turn.count, turn.finish, seen, turn.held)
        if row < self.decoding:
            last = self.decoding - 1
            if row != last:
                self._swap(row, last)
            self.decoding -= 1
            row = last
        self.rows[row] = None
        if error is None and keep and not turn.req.end:
            self.writes.put((cid, turn.req, result))  # busy until saved
            return
        if error is None and turn.req.end:
            self.store.end(cid)
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
            cid, req, result = item
            try:
                self.store.save(cid)
            except Exception as e:  # a full disk: the reply was streamed, but not kept
                self._done(req, None, ServingError(f"internal error: the conversation could not be saved ({e})",
                                                   ErrorKind.INTERNAL))
            else:
                self._done(req, result, None)
            self.inbox.put(("saved", cid))
