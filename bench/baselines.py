"""The methods a benchmark compares, as streams of token ids in, logits out.

The methods (names used in every CSV, table and plot):

- ``streaming``: this library's StreamingLLM cache, ``sink_tokens`` sinks plus a rolling window.
- ``recompute``: sliding window with re-computation, the contract's expensive baseline, on the
  same model and kernels: for every token t a fresh session re-encodes the tokens of A(t)
  (``Geometry.attended``, the contract's attended set) at positions 0..|A(t)|-1 in one ``feed``
  call and its last logits are kept. For a one-layer model it computes the same function as
  ``streaming``; with more layers it does not (the window's deeper-layer keys are re-derived from
  the truncated context), so its perplexity is its own line.
- ``dense``: a session whose window holds the whole text (the cache grows with the text).
- ``window``: window attention, ``sink_tokens = 0`` (ranked positions, as in the contract).
- ``hf-recompute``: outside reference, transformers' own model re-encoding A(t) for every token.
- ``hf-dense``: outside reference, transformers' own model with its ordinary growing cache
  (the dense decode a user of the installed transformers gets).
- ``attention-sinks``: the peer a user would pick instead, the ``attention_sinks`` package
  (needs transformers 4.34, so it runs in its own environment: see ``bench.peer_sinks``).

Runtime methods use the public session API only (``model.session``, ``feed``, ``reset``); the one
exception is :meth:`RuntimeStream.fill_random`, a timing shortcut that writes the cache's state
directly (documented there).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from streaming_trt.contract import Geometry, UserError

METHODS = ("streaming", "recompute", "dense", "window", "hf-recompute", "hf-dense", "attention-sinks", "onnx")
# attention-sinks needs its own environment (--sinks-python); onnx exports the model first (minutes for big ones)
DEFAULT_METHODS = METHODS[:-2]
RUNTIME_METHODS = ("streaming", "recompute", "dense", "window")
SLOW_METHODS = ("recompute", "hf-recompute")  # O(C^2) per token


class Stream:
    """One stream of one method. ``feed(ids [n]) -> float32 logits [n, vocab]``."""

    name = "?"

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        """Bytes of key/value state the method holds between tokens."""
        return 0


class RuntimeStream(Stream):
    """streaming / window / dense: one session of the runtime; chunks are fed as they come."""

    def __init__(self, name: str, model, sink_tokens: int, window: int, max_chunk: int = 512, recall=None):
        self.name = name
        with warnings.catch_warnings():
            # dense windows may exceed max_position_embeddings: that is what the baseline measures
            warnings.filterwarnings("ignore", message="capacity sink_tokens")
            self.session = model.session(sink_tokens=sink_tokens, window=window, max_chunk=max_chunk, recall=recall)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.session.feed(ids.view(1, -1))[0]

    def cache_bytes(self) -> int:
        return self.session.cache.nbytes()

    def fill_random(self, seen: int, seed: int = 0) -> None:
        """Put the cache in the state it has after ``seen`` tokens, with random keys/values
        (attention time does not depend on their values); instant where feeding takes minutes.

        The one place the bench writes the cache's state directly (timing only, never for a
        perplexity): the key/value tensors and the stream counter on the device and on the host."""
        cache = self.session.cache
        g = torch.Generator(device=cache.keys.device).manual_seed(seed)
        for t in (cache.keys, cache.values):
            t.normal_(generator=g)
        cache.set_seen([seen] * cache.batch)


class RecomputeStream(Stream):
    """Sliding window with re-computation on the runtime: per token t, a fresh session re-encodes
    the tokens of A(t) (the contract's attended set, ``Geometry.attended``) at positions
    0..|A(t)|-1 in one ``feed`` call. Keeps the ids of the tokens it may still need."""

    name = "recompute"

    def __init__(self, model, sink_tokens: int, window: int, max_chunk: int = 512):
        self.geometry = Geometry(sink_tokens, window)  # validates S and W with the runtime's message
        self.session = model.session(sink_tokens=sink_tokens, window=window, max_chunk=max_chunk)
        self.device = model.device
        self._reset_tokens()

    def _reset_tokens(self) -> None:
        self.tokens: dict[int, int] = {}  # text position u -> token id, only those A(t) may still hold
        self.t = -1

    def push(self, token: int) -> list[int]:
        """Record token t of the stream; return A(t)'s token ids in order."""
        self.t += 1
        self.tokens[self.t] = token
        attended = self.geometry.attended(self.t)
        gone = self.t - self.geometry.window  # left the window for good (unless a sink)
        if gone >= self.geometry.sink_tokens:
            self.tokens.pop(gone, None)
        return [self.tokens[u] for u in attended]

    def encode(self, ids: list[int]) -> torch.Tensor:
        """Logits of the last token of ``ids`` encoded from scratch: float32 ``[vocab]``."""
        self.session.reset()
        return self.session.feed(torch.tensor(ids, device=self.device).view(1, -1))[0, -1]

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.encode(self.push(int(t))) for t in ids.tolist()])

    def cache_bytes(self) -> int:
        return self.session.cache.nbytes()


class HFRecomputeStream(RecomputeStream):
    """transformers' model re-encoding A(t) from scratch for every token (no cache kept)."""

    name = "hf-recompute"

    def __init__(self, hf_model, sink_tokens: int, window: int, device: torch.device):
        self.hf, self.device = hf_model, device
        self.geometry = Geometry(sink_tokens, window)
        self._reset_tokens()

    @torch.inference_mode()
    def encode(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, device=self.device).view(1, -1)
        return self.hf(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    def cache_bytes(self) -> int:
        return 0


class OnnxStream(Stream):
    """The streaming model exported to ONNX (``streaming_trt.export.onnx``) and run by onnxruntime
    on the same weights and cache shape; the export is written once to a temporary folder."""

    name = "onnx"

    def __init__(self, model, sink_tokens: int, window: int, threads: int | None = None, provider: str = "cpu"):
        import tempfile

        from streaming_trt.export.onnx import OnnxSession, export_onnx

        self._dir = tempfile.TemporaryDirectory(prefix="bench-onnx-")
        path = export_onnx(model, f"{self._dir.name}/onnx", sink_tokens, window, triton=False)
        self.session = OnnxSession(path, provider=provider, threads=threads)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.session.feed(ids.view(1, -1).cpu())[0]

    def cache_bytes(self) -> int:
        return self.session.nbytes()


class HFDenseStream(Stream):
    """transformers' model with its ordinary growing cache (DynamicCache)."""

    name = "hf-dense"

    def __init__(self, hf_model, device: torch.device, max_chunk: int = 512):
        from transformers import DynamicCache

        self.hf, self.device, self.max_chunk = hf_model, device, max_chunk
        self.cache = DynamicCache(config=hf_model.config)
        # transformers >= 5.2x calls it ``cache``; older versions ``past_key_values``
        params = inspect.signature(type(hf_model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor, keep_logits: bool = True) -> torch.Tensor | None:
        out = []
        ids = ids.to(self.device).view(1, -1)
        for lo in range(0, ids.shape[1], self.max_chunk):
            r = self.hf(input_ids=ids[:, lo : lo + self.max_chunk], use_cache=True,
                        logits_to_keep=0 if keep_logits else 1, **{self.cache_kw: self.cache})
            out.append(r.logits[0].float())
        return torch.cat(out) if keep_logits else None

    def cache_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total


class SinksPeerStream(Stream):
    """The ``attention_sinks`` package (transformers 4.34) on the same weights, in its own Python
    (``python``: that environment's interpreter), driven token by token through
    :mod:`bench.peer_sinks`. Weights travel once as safetensors + config.json in a temp folder."""

    name = "attention-sinks"

    def __init__(self, python: str, built, sink_tokens: int, window: int, fill: int, seed: int, threads: int):
        from safetensors.torch import save_file

        if built.device.type != "cpu":
            raise UserError("attention-sinks is only run on the CPU here; drop it from --methods on CUDA")
        self._dir = tempfile.TemporaryDirectory(prefix="bench-sinks-")
        cfg = dict(built.config.to_hf_dict(), architectures=["LlamaForCausalLM"], torch_dtype="float32")
        cfg.pop("rope_parameters", None)  # transformers 4.34 reads rope_theta / rope_scaling
        Path(self._dir.name, "config.json").write_text(json.dumps(cfg))
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in built.tensors.items()},
                  str(Path(self._dir.name, "model.safetensors")), metadata={"format": "pt"})
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        try:
            self.proc = subprocess.Popen([python, "-m", "bench.peer_sinks"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        except OSError as e:
            raise UserError(f"--sinks-python {python}: cannot start it ({e.strerror})") from None
        self.version = self.ask(cmd="load", dir=self._dir.name, dtype="float32", threads=threads)["transformers"]
        self.ask(cmd="prepare", sink_tokens=sink_tokens, window=window, fill=fill, seed=seed)
        self.capacity = Geometry(sink_tokens, window).capacity
        self.last_seconds = float("nan")

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise UserError("the attention_sinks worker died; check --sinks-python's environment "
                            "(python -m bench.peer_sinks --help shows how to build it)")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise UserError(f"attention_sinks worker: {reply.get('error')}")
        return reply

    def step(self, token: int) -> float:
        """One decode step in the worker; returns its own timing of the model call (seconds)."""
        return self.ask(cmd="step", token=int(token))["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps(dict(cmd="quit")) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._dir.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def cache_shape(method: str, capacity: int, sink_tokens: int) -> tuple[int, int]:
    """(sink_tokens, window) of a method whose cache holds ``capacity`` tokens."""
    geometry = Geometry(0, capacity) if method == "window" else Geometry.with_capacity(capacity, sink_tokens)
    return geometry.sink_tokens, geometry.window
