"""The decode step captured in CUDA graphs: one graph per (batch, cache full or not).

A decode step reads only device state (the cache's ``seen`` counters, the token buffer) through
:meth:`StreamingCache.decode_plan`, so after one eager step of each kind (which compiles the
kernels and initialises cuBLAS) it is captured once and replayed for every later token.
"""
from __future__ import annotations

import torch


class DecodeGraphs:
    """Replays captured decode steps of ``model`` over ``cache``.

    ``__call__(tokens [batch, 1] int64 on the device) -> [batch, vocab]`` float32 logits (a
    buffer reused by the next step: copy it to keep it), exactly what ``model(tokens, cache,
    [1] * batch, last_only=True)`` returns.
    """

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.warm: set[bool] = set()

    def step(self, tokens: torch.Tensor, full: bool) -> torch.Tensor:
        """The decode step as captured, run eagerly (also how the tests check it on a CPU)."""
        return self.model.run(tokens, self.cache, self.cache.decode_plan(full), last_only=True)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        full = cache.full_after_decode()
        if full not in self.warm:  # first step of this kind runs eagerly: kernels compile, cuBLAS initialises
            self.warm.add(full)
            out = self.step(tokens, full)
        else:
            if full not in self.graphs:
                self.graphs[full] = self._capture(tokens, full)
            graph, static_tokens, static_out = self.graphs[full]
            static_tokens.copy_(tokens)
            graph.replay()
            out = static_out
        cache.count_host([1] * cache.batch)  # the graph moved seen on the device
        return out

    def _capture(self, tokens: torch.Tensor, full: bool):
        static_tokens = tokens.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):  # recorded, not run: the cache is untouched
            static_out = self.step(static_tokens, full)
        return graph, static_tokens, static_out
