"""Recall of evicted tokens: a host block store beside the StreamingLLM cache.

Contract: ``shared/design/semantics.md``, "Recall of evicted tokens". Tokens leaving the window
go, per layer, to a host store in blocks of ``B`` consecutive tokens (block ``j`` holds tokens
``S + jB .. S + (j+1)B - 1``; a partly evicted block waits in a staging buffer). Each block keeps
a summary in one common frame (its keys rotated back to position 0): Quest's per-channel min/max
(``scorer="bounds"``) or InfLLM's representative keys (``scorer="representative"``: the keys that
received the most attention from the queries of the window while they were in it).

Each forward (a decode step, or one chunk of a prompt) selects, per layer, the top ``k`` blocks
among those evicted before its first token: the query is rotated as if every block lay ``W``
tokens before it, every query head of every row gives each block its softmax share over the
blocks (:func:`~streaming_trt.kernels.recall_reference.block_votes`), and the blocks with the
most votes win. The rows then attend sinks + selected blocks (text order) + window at rank
positions. ``BlockStore.selected[layer]`` holds the block ids chosen by the last forward.

Device memory stays constant (the cache plus one ``k * B`` gather buffer); the store keeps at most
``budget_bytes`` of blocks and drops the oldest beyond that. Summaries live with the store on the
host (on CUDA, pinned), so selection reads the query back each layer: a synchronisation per layer.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import torch

from ..contract import Geometry, UserError
from ..kernels import recall_reference as R
from ..kernels import reference
from .rope import apply_rotary, rotary_angles

SCORERS = ("bounds", "representative")


@dataclasses.dataclass(frozen=True)
class Recall:
    """Settings of recall (see the module doc).

    block_size: B, tokens per block. top_k: k, blocks recalled per layer and forward (0 is plain
    StreamingLLM). scorer: ``bounds`` (Quest) or ``representative`` (InfLLM). representatives:
    keys kept per block and KV head by the representative scorer. budget_bytes: the most host
    memory the store may hold (keys, values and summaries); the oldest blocks are dropped first.
    chunk: a prompt is fed in chunks of at most this many tokens, each selecting its own blocks.
    positions: ``rank`` (the contract: recalled tokens at their ranks in A_R(t)) or ``fixed``
    (InfLLM's rule, outside the contract: every recalled key at distance W from the query, the
    sinks where they are without recall).
    """

    block_size: int = 64
    top_k: int = 4
    scorer: str = "bounds"
    representatives: int = 4
    budget_bytes: int = 2 << 30
    chunk: int = 64
    positions: str = "rank"

    def __post_init__(self):
        for name in ("block_size", "representatives", "budget_bytes", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"Recall {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UserError(f"Recall top_k must be an integer >= 0, got {self.top_k!r}")
        if self.positions not in ("rank", "fixed"):
            raise UserError(f"Recall positions must be rank or fixed, got {self.positions!r}")
        if self.scorer not in SCORERS:
            raise UserError(f"Recall scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.scorer == "representative" and self.representatives > self.block_size:
            raise UserError(f"Recall representatives ({self.representatives}) cannot exceed block_size ({self.block_size})")

    @property
    def slots(self) -> int:
        """Device slots recalled blocks take per layer: k * B."""
        return self.top_k * self.block_size


@dataclasses.dataclass
class RecallStep:
    """Host facts of one forward of one stream: tokens ``start .. start + length - 1``; ``blocks``
    complete blocks evicted before row ``start`` (the ones this forward may select)."""

    start: int
    length: int
    blocks: int
    plain: object = None  # the same StepPlan without recall, for the plain path


class BlockStore:
    """Evicted keys/values of one stream, every layer, in blocks (module doc). ``attend`` runs over a
    batch-1 view of the stream's cache row.

    ``keys``/``values``: per layer ``[stored, kv_heads, B, head_dim]`` in the cache dtype, on the
    host, growing up to ``max_blocks``; block ``j`` in row ``j % max_blocks``. Summaries float32:
    ``lo``/``hi [stored, kv_heads, head_dim]`` or ``reps [stored, kv_heads, r, head_dim]``.
    """

    def __init__(self, recall: Recall, config, geometry: Geometry, dtype: torch.dtype, device: torch.device,
                 inv_freq: torch.Tensor):
        self.recall, self.geometry, self.device, self.dtype = recall, geometry, device, dtype
        self.inv_freq = inv_freq
        L, kv, d, B = config.num_layers, config.num_kv_heads, config.head_dim, recall.block_size
        self.shape = (kv, B, d)
        item = torch.empty((), dtype=dtype).element_size()
        summary = 2 * kv * d * 4 if recall.scorer == "bounds" else kv * recall.representatives * d * 4
        self.block_bytes = L * (2 * kv * B * d * item + summary)
        self.max_blocks = recall.budget_bytes // self.block_bytes
        if self.max_blocks < 1 and recall.top_k > 0:
            raise UserError(f"Recall budget_bytes={recall.budget_bytes} holds no block: one block of {B} tokens "
                            f"takes {self.block_bytes} bytes over {L} layers; raise the budget or lower block_size")
        self.pin = device.type == "cuda"
        host = torch.device("cpu")
        self.stage_k = torch.zeros(L, kv, B, d, dtype=dtype, device=host)
        self.stage_v = torch.zeros(L, kv, B, d, dtype=dtype, device=host)
        self.stage_mass = torch.zeros(L, kv, B)
        self.slot_mass = torch.zeros(L, kv, geometry.capacity)  # attention received by each cache slot's token
        k = max(recall.top_k, 1)
        self.gather_k = torch.empty(k, kv, B, d, dtype=dtype, device=device)  # the k*B device slots
        self.gather_v = torch.empty(k, kv, B, d, dtype=dtype, device=device)
        self.score_angles = rotary_angles(inv_freq.cpu(), torch.tensor(geometry.window))  # blocks scored W back
        self.reset()

    def reset(self) -> None:
        L = len(self.stage_k)
        self.keys = [self._empty(0)] * L
        self.values = [self._empty(0)] * L
        self.summary = [None] * L
        self.count = [0] * L  # blocks committed (ids 0 .. count - 1 ever made)
        self.first = [0] * L  # oldest block id still stored
        self.selected: list[list[int]] = [[] for _ in range(L)]
        self.slot_mass.zero_()

    def state(self) -> dict:
        """A copy of everything the store holds (what a fork of the stream or a session file needs)."""
        clone = lambda x: [t.clone() for t in x]  # noqa: E731
        return dict(keys=clone(self.keys), values=clone(self.values), count=list(self.count), first=list(self.first),
                    summary=[None if s is None else tuple(clone(s)) for s in self.summary],
                    stage=(self.stage_k.clone(), self.stage_v.clone(), self.stage_mass.clone()),
                    slot_mass=self.slot_mass.clone(), selected=[list(x) for x in self.selected])

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned (the state itself is copied, not kept)."""
        clone = lambda x: [t.clone() for t in x]  # noqa: E731
        self.keys, self.values = clone(state["keys"]), clone(state["values"])
        self.count, self.first = list(state["count"]), list(state["first"])
        self.summary = [None if s is None else tuple(clone(s)) for s in state["summary"]]
        for mine, theirs in zip((self.stage_k, self.stage_v, self.stage_mass), state["stage"]):
            mine.copy_(theirs)
        self.slot_mass.copy_(state["slot_mass"])
        self.selected = [list(x) for x in state["selected"]]

    # -- session files -----------------------------------------------------------------------

    def settings(self) -> str:
        """The :class:`Recall` as JSON, for a session file's metadata."""
        return json.dumps(dataclasses.asdict(self.recall), sort_keys=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the store holds, as named host tensors for a session file."""
        out = {"recall.keys": torch.stack(self.keys), "recall.values": torch.stack(self.values),
               "recall.count": torch.tensor(self.count), "recall.first": torch.tensor(self.first),
               "recall.stage_k": self.stage_k, "recall.stage_v": self.stage_v,
               "recall.stage_mass": self.stage_mass, "recall.slot_mass": self.slot_mass}
        if self.summary[0] is not None:
            for i, parts in enumerate(zip(*self.summary)):
                out[f"recall.summary{i}"] = torch.stack(parts)
        return out

    def load_tensors(self, path, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`tensors` read from ``path``; ``UserError`` when they do not fit."""
        L = len(self.stage_k)
        try:
            keys, values = tensors["recall.keys"], tensors["recall.values"]
            count, first = tensors["recall.count"].tolist(), tensors["recall.first"].tolist()
            stage = [tensors[f"recall.{n}"] for n in ("stage_k", "stage_v", "stage_mass", "slot_mass")]
        except KeyError as e:
            raise UserError(f"{path}: the session file lacks the recall store's {e}") from None
        stored = min(max(count, default=0), self.max_blocks)
        parts = 2 if self.recall.scorer == "bounds" else 1
        summary = [tensors.get(f"recall.summary{i}") for i in range(parts)]
        ok = (keys.shape[:1] == (L,) and keys.shape[2:] == self.shape and keys.dtype == self.dtype
              and values.shape == keys.shape and values.dtype == self.dtype and keys.shape[1] >= stored
              and len(count) == L == len(first) and len(set(count)) <= 1 and len(set(first)) <= 1
              and all(0 <= f <= c and c - f <= self.max_blocks for f, c in zip(first, count))
              and all(a.shape == b.shape for a, b in zip(stage, (self.stage_k, self.stage_v, self.stage_mass,
                                                                 self.slot_mass)))
              and (all(x is None for x in summary) if stored == 0 else
                   all(x is not None and x.shape[:2] == (L, keys.shape[1]) for x in summary)))
        if not ok:
            raise UserError(f"{path}: the recall store in the session file does not fit Recall({self.settings()}) "
                            f"on this model")
        self.keys = [self._grow(keys[i], keys.shape[1]) for i in range(L)]
        self.values = [self._grow(values[i], keys.shape[1]) for i in range(L)]
        self.count, self.first = count, first
        self.summary = [None] * L if stored == 0 else [tuple(self._grow(x[i], x.shape[1]) for x in summary)
                                                       for i in range(L)]
        for mine, theirs in zip((self.stage_k, self.stage_v, self.stage_mass, self.slot_mass), stage):
            mine.copy_(theirs)

    def _empty(self, n: int, shape=None, dtype=None) -> torch.Tensor:
        return torch.empty(n, *(shape or self.shape), dtype=dtype or self.dtype, pin_memory=self.pin)

    def nbytes(self) -> int:
        """Host bytes the store holds now (blocks, summaries, staging)."""
        n = sum(t.nbytes for t in self.keys + self.values)
        n += sum(t.nbytes for s in self.summary if s is not None for t in s)
        return n + self.stage_k.nbytes + self.stage_v.nbytes + self.stage_mass.nbytes + self.slot_mass.nbytes

    def device_bytes(self) -> int:
        """Device bytes recall adds to the cache: the gather buffers (k * B slots, keys and values)."""
        return self.gather_k.nbytes + self.gather_v.nbytes

    # -- planning ----------------------------------------------------------------------------

    def step(self, start: int, length: int, plain) -> RecallStep:
        """The host facts of a forward of ``length`` tokens from ``start``; ``plain`` its StepPlan."""
        g, B = self.geometry, self.recall.block_size
        evicted = max(0, start + 1 - g.window - g.sink_tokens)  # tokens S .. start - W are gone for row start
        return RecallStep(start=start, length=length, blocks=evicted // B, plain=plain)

    # -- storing -----------------------------------------------------------------------------

    def _push(self, layer: int, u0: int, k: torch.Tensor, v: torch.Tensor, mass: torch.Tensor | None) -> None:
        """Stage evicted tokens ``u0 .. u0 + m - 1`` (``k, v [kv, m, d]`` rotated at their text
        positions, ``mass [kv, m]``), committing every block they complete."""
        S, B = self.geometry.sink_tokens, self.recall.block_size
        m, i = k.shape[1], 0
        while i < m:
            o = (u0 + i - S) % B
            take = min(B - o, m - i)
            self.stage_k[layer, :, o : o + take] = k[:, i : i + take].to("cpu", self.dtype)
            self.stage_v[layer, :, o : o + take] = v[:, i : i + take].to("cpu", self.dtype)
            if mass is not None:
                self.stage_mass[layer, :, o : o + take] = mass[:, i : i + take].to("cpu")
            i += take
            if o + take == B:
                self._commit(layer, (u0 + i - 1 - S) // B)

    def _commit(self, layer: int, j: int) -> None:
        assert j == self.count[layer], (j, self.count[layer])
        S, B, r = self.geometry.sink_tokens, self.recall.block_size, self.recall.representatives
        row = j % self.max_blocks
        if row >= len(self.keys[layer]):  # grow (doubling, up to max_blocks)
            size = min(self.max_blocks, max(4, 2 * len(self.keys[layer])))
            self.keys[layer] = self._grow(self.keys[layer], size)
            self.values[layer] = self._grow(self.values[layer], size)
            if self.summary[layer] is not None:
                self.summary[layer] = tuple(self._grow(t, size) for t in self.summary[layer])
        k, v = self.stage_k[layer], self.stage_v[layer]
        self.keys[layer][row] = k
        self.values[layer][row] = v
        # The block's keys in one frame: rotated back by their text positions.
        pos = -torch.arange(S + j * B, S + (j + 1) * B)
        k0 = apply_rotary(k.float(), *rotary_angles(self.inv_freq.cpu(), pos))  # [kv, B, d]
        if self.recall.scorer == "bounds":
            parts = (k0.amin(1), k0.amax(1))
        else:
            top = self.stage_mass[layer].topk(r, dim=-1).indices.sort(-1).values  # [kv, r]
            parts = (torch.gather(k0, 1, top.unsqueeze(-1).expand(-1, -1, k0.shape[-1])),)
        if self.summary[layer] is None:
            self.summary[layer] = tuple(self._grow(torch.empty(0, *p.shape), len(self.keys[layer])) for p in parts)
        for t, p in zip(self.summary[layer], parts):
            t[row] = p
        self.count[layer] = j + 1
        self.first[layer] = max(self.first[layer], j + 1 - self.max_blocks)

    def _grow(self, t: torch.Tensor, size: int) -> torch.Tensor:
        new = torch.empty(size, *t.shape[1:], dtype=t.dtype, pin_memory=self.pin)
        new[: len(t)] = t
        return new

    # -- selecting ---------------------------------------------------------------------------

    def block_scores(self, layer: int, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``q [n, heads, d]`` scoring queries (rotated at ``W``) -> ``[n, heads, len(ids)]``."""
        rows = ids % self.max_blocks
        parts = [t.index_select(0, rows) for t in self.summary[layer]]
        if self.recall.scorer == "bounds":
            return R.bound_scores(q, *parts)
        return R.representative_scores(q, parts[0])

    def select(self, layer: int, q: torch.Tensor, available: int, sm_scale: float,
               scoring: torch.Tensor | None = None) -> list[int]:
        """Ids (ascending) of the top-k blocks among those stored and ``< available``, for the
        unrotated queries ``q [n, heads, d]`` of one forward (``scoring``: the same already rotated
        at ``W`` on the host, float32)."""
        lo, k = self.first[layer], self.recall.top_k
        if available <= lo or k == 0:
            return []
        ids = torch.arange(lo, available)
        if len(ids) <= k:  # every block is chosen: no scores needed
            return ids.tolist()
        qd = apply_rotary(q.float().cpu(), *self.score_angles) if scoring is None else scoring
        votes = R.block_votes(self.block_scores(layer, qd, ids), sm_scale)
        return sorted(ids[votes.topk(k).indices].tolist())

    # -- attending ---------------------------------------------------------------------------

    def attend(self, cache, layer: int, q, k, v, plan, sm_scale: float, sink_logits=None) -> torch.Tensor:
        """:meth:`StreamingCache.attend` with recall, for a batch of one stream."""
        step: RecallStep = plan.recall
        self.evict(cache, layer, step)
        return self.attend_selected(cache, layer, q, k, v, plan, self.choose(layer, q[0], step, sm_scale),
                                    sm_scale, sink_logits)

    def evict(self, cache, layer: int, step: RecallStep) -> None:
        """Tokens the forward of ``step`` evicts that sit in ``cache`` (a batch-1 view) go to the store."""
        g = self.geometry
        S, W = g.sink_tokens, g.window
        start, end = step.start, step.start + step.length
        lo_u, hi_u = max(S, start - W), min(start - 1, end - 1 - W)
        if hi_u >= lo_u:
            k_cache, v_cache = cache.keys[layer], cache.values[layer]
            us = torch.arange(lo_u, hi_u + 1)
            slots = g.slot(us).to(k_cache.device)
            self._push(layer, lo_u, k_cache[0, :, slots], v_cache[0, :, slots],
                       self.slot_mass[layer][:, g.slot(us)] if self.recall.scorer == "representative" else None)

    def choose(self, layer: int, q: torch.Tensor, step: RecallStep, sm_scale: float,
               scoring: torch.Tensor | None = None) -> list[int]:
        """The blocks the forward of ``step`` attends to (``q [n, heads, d]`` its queries; ``scoring``
        as for :meth:`select`), recorded in ``selected``."""
        ids = self.select(layer, q, step.blocks, sm_scale, scoring)
        self.selected[layer] = ids
        return ids

    def attend_selected(self, cache, layer: int, q, k, v, plan, ids: list[int], sm_scale: float,
                        sink_logits=None) -> torch.Tensor:
        """The attention of :meth:`attend` once the evicted tokens are stored and blocks ``ids`` chosen."""
        step: RecallStep = plan.recall
        g = self.geometry
        S, W = g.sink_tokens, g.window
        start, end = step.start, step.start + step.length
        k_cache = cache.keys[layer]
        want_mass = self.recall.scorer == "representative"
        mass = k_rot = None
        if not ids:
            if want_mass or end - W > start:
                k_rot = apply_rotary(k, *plan.text)
            if want_mass:
                q_text, q_rank = plan.rotate(q)
                mass = R.attention_mass(q_text, q_rank, k_rot, k_cache, plan.start, plan.lengths, g, sm_scale)[0].cpu()
            out = cache.attend(layer, q, k, v, step.plain, sm_scale, sink_logits)
        else:
            out, k_rot, mass = self._attend_recalled(cache, layer, q, k, v, plan, ids, sm_scale, sink_logits, want_mass)
        # 3. Rows of this chunk that its own later rows evict, and the attention mass bookkeeping.
        if end - W > start:
            lo_c = max(S, start)
            self._push(layer, lo_c, k_rot[0, lo_c - start : end - W - start].transpose(0, 1),
                       v[0, lo_c - start : end - W - start].transpose(0, 1),
                       None if mass is None else mass[:, g.capacity + lo_c - start : g.capacity + end - W - start])
        if mass is not None:
            self.slot_mass[layer] += mass[:, : g.capacity]
            kept = range(max(start, end - W), end)
            kept = [u for u in kept if u >= S] + [u for u in range(start, min(end, S))]
            if kept:
                idx = torch.tensor(kept)
                self.slot_mass[layer][:, g.slot(idx)] = mass[:, g.capacity + idx - start]
        return out

    def _attend_recalled(self, cache, layer, q, k, v, plan, ids, sm_scale, sink_logits, want_mass):
        """Attention over sinks + blocks ``ids`` + window; also the rotated keys and, with
        ``want_mass``, the attention mass of the cache slots (and chunk rows) ``[kv, C (+ n)]``."""
        g, B = self.geometry, self.recall.block_size
        n_sel = len(ids)
        k_cache, v_cache = cache.keys[layer], cache.values[layer]
        rows = torch.tensor(ids) % self.max_blocks
        bk, bv = self.gather_k[:n_sel], self.gather_v[:n_sel]
        if self.keys[layer].device == bk.device:
            torch.index_select(self.keys[layer], 0, rows, out=bk)
            torch.index_select(self.values[layer], 0, rows, out=bv)
        else:  # pinned host -> device
            bk.copy_(self.keys[layer].index_select(0, rows), non_blocking=True)
            bv.copy_(self.values[layer].index_select(0, rows), non_blocking=True)
        # Every row is past capacity: the query's rank is C - 1 + n_sel * B. Block i (id j) holds
        # ranks S + iB + o for text positions S + jB + o: the query rotated at rank + (j - i) B
        # gives each of its keys its rank distance.
        if self.recall.positions == "rank":
            rank = g.capacity - 1 + n_sel * B
            pos = torch.tensor([rank] + [rank + (j - i) * B for i, j in enumerate(ids)], device=q.device)
        else:  # InfLLM: sinks as without recall, every recalled key W before the query
            rank = g.capacity - 1
            pos = torch.tensor([rank] + [g.window] * n_sel, device=q.device)
            u = torch.tensor(ids).view(-1, 1) * B + g.sink_tokens + torch.arange(B).view(1, -1)  # [n_sel, B]
            back = rotary_angles(self.inv_freq, -u.to(q.device))  # keys back to position 0
            bk = apply_rotary(bk, *(x.unsqueeze(1) for x in back))
        cos, sin = rotary_angles(self.inv_freq, pos)  # [1 + n_sel, half]
        n = q.shape[1]
        cos = torch.cat([plan.text[0].expand(-1, -1, 1, -1), cos.view(1, 1, -1, cos.shape[-1]).expand(1, n, -1, -1)], 2)
        sin = torch.cat([plan.text[1].expand(-1, -1, 1, -1), sin.view(1, 1, -1, sin.shape[-1]).expand(1, n, -1, -1)], 2)
        q_all = apply_rotary(q.unsqueeze(3).expand(-1, -1, -1, 2 + n_sel, -1), cos.unsqueeze(2), sin.unsqueeze(2))
        q_text, q_sink, q_block = q_all[:, :, :, 0], q_all[:, :, :, 1], q_all[:, :, :, 2:]
        k_rot = apply_rotary(k, *plan.text)
        mass = None
        if plan.decode:
            slot = plan.slots
            k_cache[0, :, slot] = k_rot[0, 0].to(k_cache.dtype).unsqueeze(1)
            v_cache[0, :, slot] = v[0, 0].to(v_cache.dtype).unsqueeze(1)
            attention = R.recall_decode_attention
            if cache.ops is not reference and not want_mass:  # the Triton kernel (CUDA)
                from ..kernels.recall_triton import recall_decode_attention as attention  # needs triton (optional)
            out = attention(q_text[:, 0], q_sink[:, 0], q_block[:, 0], k_cache, v_cache, bk[None], bv[None], g,
                            sm_scale, sink_logits, **({"mass": True} if want_mass else {}))
            if want_mass:
                out, mass = out
                # The new token's own slot is this step's row, not a cache slot: its mass moves there.
                mass = torch.cat([mass[0].cpu(), mass[0, :, slot].cpu()], 1)
                mass[:, slot] = 0
            return out[:, None], k_rot, mass
        out = R.recall_prefill_attention(q_text, q_sink, q_block, k_rot, v, k_cache, v_cache, bk[None], bv[None],
                                         plan.start, plan.lengths, g, sm_scale, sink_logits, mass=want_mass)
        if want_mass:
            out, mass = out
            mass = mass[0].cpu()
        reference.cache_write(k_rot, v, k_cache, v_cache, plan.start, plan.lengths, g)
        return out, k_rot, mass


def attend_rows(cache, layer: int, q, k, v, plan, sm_scale: float, sink_logits=None) -> torch.Tensor:
    """:meth:`StreamingCache.attend <streaming_trt.runtime.cache.StreamingCache.attend>` for a batch whose
    rows have block stores of their own (``cache.stores[b]``, ``plan.recall[b]``; None for a row
    without). Storing and selection are per row (each row its own blocks); in a decode step of
    full rows (rank positions, bounds scorer) the rows that recall the same number of blocks then
    attend in one batched call; anything else attends row by row."""
    steps, stores = plan.recall, cache.stores
    batch = len(steps)
    batched = plan.decode and len({s.recall.block_size for s in stores if s is not None}) == 1 and all(
        step is not None and store.recall.positions == "rank" and store.recall.scorer == "bounds"
        for step, store in zip(steps, stores))
    if batched:
        _evict_decode_rows(cache, layer, steps)
        scoring = apply_rotary(q[:, 0].float().cpu(), *stores[0].score_angles)  # [batch, heads, d], every row at W
        chosen = [store.choose(layer, q[b], step, sm_scale, scoring[b : b + 1])
                  for b, (store, step) in enumerate(zip(stores, steps))]
        recalling = [b for b, ids in enumerate(chosen) if ids]  # full rows (blocks are evicted only past C)
        if not recalling:  # no row recalls a block: plain StreamingLLM, all rows at once
            return cache.attend(layer, q, k, v, dataclasses.replace(plan, recall=None), sm_scale, sink_logits)
        if len({len(chosen[b]) for b in recalling}) == 1:
            out = torch.empty_like(q)
            out[recalling] = _attend_recalled_rows(cache, layer, q, k, v, plan, recalling,
                                                   [chosen[b] for b in recalling], sm_scale, sink_logits)
            for b in (b for b, ids in enumerate(chosen) if not ids):  # rows not yet past capacity
                one = slice(b, b + 1)
                out[one] = cache.rows(b, b + 1).attend(layer, q[one], k[one], v[one], steps[b].plain, sm_scale,
                                                       sink_logits)
            return out
    outs = []
    for b, step in enumerate(steps):
        view, one = cache.rows(b, b + 1), slice(b, b + 1)
        if step is None:
            outs.append(view.attend(layer, q[one], k[one], v[one], plan.row(b, full=plan.full), sm_scale, sink_logits))
            continue
        mine = dataclasses.replace(step.plain, recall=step)
        if batched:  # stored and chosen above
            outs.append(stores[b].attend_selected(view, layer, q[one], k[one], v[one], mine, chosen[b], sm_scale,
                                                  sink_logits))
        else:
            outs.append(stores[b].attend(view, layer, q[one], k[one], v[one], mine, sm_scale, sink_logits))
    return outs[0] if batch == 1 else torch.cat(outs, 0)


def _evict_decode_rows(cache, layer: int, steps: list[RecallStep]) -> None:
    """:meth:`BlockStore.evict` of a decode step of full rows: each row's token ``start - W`` (when
    past the sinks) leaves its window; read from the cache in one gather."""
    g = cache.geometry
    rows = [b for b, step in enumerate(steps) if step.start - g.window >= g.sink_tokens]
    if not rows:
        return
    us = torch.tensor([steps[b].start - g.window for b in rows])
    index = torch.tensor(rows)
    slots = g.slot(us)
    device = cache.keys.device
    k = cache.keys[layer][index.to(device), :, slots.to(device)].cpu()  # [rows, kv, d]
    v = cache.values[layer][index.to(device), :, slots.to(device)].cpu()
    for i, b in enumerate(rows):
        store = cache.stores[b]
        mass = store.slot_mass[layer][:, slots[i : i + 1]] if store.recall.scorer == "representative" else None
        store._push(layer, int(us[i]), k[i].unsqueeze(1), v[i].unsqueeze(1), mass)


def _attend_recalled_rows(cache, layer: int, q, k, v, plan, rows: list[int], chosen: list[list[int]],
                          sm_scale: float, sink_logits) -> torch.Tensor:
    """A decode step of full ``rows`` of the batch that each recall ``len(chosen[i])`` blocks (one
    number), in one batched call: what :meth:`BlockStore._attend_recalled` does for one row, for
    all of them. Returns ``[len(rows), 1, heads, d]``."""
    g = cache.geometry
    stores = [cache.stores[b] for b in rows]
    batch, n_sel = len(chosen), len(chosen[0])
    if batch < len(cache.stores):  # a subset of the rows: theirs only
        index = torch.tensor(rows, device=q.device)
        q, k, v = q[index], k[index], v[index]
        plan = dataclasses.replace(plan, text=tuple(x[index] for x in plan.text), slots=plan.slots[index])
    else:
        index = torch.arange(batch, device=q.device)
    B = stores[0].recall.block_size
    kv, d = k.shape[2], k.shape[3]
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    bk = torch.empty(batch, n_sel, kv, B, d, dtype=k_cache.dtype, device=k_cache.device)
    bv = torch.empty_like(bk)
    for b, (store, ids) in enumerate(zip(stores, chosen)):
        rows = torch.tensor(ids) % store.max_blocks
        if store.keys[layer].device == bk.device:
            torch.index_select(store.keys[layer], 0, rows, out=bk[b])
            torch.index_select(store.values[layer], 0, rows, out=bv[b])
        else:  # pinned host -> device
            bk[b].copy_(store.keys[layer].index_select(0, rows), non_blocking=True)
            bv[b].copy_(store.values[layer].index_select(0, rows), non_blocking=True)
    # As for one row: the query at rank C - 1 + n_sel * B, and at rank + (j - i) B for block i (id j).
    rank = g.capacity - 1 + n_sel * B
    pos = torch.tensor([[rank] + [rank + (j - i) * B for i, j in enumerate(ids)] for ids in chosen], device=q.device)
    cos, sin = rotary_angles(stores[0].inv_freq, pos)  # [batch, 1 + n_sel, half]
    half = cos.shape[-1]
    cos = torch.cat([plan.text[0], cos.view(batch, 1, 1 + n_sel, half)], 2)  # [batch, 1, 2 + n_sel, half]
    sin = torch.cat([plan.text[1], sin.view(batch, 1, 1 + n_sel, half)], 2)
    q_all = apply_rotary(q.unsqueeze(3).expand(-1, -1, -1, 2 + n_sel, -1), cos.unsqueeze(2), sin.unsqueeze(2))
    q_text, q_sink, q_block = q_all[:, :, :, 0], q_all[:, :, :, 1], q_all[:, :, :, 2:]
    k_rot = apply_rotary(k, *plan.text)
    k_cache[index, :, plan.slots] = k_rot[:, 0].to(k_cache.dtype)
    v_cache[index, :, plan.slots] = v[:, 0].to(v_cache.dtype)
    if batch < len(cache.stores):
        k_cache, v_cache = k_cache[index], v_cache[index]
    attention = R.recall_decode_attention
    if cache.ops is not reference:  # the Triton kernel (CUDA)
        from ..kernels.recall_triton import recall_decode_attention as attention  # needs triton (optional)
    out = attention(q_text[:, 0], q_sink[:, 0], q_block[:, 0], k_cache, v_cache, bk, bv, g, sm_scale, sink_logits)
    return out[:, None]


def recall_from_file(path, text: str) -> Recall:
    """The :class:`Recall` a session file's metadata names."""
    try:
        return Recall(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: the session file's recall settings are unreadable ({e})") from None


def attach(recall: Recall, model, cache) -> BlockStore:
    """Give ``cache`` (one stream of ``model``) a block store for ``recall``; ``UserError`` for
    what this implementation does not do."""
    if cache.batch != 1:
        raise UserError(f"recall keeps one stream's evicted tokens: open the session with batch=1 (got batch={cache.batch})")
    store = new_store(recall, model, cache.geometry)
    cache.stores = [store]
    return store


def new_store(recall: Recall, model, geometry: Geometry) -> BlockStore:
    """An empty block store of one stream of ``model`` (warns where recalled ranks pass the
    model's positions)."""
    if not isinstance(recall, Recall):
        raise UserError(f"recall must be a streaming_trt.Recall(...), got {type(recall).__name__}")
    limit = model.config.max_position_embeddings
    if limit is not None and geometry.capacity + recall.slots > limit:
        warnings.warn(f"sink_tokens + window + top_k x block_size = {geometry.capacity + recall.slots} exceeds the "
                      f"model's max_position_embeddings ({limit}): recalled tokens take ranks the model never saw",
                      stacklevel=4)
    return BlockStore(recall, model.config, geometry, model.dtype, model.device, model.inv_freq)
