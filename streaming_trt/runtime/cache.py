"""The streaming KV cache and the per-forward step plan every layer reads.

The cache owns its operations (``attend`` writes a layer's new keys/values and attends over the
cache, in the order the step needs); the plan is built once per forward, on the host, before any
tensor moves: decode vs prefill, the new tokens' slots, their rotary angles, whether the cache is
full. A decode step then runs with no host-device synchronisation.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from types import ModuleType

import torch

from .config import ModelConfig
from ..contract import Geometry, UserError
from ..kernels import reference
from .recall import attend_rows as recall_rows
from .rope import apply_rotary, rotary_angles


@dataclasses.dataclass
class StepPlan:
    """What every layer needs to know about one forward over ``batch`` streams of ``n`` rows.

    ``start``/``lengths``/``seen_after``: ``[batch]`` int64 on the device (tokens stored before,
    valid rows, tokens stored after). ``text``: cos/sin ``[batch, n, 1, rotary_dim // 2]`` float32
    at each row's text position ``t`` (keys and window scores); ``rank``: the same at
    ``min(t, C - 1)`` (sink scores), ``None`` when no row is past capacity (then it equals
    ``text``). ``decode``: one token in every row. ``full``: every stream has ``seen_after >= C``,
    so decode needs no mask. ``slots``: decode only, ``[batch]`` the slot each new token takes.
    ``written``: decode only, from the host counters, ``(lo, hi)`` the least and greatest
    ``min(seen_after, C)`` over the streams (the decode kernel's ``written``); None in a plan a
    CUDA graph captures.
    ``write``: prefill with the torch backend, the ``(row, chunk index, slot)`` triples kept.
    ``lengths_host``: ``lengths`` on the host, for :meth:`StreamingCache.advance` to move the host
    counters too; None in a plan a CUDA graph captures (its replays are counted by ``count_host``).
    ``packed``: when the rows are ragged, ``[T]`` the flat indices (into ``batch * n``) of the
    ``T = sum(lengths)`` valid rows: the model then runs its per-token work (embedding, norms,
    projections, MLP) on those ``T`` rows only, and attention on the ``[batch, n]`` grid
    (:meth:`unpack`, :meth:`pack`); None when every row is valid. ``parts``: for ragged rows, each
    run of one-token rows (decoding streams) and each longer row (a prompt chunk)
    ``(lo, hi, view, plan)`` attends as a step of its own over the cache view of rows ``lo .. hi-1``
    (a run of one-token rows as a decode step), so no row's attention pays for the longest row.
    """

    start: torch.Tensor
    lengths: torch.Tensor
    seen_after: torch.Tensor
    text: tuple[torch.Tensor, torch.Tensor]
    rank: tuple[torch.Tensor, torch.Tensor] | None
    decode: bool
    full: bool
    slots: torch.Tensor | None = None
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    written: tuple[int, int] | None = None
    lengths_host: list[int] | None = None
    recall: list | None = None  # per row, a streaming_trt.runtime.recall.RecallStep (None: that row has no store)
    packed: torch.Tensor | None = None
    parts: list | None = None  # (lo, hi, cache view, its plan): runs of one-token rows and of longer rows

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, features]`` of the valid rows onto the grid ``[batch, n, features]`` (zeros between)."""
        batch, n = self.text[0].shape[:2]
        grid = x.new_zeros(batch * n, x.shape[-1])
        grid[self.packed] = x
        return grid.view(batch, n, -1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, n, ...]`` on the grid as ``[T, ...]``: its valid rows, in order."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.packed)

    def row(self, b: int, full: bool) -> "StepPlan":
        """Row ``b`` of this plan as the plan of a batch of one (``full``: that row's own)."""
        one = slice(b, b + 1)
        write = None
        if self.write is not None:
            rows, j, s = self.write
            keep = rows == b
            write = (torch.zeros_like(rows[keep]), j[keep], s[keep])
        return StepPlan(start=self.start[one], lengths=self.lengths[one], seen_after=self.seen_after[one],
                        text=tuple(x[one] for x in self.text),
                        rank=None if self.rank is None else tuple(x[one] for x in self.rank),
                        decode=self.decode, full=full, slots=None if self.slots is None else self.slots[one],
                        write=write)

    def rotate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, n, heads, head_dim]`` rotated at the text positions and at the ranks."""
        at_text = apply_rotary(x, *self.text)
        return at_text, (at_text if self.rank is None else apply_rotary(x, *self.rank))


def device_memory(device: torch.device) -> int:
    """Bytes a new allocation could take on ``device`` now (free GPU memory, available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class StreamingCache:
    """Keys and values of ``batch`` streams, ``geometry.capacity`` slots each, for every layer.

    ``keys``/``values``: ``[num_layers, batch, num_kv_heads, capacity, head_dim]``; keys stored
    rotated at their text position (layout: :mod:`streaming_trt.kernels.reference`). ``seen``:
    ``[batch]`` int64 on the device, mirrored on the host as ``seen_host`` so a step is planned
    without reading the device. Allocated once; streams of any length reuse them.
    """

    def __init__(self, config: ModelConfig, batch: int, geometry: Geometry, dtype: torch.dtype,
                 device: torch.device, ops: ModuleType, inv_freq: torch.Tensor, fill_value: float = 0.0):
        self.geometry, self.ops, self.fill_value = geometry, ops, fill_value
        self.inv_freq = inv_freq  # [rotary_dim // 2] float64 on device
        need = geometry.cache_bytes(config.num_layers, batch, config.num_kv_heads, config.head_dim, dtype)
        have = device_memory(device)
        if need > have:
            per_slot = need // geometry.capacity
            fits = max(0, have // per_slot - geometry.sink_tokens)
            advice = (f"a window of at most {fits} fits" if fits >= 1 else
                      "not even one window slot fits: use fewer sink tokens, a smaller batch or dtype")
            raise UserError(f"the cache needs {_mib(need)} ({geometry.capacity} slots x {batch} streams x "
                            f"{config.num_layers} layers) but {device} has {_mib(have)} free; {advice}")
        shape = (config.num_layers, batch, config.num_kv_heads, geometry.capacity, config.head_dim)
        self.keys = torch.full(shape, fill_value, dtype=dtype, device=device)
        self.values = torch.full(shape, fill_value, dtype=dtype, device=device)
        self.seen = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seen_host = [0] * batch
        self.stores: list | None = None  # with recall: each row's streaming_trt.runtime.recall.BlockStore (or None)

    @property
    def batch(self) -> int:
        return len(self.seen_host)

    @property
    def capacity(self) -> int:
        return self.geometry.capacity

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def plan(self, lengths: list[int], n: int) -> StepPlan:
        """The plan of one forward of ``n`` rows per stream, ``lengths[b] <= n`` of them valid."""
        g, device = self.geometry, self.seen.device
        start_host, start = self.seen_host, self.seen
        lengths_t = torch.tensor(lengths, dtype=torch.int64).to(device)
        t = start.view(-1, 1) + torch.arange(n, device=device).view(1, -1)  # [batch, n]
        past_capacity = max(s + max(n, 1) - 1 for s in start_host) >= g.capacity
        text = tuple(x.unsqueeze(2) for x in rotary_angles(self.inv_freq, t))
        rank = tuple(x.unsqueeze(2) for x in rotary_angles(self.inv_freq, g.rank(t))) if past_capacity else None
        decode = n == 1 and all(length == 1 for length in lengths)
        plan = StepPlan(start=start, lengths=lengths_t, seen_after=start + lengths_t, text=text, rank=rank,
                        decode=decode, full=decode and self.full_after_decode(), lengths_host=list(lengths))
        if sum(lengths) < len(lengths) * n:  # ragged: no arithmetic on padding
            valid = torch.arange(n).view(1, -1) < torch.tensor(lengths).view(-1, 1)
            plan.packed = valid.view(-1).nonzero().view(-1).to(device)
            if self.stores is None:
                # Runs of one-token rows attend together; a longer row attends alone, so no row's
                # attention is padded to another's length (chunks may be far longer than the window).
                runs = [0] + [b for b in range(1, len(lengths)) if lengths[b] != 1 or lengths[b - 1] != 1]
                if len(runs) > 1:
                    bounds = zip(runs, runs[1:] + [len(lengths)])
                    plan.parts = [(lo, hi, view, view.plan(lengths[lo:hi], max(lengths[lo:hi])))
                                  for lo, hi in bounds if max(lengths[lo:hi]) > 0  # rows fed nothing: none
                                  for view in [self.rows(lo, hi)]]
                    return plan
        if decode:
            plan.slots = g.slot(start)
            after = [min(s + 1, g.capacity) for s in start_host]
            plan.written = (min(after), max(after))
        elif self.ops is reference:  # the Triton write kernel derives its slots itself
            keep = g.kept(start, lengths_t, n)
            b, j = keep.nonzero(as_tuple=True)
            plan.write = (b, j, g.slot(t[b, j]))
        if self.stores is not None and any(s is not None for s in self.stores):
            steps = []
            for b, store in enumerate(self.stores):
                if store is None:
                    steps.append(None)
                    continue
                plain = plan.row(b, full=decode and start_host[b] + 1 >= g.capacity)
                steps.append(store.step(start_host[b], lengths[b], plain))
            plan.recall = steps
        return plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan,
               sm_scale: float, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate a layer's new ``q [batch, n, heads, d]`` and ``k, v [batch, n, kv_heads, d]``,
        store ``k, v`` and return attention ``[batch, n, heads, d]`` of every row over its A(t)."""
        if plan.recall is not None:  # sinks + recalled blocks + window: streaming_trt.runtime.recall
            return recall_rows(self, layer, q, k, v, plan, sm_scale, sink_logits)
        if plan.parts is not None:
            out = torch.zeros_like(q)
            for lo, hi, view, part in plan.parts:
                w = part.text[0].shape[1]
                out[lo:hi, :w] = view.attend(layer, q[lo:hi, :w], k[lo:hi, :w], v[lo:hi, :w], part, sm_scale,
                                             sink_logits)
            return out
        k_cache, v_cache = self.keys[layer], self.values[layer]
        q_text, q_rank = plan.rotate(q)
        k = apply_rotary(k, *plan.text)
        if plan.decode:
            # The decode kernel reads the current token from the cache: write first.
            rows = torch.arange(k.shape[0], device=k.device)
            k_cache[rows, :, plan.slots] = k[:, 0].to(k_cache.dtype)
            v_cache[rows, :, plan.slots] = v[:, 0].to(v_cache.dtype)
            q_now = q_text[:, 0]
            out = self.ops.decode_attention(q_now, q_now if plan.rank is None else q_rank[:, 0], k_cache, v_cache,
                                            plan.seen_after, self.geometry, sm_scale, sink_logits, full=plan.full,
                                            written=plan.written)
            return out[:, None]
        out = self.ops.prefill_attention(q_text, q_rank, k, v, k_cache, v_cache, plan.start, plan.lengths,
                                         self.geometry, sm_scale, sink_logits)
        if plan.write is not None:
            b, j, s = plan.write
            k_cache[b, :, s] = k[b, j].to(k_cache.dtype)
            v_cache[b, :, s] = v[b, j].to(v_cache.dtype)
        else:
            self.ops.cache_write(k, v, k_cache, v_cache, plan.start, plan.lengths, self.geometry)
        return out

    def decode_plan(self, full: bool) -> StepPlan:
        """The plan of a decode step (one token per stream) from device state only, with no host
        reads: what a CUDA graph captures. Rank angles are always formed (equal to the text ones
        while ``t < C``); ``full`` must hold for every stream when True."""
        g, start = self.geometry, self.seen
        t = start.view(-1, 1)
        text = tuple(x.unsqueeze(2) for x in rotary_angles(self.inv_freq, t))
        rank = tuple(x.unsqueeze(2) for x in rotary_angles(self.inv_freq, g.rank(t)))
        return StepPlan(start=start, lengths=torch.ones_like(start), seen_after=start + 1, text=text, rank=rank,
                        decode=True, full=full, slots=g.slot(start))

    def full_after_decode(self) -> bool:
        """Whether every stream holds ``capacity`` tokens once a decode step stores one more (then
        decode needs no mask)."""
        return min(self.seen_host) + 1 >= self.capacity

    def advance(self, plan: StepPlan) -> None:
        """Count the step's tokens as stored (after every layer has attended): on the device in place,
        so a captured decode step updates the same tensor, and on the host when the plan carries
        ``lengths_host``."""
        self.seen.copy_(plan.seen_after)
        if plan.lengths_host is not None:
            self.count_host(plan.lengths_host)

    def count_host(self, lengths: list[int]) -> None:
        """Move the host mirror by a step whose device part ran without host reads (a replayed
        CUDA graph: ``seen`` was moved on the device by the graph itself)."""
        self.seen_host = [s + length for s, length in zip(self.seen_host, lengths)]

    def set_seen(self, seen: list[int]) -> None:
        """Set both copies of the stream counters (a restored session; a benchmark that skips ahead)."""
        self.seen.copy_(torch.as_tensor(seen, dtype=torch.int64))
        self.seen_host = [int(s) for s in seen]

    def rows(self, lo: int, hi: int) -> "StreamingCache":
        """Streams ``lo .. hi-1`` as a cache of their own that shares this one's memory: a forward
        over it stores into this cache (the batched server's decode step runs over such a view).
        Its host counters are a copy; the caller writes them back (``seen_host[lo:hi] = ...``)."""
        view = copy.copy(self)
        view.keys, view.values, view.seen = self.keys[:, lo:hi], self.values[:, lo:hi], self.seen[lo:hi]
        view.seen_host = self.seen_host[lo:hi]
        view.stores = None if self.stores is None else self.stores[lo:hi]
        return view

    def swap(self, a: int, b: int) -> None:
        """Exchange streams ``a`` and ``b`` (their slots, counters and block stores)."""
        idx, rev = [a, b], [b, a]
        self.keys[:, idx] = self.keys[:, rev]
        self.values[:, idx] = self.values[:, rev]
        self.seen[idx] = self.seen[rev]
        self.seen_host[a], self.seen_host[b] = self.seen_host[b], self.seen_host[a]
        if self.stores is not None:
            self.stores[a], self.stores[b] = self.stores[b], self.stores[a]

    def write_row(self, row: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Stream ``row`` takes ``keys``/``values [num_layers, kv_heads, capacity, head_dim]`` (any
        device) holding ``seen`` tokens."""
        self.keys[:, row].copy_(keys)
        self.values[:, row].copy_(values)
        self.seen[row] = seen
        self.seen_host[row] = int(seen)

    def read_row(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Copy stream ``row`` into ``keys``/``values`` (shapes as :meth:`write_row`); returns its ``seen``."""
        keys.copy_(self.keys[:, row])
        values.copy_(self.values[:, row])
        return self.seen_host[row]

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget streams ``rows`` (all when None); their slots are refilled, memory is kept."""
        rows = list(range(self.batch)) if rows is None else list(rows)
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.seen.device)
        self.keys[:, index] = self.fill_value
        self.values[:, index] = self.fill_value
        self.seen.index_fill_(0, index, 0)
        for r in rows:
            self.seen_host[r] = 0
