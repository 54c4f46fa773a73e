"""The batch runner: every tensor of serving, behind rows named by plain integers.

It holds one batched :class:`~streaming_trt.runtime.cache.StreamingCache` of ``slots`` streams (the pool),
each row's newest logits, the decode steps captured per batch bucket (CUDA graphs on CUDA), and
the placement of rows: a caller's row ``r`` lives in some physical row of the pool, chosen here.
Rows that decode together are moved (swapped) to the bottom of the pool so that their decode
step runs over a contiguous view of it, never a copy; a bucket of rows is padded with free ones.

With recall every row has its own block store; a decode step is still one batched forward (the
projections and the MLP over all rows, the recall attention per row inside each layer).
"""
from __future__ import annotations

import dataclasses

import torch

from ..runtime.cache import StreamingCache
from ..contract import Geometry, UserError
from ..runtime.graphs import DecodeGraphs
from ..runtime.kernel_backend import kernel_ops
from ..runtime.recall import Recall, new_store
from ..runtime.sampling import Sampler, SamplingError, SamplingParams, token_logprobs
from ..runtime.session import feed_stream, model_fingerprint, sink_token_starts, token_batch
from .state import StreamState

MAX_CHUNK = 512  # the most prompt tokens of one row in one forward


@dataclasses.dataclass
class Draw:
    """A token drawn for a row: its id and, when asked for, its log-probability and the ``top``
    most likely ``(token_id, logprob)``, most likely first."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    error: SamplingError | None = None  # the row had no distribution to draw from (token -1)


class BatchRunner:
    """Runs ``slots`` streams of ``model`` in one batch.

    Args:
        model: a :class:`~streaming_trt.runtime.model.Transformer`.
        geometry: every stream's cache geometry.
        slots: B, the streams held at once.
        fill_value: value of never-written cache slots (tests use NaN).
        recall: a :class:`~streaming_trt.runtime.recall.Recall`: each row keeps its own block store.
        capture_decode: run decode steps over a bucket (the next power of two of the rows,
            padded with free rows), replayed from one CUDA graph per bucket on CUDA (default: on
            CUDA only, without recall). Elsewhere the captured step runs eagerly.
    """

    def __init__(self, model, geometry: Geometry, slots: int, fill_value: float = 0.0, recall: Recall | None = None,
                 capture_decode: bool | None = None):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise UserError(f"slots must be an integer >= 1, got {slots!r}")
        if recall is not None and not isinstance(recall, Recall):
            raise UserError(f"recall must be a streaming_trt.Recall(...), got {type(recall).__name__}")
        geometry.check_positions(model.config.max_position_embeddings)
        self.model, self.geometry, self.fill_value, self.recall = model, geometry, fill_value, recall
        self.cache = StreamingCache(model.config, slots, geometry, model.dtype, model.device, kernel_ops(model.backend),
                                    model.inv_freq, fill_value)
        if recall is not None:
            self.cache.stores = [None] * slots
        self.logits = torch.zeros(slots, model.config.vocab_size, device=model.device)  # by physical row
        self.capture = recall is None and (model.device.type == "cuda" if capture_decode is None else capture_decode)
        self.buckets: dict[int, DecodeGraphs] = {}
        self.max_chunk = MAX_CHUNK if recall is None else min(MAX_CHUNK, recall.chunk)
        self.where = list(range(slots))     # caller's row -> physical row
        self.owner = list(range(slots))     # physical row -> caller's row
        self.live = [False] * slots         # by physical row: holds a stream

    # ----------------------------------------------------------------- what callers may ask
    @property
    def slots(self) -> int:
        return self.cache.batch

    @property
    def quantum(self) -> int:
        """Prompt pieces fed to :meth:`prefill` should be multiples of this many tokens (but the
        last): with recall, each chunk selects its own blocks, so a conversation run in pieces
        equals one fed whole only when the pieces are whole chunks."""
        return 1 if self.recall is None else self.recall.chunk

    def nbytes(self) -> int:
        """Device bytes of the pool's cache."""
        return self.cache.nbytes()

    def seen(self, row: int) -> int:
        """Tokens row ``row``'s stream holds."""
        return self.cache.seen_host[self.where[row]]

    def sampler(self, params: SamplingParams) -> Sampler:
        """A sampler for one row's tokens (on the model's device)."""
        return Sampler(params, self.model.device)

    # ----------------------------------------------------------------- a row's stream
    def reset(self, row: int) -> None:
        """Row ``row`` starts a new stream (with recall, with an empty block store of its own)."""
        p = self._place(row)
        self.cache.reset([p])
        self.logits[p] = 0
        if self.recall is not None:
            self.cache.stores[p] = new_store(self.recall, self.model, self.geometry)

    def load(self, row: int, state: StreamState) -> None:
        """Row ``row`` continues ``state``'s stream (copied in; its block store is handed over)."""
        if state.fingerprint != model_fingerprint(self.model):
            raise UserError("the conversation's state was made by another model; start it again")
        p = self._place(row)
        try:
            state.write_to(self.cache, p, self.logits[p])
        except Exception:
            self.live[p] = False
            raise

    def save(self, row: int, into: StreamState | None = None) -> StreamState:
        """Row ``row``'s stream as a state on the host (``into``'s memory is reused when given)."""
        p = self.where[row]
        state = into if into is not None else StreamState(self.model, self.geometry, self.fill_value)
        state.read_from(self.cache, p, self.logits[p])
        return state

    def free(self, row: int) -> None:
        """Row ``row`` no longer holds a stream (its memory is reused by the next)."""
        p = self.where[row]
        self.live[p] = False
        if self.cache.stores is not None:
            self.cache.stores[p] = None

    # ----------------------------------------------------------------- feeding
    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` to row ``row`` (in chunks of at most ``max_chunk``; a sink-token model's
        token 0 first when the stream is new); returns its newest logits ``[vocab]`` (a view)."""
        p = self.where[row]
        tokens, lengths = token_batch([list(ids)], None, 1, self.model.config.vocab_size, self.model.device)
        view = self.cache.rows(p, p + 1)
        _, last = feed_stream(self.model, view, tokens, lengths, self.max_chunk, False, self.logits[p : p + 1])
        self.cache.seen_host[p] = view.seen_host[0]
        self.logits[p] = last[0]
        return self.logits[p]

    def feed(self, rows: list[int], ids: list[list[int]]) -> None:
        """Feed ``ids[i]`` (at least one id) to row ``rows[i]``: decoding rows' drawn tokens, what
        closes a reply, prompt chunks, all in one batched forward per chunk of ``max_chunk`` (over
        ``rows`` moved to the bottom of the pool, as :meth:`decode`; ragged rows are packed, so a
        row of one token costs one token). A decode step when every row takes one id. Each row
        keeps its newest logits, as :meth:`prefill` leaves them. With recall, rows of several ids
        are fed row by row: a chunk's every query votes for blocks, so a row padded to a longer
        row's length would choose differently than alone."""
        n = len(rows)
        if n == 0 or len(ids) != n or not all(ids):
            raise UserError(f"feed takes one non-empty id list per row, got {len(ids)} lists for {n} rows")
        # A row about to get a sink-token model's token 0 first is no decode row.
        starts = sink_token_starts(self.model.config.sink_token_id, [len(mine) for mine in ids],
                                   [self.seen(row) for row in rows]) or [0] * n
        single = [len(mine) == 1 and not start for mine, start in zip(ids, starts)]
        if all(single):
            self.decode(rows, [mine[0] for mine in ids])
            return
        if n == 1 or self.recall is not None:  # in place: no row moves
            if any(single):
                self.decode([r for r, one in zip(rows, single) if one], [m[0] for m, one in zip(ids, single) if one])
            for row, mine, one in zip(rows, ids, single):
                if not one:
                    self.prefill(row, mine)
            return
        at = self._gather(rows)  # rows[i] now lives in physical row at[i] < n
        by_place = [None] * n
        for i, p in enumerate(at):
            by_place[p] = list(ids[i])
        tokens, lengths = token_batch(by_place, None, n, self.model.config.vocab_size, self.model.device)
        view = self.cache.rows(0, n)
        _, last = feed_stream(self.model, view, tokens, lengths, self.max_chunk, False, self.logits[:n])
        self.cache.seen_host[:n] = view.seen_host
        self.logits[:n] = last

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each of ``rows`` in one batched forward; returns their newest logits
        ``[len(rows), vocab]`` in the order of ``rows``."""
        n = len(rows)
        if n == 0 or len(tokens) != n:
            raise UserError(f"decode takes one token per row, got {len(tokens)} tokens for {n} rows")
        at = self._gather(rows)  # rows[i] now lives in physical row at[i] < n
        by_place = [0] * n
        for i, p in enumerate(at):
            by_place[p] = tokens[i]
        ids = torch.tensor(by_place, dtype=torch.int64).view(n, 1).to(self.model.device)
        self.logits[:n] = self._decode(ids)
        return self.logits[at]

    def sample(self, rows: list[int], samplers: list[Sampler], logprobs: list[int | None]) -> list[Draw]:
        """Draw each row's next token from its newest logits with its own sampler; ``logprobs[i]``
        (None: none) asks for the token's log-probability and the ``logprobs[i]`` most likely."""
        draws = []
        for row, sampler, top in zip(rows, samplers, logprobs):
            logits = self.logits[self.where[row]].view(1, -1)
            try:
                token = int(sampler(logits)[0])
            except SamplingError as e:  # this row only: the others draw on
                draws.append(Draw(-1, error=e))
                continue
            draw = Draw(token)
            if top is not None:
                draw.logprob, draw.top = token_logprobs(logits[0], token, top)
            draws.append(draw)
        return draws

    # ----------------------------------------------------------------- placement
    def _place(self, row: int) -> int:
        """Give row ``row`` (free) the free physical row highest in the pool (decode steps run at the
        bottom, so a new stream stays out of their buckets); returns it."""
        if self.live[self.where[row]]:
            raise UserError(f"row {row} holds a stream: free it first")
        target = max(p for p in range(self.slots) if not self.live[p])
        self._exchange(self.where[row], target, move_data=False)
        self.live[target] = True
        return target

    def _gather(self, rows: list[int]) -> list[int]:
        """Place ``rows`` in physical rows ``0 .. len(rows) - 1``, in whatever order: only a row that
        sits above them is moved (swapped into a place none of ``rows`` holds), so a batch that
        keeps decoding together never moves. Returns each row's physical row."""
        n = len(rows)
        if len(set(rows)) != n:
            raise UserError(f"rows must be distinct, got {rows}")
        mine = set(rows)
        spots = iter(p for p in range(n) if self.owner[p] not in mine)
        for row in rows:
            if self.where[row] >= n:
                self._exchange(self.where[row], next(spots), move_data=True)
        return [self.where[row] for row in rows]

    def _exchange(self, a: int, b: int, move_data: bool) -> None:
        """Exchange physical rows ``a`` and ``b`` (their data too when ``move_data``) and who owns them."""
        if a == b:
            return
        if move_data:
            self.cache.swap(a, b)
            idx, rev = [a, b], [b, a]
            self.logits[idx] = self.logits[rev]
            self.live[a], self.live[b] = self.live[b], self.live[a]
        ra, rb = self.owner[a], self.owner[b]
        self.owner[a], self.owner[b] = rb, ra
        self.where[ra], self.where[rb] = b, a

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step of physical rows ``0 .. n-1``: over a bucket of rows padded with free ones
        (a padded row's state is garbage afterwards; every stream placed there overwrites it), or
        eagerly over exactly ``n`` rows when capture is off or a live row sits in the bucket."""
        n = tokens.shape[0]
        b = min(1 << (n - 1).bit_length(), self.slots)
        cache = self.cache
        if not self.capture or any(self.live[n:b]):
            return self._forward(0, n, tokens, [1] * n)
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
        """Feed physical rows ``lo .. hi-1``; returns their newest logits ``[hi - lo, vocab]``."""
        view = self.cache.rows(lo, hi)
        out = self.model(tokens, view, lengths, last_only=True)
        self.cache.seen_host[lo:hi] = view.seen_host
        return out
