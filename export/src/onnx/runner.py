"""Running an ONNX export on onnxruntime as a stream session (:class:`streaming_trt.runtime.session.StreamSession`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import Geometry, UserError
from streaming_trt.runtime.rope import rotary_angles
from streaming_trt.runtime.session import StreamSession, feed_chunks, sink_token_starts, token_batch

from .graph import INPUTS, io_names
from .writer import FORMAT, VERSION


def rotary_inputs(inv_freq: torch.Tensor, seen, n: int, geometry: Geometry):
    """cos_text, sin_text, cos_rank, sin_rank: float32 ``[b, n, rotary_dim // 2]`` numpy arrays
    for rows ``t = seen[b] + i`` (rank: ``geometry.rank(t)``), from the runtime's exact angles.

    ``inv_freq``: ``[rotary_dim // 2]`` float64 (the manifest's ``rotary.inv_freq``).
    """
    t = torch.as_tensor(list(seen), dtype=torch.int64)[:, None] + torch.arange(n)[None, :]
    out = []
    for pos in (t, geometry.rank(t)):
        out += [x.numpy() for x in rotary_angles(inv_freq, pos)]
    return tuple(out)


def load_manifest(path: str | Path) -> dict:
    """``path/manifest.json`` of an export, checked."""
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise UserError(f"{path}: no manifest.json; export one with python -m streaming_trt.cli.build --format onnx")
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise UserError(f"{file}: not a {FORMAT} v{VERSION} manifest (got {m.get('format')} v{m.get('version')})")
    if not (path / m["model_file"]).is_file():
        raise UserError(f"{path / m['model_file']}: missing")
    return m


class OnnxSession(StreamSession):
    """A batch of streams run by onnxruntime on an exported graph; the same ``feed`` as
    :class:`streaming_trt.runtime.session.Session` (a :class:`~streaming_trt.runtime.session.StreamSession`), so
    ``st.generate_tokens/generate_text`` accept it. Logits come back on the CPU.

    The caches stay on the execution provider's device between calls (I/O binding, two buffers per
    cache swapped each call); only ids, lengths, cos/sin go in and logits come out.

    Args:
        path: an export directory (``manifest.json`` + ``model.onnx``).
        batch: number of streams.
        provider: ``cpu``, ``cuda`` or an onnxruntime provider name.
        max_chunk: longer feeds run in pieces of this many tokens (default: the export profile's).
        threads: intra-op threads (None: onnxruntime's default).
        sink_tokens, window: another geometry than the export's (the graph takes ``sink_tokens``
            as an input and the capacity from the caches' shape; a TensorRT engine is built for one
            capacity, see ``build_trt_engine.sh``).
    """

    def __init__(self, path: str | Path, batch: int = 1, provider: str = "cpu", max_chunk: int | None = None,
                 threads: int | None = None, sink_tokens: int | None = None, window: int | None = None):
        import onnxruntime as ort  # the [export] extra, optional

        self.path = Path(path)
        self.manifest = m = load_manifest(self.path)
        if not isinstance(batch, int) or batch < 1:
            raise UserError(f"batch must be an integer >= 1, got {batch!r}")
        self.config = ModelConfig.from_hf_dict(m["config"], source=str(self.path / "manifest.json"))
        self.device = torch.device("cpu")
        self.geometry = Geometry(m["sink_tokens"] if sink_tokens is None else sink_tokens,
                                 m["window"] if window is None else window)
        self.batch = batch
        self.max_chunk = max_chunk or m["profile"]["max_chunk"]
        self.inv_freq = torch.tensor(m["rotary"]["inv_freq"], dtype=torch.float64)
        names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
        prov = names.get(provider, provider)
        if prov not in ort.get_available_providers():
            raise UserError(f"onnxruntime provider {prov} is not available here (available: "
                            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.ort = ort.InferenceSession(str(self.path / m["model_file"]), so, providers=[prov])
        self._ort_value = lambda array: ort.OrtValue.ortvalue_from_numpy(
            array, "cuda" if prov == "CUDAExecutionProvider" else "cpu", 0)
        self._np_dtype = np.float16 if m["dtype"] == "float16" else np.float32
        c = self.config
        self._cache_shape = (batch, c.num_kv_heads, self.geometry.capacity, c.head_dim)
        self._names = io_names(c.num_layers)
        self._bufs = [[self._zeros() for _ in range(2 * c.num_layers)] for _ in range(2)]
        self._cur = 0
        self._seen = [0] * batch
        self.last_logits: torch.Tensor | None = None

    def _zeros(self):
        return self._ort_value(np.zeros(self._cache_shape, dtype=self._np_dtype))

    @property
    def seen(self) -> list[int]:
        return list(self._seen)

    def nbytes(self) -> int:
        return 2 * self.config.num_layers * int(np.prod(self._cache_shape)) * np.dtype(self._np_dtype).itemsize

    def reset(self, rows: list[int] | None = None) -> None:
        """Start streams ``rows`` (all when None) afresh."""
        if rows is None or set(rows) >= set(range(self.batch)):
            self._bufs = [[self._zeros() for _ in b] for b in self._bufs]
            self._seen = [0] * self.batch
            self.last_logits = None
            return
        # Stale slots of a restarted stream are never attended (A(t) is derived from seen).
        for r in rows:
            self._seen[r] = 0
        if self.last_logits is not None:
            self.last_logits[list(rows)] = 0

    def save(self, path) -> None:
        raise UserError("an onnxruntime session cannot be saved; use the eager runtime's Session for save/load")

    def _run(self, ids: torch.Tensor, part: list[int], all_rows: bool) -> torch.Tensor:
        """One graph call on ``ids [batch, width]`` (a forward of :func:`feed_chunks`): logits
        ``[batch, width, vocab]``, or each row's newest ``[batch, vocab]`` (torch, CPU)."""
        width = ids.shape[1]
        if all_rows:
            logits_index = np.tile(np.arange(width, dtype=np.int64), (self.batch, 1))
        else:
            logits_index = np.asarray([[max(p - 1, 0)] for p in part], dtype=np.int64)
        cos_t, sin_t, cos_r, sin_r = rotary_inputs(self.inv_freq, self._seen, width, self.geometry)
        b = self.ort.io_binding()
        feeds = {"input_ids": ids.cpu().numpy().astype(np.int64), "logits_index": logits_index,
                 "seen": np.asarray(self._seen, dtype=np.int64), "lengths": np.asarray(part, dtype=np.int64),
                 "sink_tokens": np.full(self.batch, self.sink_tokens, dtype=np.int64),
                 "cos_text": cos_t, "sin_text": sin_t, "cos_rank": cos_r, "sin_rank": sin_r}
        for k, v in feeds.items():
            b.bind_cpu_input(k, np.ascontiguousarray(v))
        ins, outs = self._names
        past, present = self._bufs[self._cur], self._bufs[1 - self._cur]
        for name, val in zip(ins[len(INPUTS):], past):
            b.bind_ortvalue_input(name, val)
        b.bind_output("logits", "cpu")
        b.bind_output("seen_out", "cpu")
        for name, val in zip(outs[2:], present):
            b.bind_ortvalue_output(name, val)
        self.ort.run_with_iobinding(b)
        self._cur = 1 - self._cur
        self._seen = [s + p for s, p in zip(self._seen, part)]
        logits = torch.from_numpy(b.get_outputs()[0].numpy())
        return logits if all_rows else logits[:, 0]

    def feed(self, tokens, lengths=None, all_logits: bool = True) -> torch.Tensor:
        """As :meth:`streaming_trt.runtime.session.Session.feed`: float32 logits ``[batch, n, vocab]`` of every
        token fed (zero past a stream's length), or ``[batch, vocab]`` with ``all_logits=False``."""
        tokens, lengths = token_batch(tokens, lengths, self.batch, self.config.vocab_size, self.device)
        starts = sink_token_starts(self.config.sink_token_id, lengths, self._seen)
        if starts is not None:  # a sink-token model's token 0, once per stream
            self._run(torch.full((self.batch, 1), self.config.sink_token_id, dtype=torch.int64), starts, False)
        logits, self.last_logits = feed_chunks(tokens, lengths, self.max_chunk, self._run, all_logits,
                                               self.config.vocab_size, self.device, self.last_logits)
        return logits if all_logits else self.last_logits
