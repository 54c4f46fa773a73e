"""ONNX export of the streaming step, and a session-like runner on onnxruntime.

One graph computes a chunk of ``1..N`` tokens per stream (decode and chunked prefill alike) over
explicit K/V caches in the runtime's layout. See docs/onnx.md.

Graph inputs (``b`` streams, ``n`` chunk rows, ``m`` logit rows, ``C = S + W``, ``h = rotary_dim // 2``):

- ``input_ids`` int64 ``[b, n]``: the chunk, right-padded (rows past ``lengths`` are ignored);
- ``logits_index`` int64 ``[b, m]``: which chunk rows to return logits for (``arange(n)`` for all,
  ``lengths - 1`` for each stream's newest);
- ``seen`` int64 ``[b]``: tokens stored per stream before this chunk; ``lengths`` int64 ``[b]``;
- ``cos_text``/``sin_text`` float32 ``[b, n, h]``: rotary angles of each row's text position
  ``t = seen + i``; ``cos_rank``/``sin_rank``: at its rank ``min(t, C - 1)``. Host-computed
  (:func:`rotary_inputs`): ``t * inv_freq`` in float64, reduced mod 2*pi, then cos/sin in float32;
  TensorRT has no float64, and float32 angles are wrong by tenths of a radian at t = 4e6.
- ``past_key.{i}``/``past_value.{i}`` ``[b, kv_heads, C, head_dim]`` (model dtype), every layer ``i``.

Outputs: ``logits`` float32 ``[b, m, vocab]`` (zero for rows ``>= lengths``), ``seen_out`` int64
``[b]`` (= ``seen + lengths``), ``present_key.{i}``/``present_value.{i}`` (the caches after the chunk).

Cache layout (the runtime's): token ``u`` in slot ``u`` if ``u < S`` else ``S + (u - S) % W``; keys
stored rotated at their text position. The query is rotated at ``t`` for window keys and at
``min(t, C - 1)`` for sink keys (shared/design/semantics.md, "Equivalently, and cheaper"). The slot
bookkeeping (which slot holds which token, A(t), which chunk rows survive) is computed in the graph
from ``seen`` and ``lengths``; the ring write is one ``ScatterND`` per cache.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from streaming_trt.contract import UserError

FORMAT = "streaming-trt-onnx"
VERSION = 1
MODEL_FILE = "model.onnx"
OPSET = 20
DTYPES = {"float32": torch.float32, "float16": torch.float16}
TWO_GB = 2 * 10**9
OPTIMIZE = True

__all__ = ["OnnxSession", "export_onnx", "rotary_inputs", "onnx_step_latency", "trtexec_command",
           "write_triton_onnx_repos", "load_manifest"]


# ------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------

def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate-half RoPE of ``x [b, n, heads, d]`` by ``cos/sin [b, n, 1, half]``; ``rest`` untouched."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half: 2 * half]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if 2 * half < x.shape[-1]:
        parts.append(x[..., 2 * half:])
    return torch.cat(parts, dim=-1)


class StreamingStep(nn.Module):
    """The streaming step as plain torch ops with explicit caches: what :func:`export_onnx` traces.

    Reads the weights of a :class:`streaming_trt.model.Transformer` by module name; never touches
    the runtime's cache or attention code. ``forward`` takes and returns the tensors listed in the
    module docstring (past caches as ``*past``: keys and values interleaved per layer).
    """

    def __init__(self, model, sink_tokens: int, window: int):
        super().__init__()
        self.model = model
        self.c = model.config
        self.S, self.W = int(sink_tokens), int(window)
        self.C = self.S + self.W

    def forward(self, input_ids, logits_index, seen, lengths, sink_tokens, cos_text, sin_text, cos_rank,
                sin_rank, *past):
        c, m = self.c, self.model
        b, n = input_ids.shape
        C = past[0].shape[2]
        kvh, d = c.num_kv_heads, c.head_dim
        g = c.num_heads // kvh
        dev = input_ids.device
        S = sink_tokens[:, None]  # [b, 1]; per stream, W = C - S
        W = C - S
        i = torch.arange(n, device=dev)
        t = seen[:, None] + i[None, :]  # [b, n] text positions
        end = (seen + lengths)[:, None]
        valid = i[None, :] < lengths[:, None]  # [b, n]

        # Which token each cache slot holds before the chunk (-1: never written).
        slot = torch.arange(C, device=dev)[None, :]  # [1, C]
        ring = slot - S  # [b, C]
        in_ring = (seen[:, None] - S).clamp(min=0)  # tokens that went to the ring so far
        back = (in_ring - 1 - ring).clamp(min=0)  # >= 0: integer Mod only (no float division of positions)
        tok = torch.where(ring < 0, slot, S + ring + back - back % W)
        written = ((ring < 0) & (slot < seen[:, None])) | ((ring >= 0) & (ring < in_ring))
        # A(t) over the old cache [b, n, C] and over the chunk itself [b, n, n].
        tq, S3, W3 = t[:, :, None], S[:, :, None], W[:, :, None]
        tk = tok[:, None, :]
        vis_cache = written[:, None, :] & ((tk < S3) | (tk > tq - W3))
        u = t[:, None, :]  # key token of chunk column j
        j, ii = i[None, None, :], i[None, :, None]
        vis_chunk = ((j <= ii) & valid[:, None, :] & ((u < S3) | (u > tq - W3))) | (j == ii)
        visible = torch.cat([vis_cache, vis_chunk], dim=-1)[:, None, None]  # [b, 1, 1, n, C + n]
        key_sink = torch.cat([slot < S, t < S], dim=-1)[:, None, None, None, :]  # [b, 1, 1, 1, C + n]

        # Ring write: the chunk rows that survive go to their slot, the others onto their own column.
        kept = valid & ((t < S) | (t >= end - W))
        tslot = torch.where(t < S, t, S + (t - S).clamp(min=0) % W)
        dest = torch.where(kept, tslot, C + i[None, :])  # [b, n], unique per row
        bi = torch.arange(b, device=dev)[:, None, None]
        hi = torch.arange(kvh, device=dev)[None, :, None]
        di = dest[:, None, :]

        cos_t, sin_t = cos_text[:, :, None], sin_text[:, :, None]
        cos_r, sin_r = cos_rank[:, :, None], sin_rank[:, :, None]
        scale = d ** -0.5
        x = F.embedding(input_ids, m.embed_tokens.weight)
        presents = []
        for layer_i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm.weight, c.rms_norm_eps)
            q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(b, n, c.num_heads, d)
            k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(b, n, kvh, d)
            v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(b, n, kvh, d)
            if c.qk_norm:
                q = _rms(q, a.q_norm.weight, c.rms_norm_eps)
                k = _rms(k, a.k_norm.weight, c.rms_norm_eps)
            k = _rotate(k, cos_t, sin_t).permute(0, 2, 1, 3)  # [b, kv, n, d]
            v = v.permute(0, 2, 1, 3)
            qt = (_rotate(q, cos_t, sin_t) * scale).view(b, n, kvh, g, d).permute(0, 2, 3, 1, 4)  # [b,kv,g,n,d]
            past_k, past_v = past[2 * layer_i], past[2 * layer_i + 1]
            pk, pv = past_k[:, :, None], past_v[:, :, None]  # [b, kv, 1, C, d]
            kc, vc = k[:, :, None], v[:, :, None]
            keys = torch.cat([pk, kc], dim=3)  # [b, kv, 1, C + n, d]
            qr = (_rotate(q, cos_r, sin_r) * scale).view(b, n, kvh, g, d).permute(0, 2, 3, 1, 4)
            scores = torch.where(key_sink, qr @ keys.transpose(-1, -2), qt @ keys.transpose(-1, -2))
            scores = scores.float().masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(x.dtype)
            out = probs @ torch.cat([pv, vc], dim=3)  # [b, kv, g, n, d]
            out = out.permute(0, 3, 1, 2, 4).reshape(b, n, c.num_heads * d)
            x = x + F.linear(out, a.o_proj.weight, a.o_proj.bias)
            h = _rms(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
            mlp = layer.mlp
            gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            x = x + F.linear(F.silu(gate) * F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias),
                             mlp.down_proj.weight, mlp.down_proj.bias)
            for cache, new in ((past_k, k), (past_v, v)):
                full = torch.cat([cache, new], dim=2)  # [b, kv, C + n, d]
                full = full.index_put((bi, hi, di), new)
                presents.append(full[:, :, :C])

        idx = logits_index.clamp(min=0, max=n - 1)
        xs = torch.gather(x, 1, idx[:, :, None].expand(b, idx.shape[1], x.shape[-1]))
        head = m.embed_tokens.weight if c.tie_word_embeddings else m.lm_head.weight
        logits = F.linear(_rms(xs, m.norm.weight, c.rms_norm_eps), head).float()
        logits = torch.where((logits_index < lengths[:, None])[:, :, None], logits, torch.zeros_like(logits))
        return (logits, seen + lengths, *presents)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order."""
    cache_in = [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    cache_out = [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "logits_index", "seen", "lengths", "sink_tokens", "cos_text", "sin_text", "cos_rank", "sin_rank"]
    return inputs + cache_in, ["logits", "seen_out"] + cache_out


# ------------------------------------------------------------------------------------------------
# Host-side inputs
# ------------------------------------------------------------------------------------------------

def rotary_inputs(inv_freq: torch.Tensor, seen: Sequence[int], n: int, capacity: int):
    """cos_text, sin_text, cos_rank, sin_rank: float32 ``[b, n, rotary_dim // 2]`` numpy arrays
    for rows ``t = seen[b] + i``: angle ``t * inv_freq`` in float64 mod 2*pi (rank: ``min(t, C - 1)``).

    ``inv_freq``: ``[rotary_dim // 2]`` float64 (``streaming_trt.rope.inverse_frequencies``).
    """
    t = torch.as_tensor(list(seen), dtype=torch.int64)[:, None] + torch.arange(n)[None, :]
    out = []
    for pos in (t, t.clamp(max=capacity - 1)):
        ang = torch.remainder(pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64), 2 * math.pi)
        out += [ang.cos().float().numpy(), ang.sin().float().numpy()]
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
    """TensorRT optimization-profile bounds (and what the runner feeds at most per call)."""

    max_batch: int = 8
    opt_batch: int = 1
    max_chunk: int = 512
    opt_chunk: int = 1


def check_export(model, sink_tokens: int, window: int, dtype: str, profile: Profile) -> None:
    """Refuse (UserError, with the reason) what the graph cannot honour."""
    from streaming_trt.contract import Geometry

    Geometry(sink_tokens, window)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: the ONNX export writes float32 or float16 (bfloat16 has no "
                        "onnxruntime CPU kernels and TensorRT builds it from float32 with --bf16)")
    c = model.config
    kind = (c.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise UserError(f"rope type {kind!r} cannot be frozen into per-position inverse frequencies")
    for name, v in (("max batch", profile.max_batch), ("max chunk", profile.max_chunk),
                    ("opt batch", profile.opt_batch), ("opt chunk", profile.opt_chunk)):
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    if profile.opt_batch > profile.max_batch or profile.opt_chunk > profile.max_chunk:
        raise UserError("the optimal batch/chunk of the TensorRT profile must not exceed its maximum")
    if sink_tokens + window + profile.max_chunk > 2**31 - 1:
        raise UserError("sink_tokens + window + max chunk must stay below 2**31 (TensorRT's int32 shapes)")


def trtexec_command(onnx_path: str, engine_path: str, config, capacity: int, dtype: str, profile: Profile) -> list[str]:
    """The ``trtexec`` command that builds a TensorRT engine from the exported graph, with one
    optimization profile: batch ``1..max_batch``, chunk ``1..max_chunk`` (opt: decode)."""
    h = config.rotary_dim // 2
    kv, d = config.num_kv_heads, config.head_dim

    def shapes(bt: int, n: int) -> str:
        items = [f"input_ids:{bt}x{n}", f"logits_index:{bt}x{n}", f"seen:{bt}", f"lengths:{bt}", f"sink_tokens:{bt}"]
        items += [f"{k}:{bt}x{n}x{h}" for k in ("cos_text", "sin_text", "cos_rank", "sin_rank")]
        items += [f"past_{kind}.{i}:{bt}x{kv}x{capacity}x{d}" for i in range(config.num_layers)
                  for kind in ("key", "value")]
        return ",".join(items)

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
           f"--minShapes={shapes(1, 1)}", f"--optShapes={shapes(profile.opt_batch, profile.opt_chunk)}",
           f"--maxShapes={shapes(profile.max_batch, profile.max_chunk)}"]
    if dtype == "float16":
        cmd.append("--fp16")  # weights are float16 already; lets TensorRT pick float16 tactics
    return cmd


def _export_graph(step: StreamingStep, path: Path, dtype: torch.dtype, external: bool) -> None:
    c, C = step.c, step.C
    b, n, h = 2, 3, c.rotary_dim // 2
    dev = step.model.embed_tokens.weight.device
    ex = [torch.zeros(b, n, dtype=torch.int64, device=dev), torch.zeros(b, n, dtype=torch.int64, device=dev),
          torch.tensor([0, 5], device=dev), torch.tensor([3, 2], device=dev),
          torch.full((b,), step.S, dtype=torch.int64, device=dev)]
    ex += [torch.zeros(b, n, h, device=dev) for _ in range(4)]
    ex += [torch.zeros(b, c.num_kv_heads, C, c.head_dim, dtype=dtype, device=dev) for _ in range(2 * c.num_layers)]
    B, N, M = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("chunk", min=1, max=2**20), \
        torch.export.Dim("logit_rows", min=1, max=2**20)
    cap = torch.export.Dim("capacity", min=2, max=2**30)
    dyn = [{0: B, 1: N}, {0: B, 1: M}, {0: B}, {0: B}, {0: B}] + [{0: B, 1: N}] * 4 + [{0: B, 2: cap}] * (2 * c.num_layers)
    inputs, outputs = io_names(c.num_layers)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(step, tuple(ex), dynamo=True, opset_version=OPSET, input_names=inputs,
                                 output_names=outputs, dynamic_shapes=(*dyn[:9], tuple(dyn[9:])), optimize=OPTIMIZE,
                                 verbose=False, report=False)
    prog.save(str(path), external_data=external)


def export_onnx(model, output: str | Path, sink_tokens: int, window: int, dtype: str = "float32",
                profile: Profile = Profile(), tokenizer_source: str | Path | None = None,
                triton: bool = True, overwrite: bool = False, source: str = "") -> Path:
    """Write ``output/``: ``model.onnx`` (+ ``model.onnx.data`` when over 2 GB), ``manifest.json``,
    ``build_trt_engine.sh`` (trtexec), ``tokenizer/`` (when ``tokenizer_source`` has one) and
    ``triton/`` (onnxruntime- and tensorrt-backend repositories). Created whole or not at all.

    Args:
        model: a :class:`streaming_trt.model.Transformer` (any dtype; cast to ``dtype``).
        sink_tokens, window: S and W, baked into the graph (C = S + W is the caches' slot axis).
        dtype: ``float32`` or ``float16`` (weights and caches; logits are always float32).
    """
    from streaming_trt.export.files import atomic_dir, check_output_dir
    from streaming_trt.rope import inverse_frequencies

    check_export(model, sink_tokens, window, dtype, profile)
    output = check_output_dir(output, overwrite).absolute()
    tdtype = DTYPES[dtype]
    graph_model = model
    if model.dtype != tdtype:
        import copy

        graph_model = copy.deepcopy(model).to(tdtype)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    external = params * torch.empty((), dtype=tdtype).element_size() > TWO_GB
    capacity = sink_tokens + window
    with atomic_dir(output, overwrite) as tmp:
        t0 = time.perf_counter()
        _say(f"exporting the streaming step ({c.num_layers} layers, {dtype}, S={sink_tokens}, W={window}) "
             f"with torch.onnx.export (dynamo, opset {OPSET})")
        with torch.no_grad():
            _export_graph(StreamingStep(graph_model, sink_tokens, window), tmp / MODEL_FILE, tdtype, external)
        _say(f"graph written in {time.perf_counter() - t0:.1f} s")
        tok_dir = _copy_tokenizer(tokenizer_source, tmp / "tokenizer")
        engine = "model.plan"
        cmd = trtexec_command(MODEL_FILE, engine, c, capacity, dtype, profile)
        (tmp / "build_trt_engine.sh").write_text(
            "#!/bin/sh\n# Build a TensorRT engine from the streaming step (TensorRT 10.x, NVIDIA GPU).\n"
            "# One optimization profile: batch 1..{0}, chunk 1..{1}.\nset -e\ncd \"$(dirname \"$0\")\"\n{2}\n".format(
                profile.max_batch, profile.max_chunk, " \\\n    ".join(_sh(x) for x in cmd)))
        (tmp / "build_trt_engine.sh").chmod(0o755)
        inputs, outputs = io_names(c.num_layers)
        manifest = {
            "format": FORMAT, "version": VERSION, "model_file": MODEL_FILE,
            "external_data": "model.onnx.data" if external else None, "opset": OPSET,
            "dtype": dtype, "sink_tokens": sink_tokens, "window": window, "capacity": capacity,
            "source": str(source), "config": c.to_hf_dict(),
            "rotary": {"inv_freq": [float(x) for x in inverse_frequencies(c).tolist()], "rotary_dim": c.rotary_dim,
                       "how": "cos/sin inputs are float32 cos/sin of (position * inv_freq) formed in float64 and "
                              "reduced mod 2*pi; *_text at t = seen + i, *_rank at min(t, capacity - 1)"},
            "inputs": _io_specs(c, capacity, dtype)[0], "outputs": _io_specs(c, capacity, dtype)[1],
            "input_names": inputs, "output_names": outputs,
            "state": [{"input": f"past_{k}.{i}", "output": f"present_{k}.{i}"}
                      for i in range(c.num_layers) for k in ("key", "value")],
            "profile": dataclasses.asdict(profile),
            "tokenizer": "tokenizer" if tok_dir else None,
            "trtexec": cmd,
            "drive": ("per call: seen = tokens stored per stream, lengths = valid rows of the chunk, cos/sin from "
                      "rotary_inputs(inv_freq, seen, n, capacity), logits_index = rows whose logits you want, past_* = "
                      "the previous call's present_* (zeros at the start of a stream); then seen += lengths"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if triton:
            write_triton_onnx_repos(tmp / "triton", manifest, profile)
    _say(f"wrote {output}")
    return output


def _sh(x: str) -> str:
    import shlex

    return shlex.quote(x)


def _say(message: str) -> None:
    print(f"[streaming-trt onnx] {message}", file=sys.stderr, flush=True)


def _copy_tokenizer(src, dst: Path) -> bool:
    """Save the tokenizer of a checkpoint directory or GGUF file into ``dst``; False when none."""
    if src is None:
        return False
    try:
        from streaming_trt.tokenizer import BuiltinTokenizer, load_tokenizer

        tok = load_tokenizer(src)
        if isinstance(tok, BuiltinTokenizer) or not hasattr(tok, "save_pretrained"):
            return False
        tok.save_pretrained(str(dst))
        return True
    except UserError:
        return False


def _io_specs(c, capacity: int, dtype: str):
    h = c.rotary_dim // 2
    cache = ["batch", c.num_kv_heads, capacity, c.head_dim]
    ins = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "chunk"]},
           {"name": "logits_index", "dtype": "int64", "shape": ["batch", "logit_rows"]},
           {"name": "seen", "dtype": "int64", "shape": ["batch"]},
           {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
           {"name": "sink_tokens", "dtype": "int64", "shape": ["batch"]}]
    ins += [{"name": k, "dtype": "float32", "shape": ["batch", "chunk", h]}
            for k in ("cos_text", "sin_text", "cos_rank", "sin_rank")]
    ins += [{"name": f"past_{k}.{i}", "dtype": dtype, "shape": cache} for i in range(c.num_layers) for k in ("key", "value")]
    outs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "logit_rows", c.vocab_size]},
            {"name": "seen_out", "dtype": "int64", "shape": ["batch"]}]
    outs += [{"name": f"present_{k}.{i}", "dtype": dtype, "shape": cache} for i in range(c.num_layers)
             for k in ("key", "value")]
    return ins, outs


# ------------------------------------------------------------------------------------------------
# Triton Inference Server repositories (implicit state)
# ------------------------------------------------------------------------------------------------

_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def triton_config(manifest: dict, backend: str, profile: Profile) -> str:
    """config.pbtxt text for the ``onnxruntime`` or ``tensorrt`` backend: the sequence batcher
    holds every layer's caches as implicit state, one batch slot per conversation (``direct``); a
    client sends input_ids, logits_index, seen, lengths, sink_tokens and the four cos/sin tensors
    (it knows its own position; ``seen_out`` echoes the next one)."""
    name = "streaming_onnx" if backend == "onnxruntime" else "streaming_trt_plan"
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {profile.max_batch}",
             f'default_model_filename: "{"model.onnx" if backend == "onnxruntime" else "model.plan"}"']
    state_inputs = {s["input"] for s in manifest["state"]}
    state_outputs = {s["output"] for s in manifest["state"]}

    def tensor(spec):
        dims = [str(-1 if isinstance(x, str) else x) for x in spec["shape"][1:]]  # batch dim is implicit
        if not dims:  # one value per stream: Triton needs dims, the graph takes [batch]
            return (f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ 1 ] '
                    'reshape: { shape: [ ] } }')
        return f'  {{ name: "{spec["name"]}" data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ {", ".join(dims)} ] }}'

    ins = [s for s in manifest["inputs"] if s["name"] not in state_inputs]
    outs = [s for s in manifest["outputs"] if s["name"] not in state_outputs]
    lines.append("input [\n" + ",\n".join(tensor(s) for s in ins) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(s) for s in outs) + "\n]")
    specs = {s["name"]: s for s in manifest["inputs"]}
    states = []
    for st in manifest["state"]:
        spec = specs[st["input"]]
        dims = [str(x) for x in spec["shape"][1:]]
        init = ('initial_state: { data_type: %s dims: [ %s ] zero_data: true name: "zeros" }'
                % (_TRITON_TYPES[spec["dtype"]], ", ".join(dims)))
        states.append(f'    {{ input_name: "{st["input"]}" output_name: "{st["output"]}" '
                      f'data_type: {_TRITON_TYPES[spec["dtype"]]} dims: [ {", ".join(dims)} ] {init} }}')
    lines.append(
        "sequence_batching {\n"
        "  max_sequence_idle_microseconds: 3600000000\n"
        "  direct { }\n"
        "  state [\n" + ",\n".join(states) + "\n  ]\n}")
    # No control inputs: the graph has none, and the state is zeroed by initial_state at START.
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_AUTO"
    lines.append(f'instance_group [ {{ kind: {kind} count: 1 }} ]')
    return "\n".join(lines) + "\n"


def write_triton_onnx_repos(root: Path, manifest: dict, profile: Profile) -> None:
    """``root/onnxruntime/streaming_onnx/{config.pbtxt,1/}`` and ``root/tensorrt/streaming_trt_plan/...``."""
    for backend, name in (("onnxruntime", "streaming_onnx"), ("tensorrt", "streaming_trt_plan")):
        d = root / backend / name
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(triton_config(manifest, backend, profile))
        what = ("copy or link ../../../model.onnx (and model.onnx.data) here" if backend == "onnxruntime"
                else "put the engine built by ../../../build_trt_engine.sh (model.plan) here")
        (d / "1" / "README.txt").write_text(what + "\n")


# ------------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------------

def load_manifest(path: str | Path) -> dict:
    """``path/manifest.json`` of an export, checked."""
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise UserError(f"{path}: no manifest.json; export one with python -m streaming_trt.build --format onnx")
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise UserError(f"{file}: not a {FORMAT} v{VERSION} manifest (got {m.get('format')} v{m.get('version')})")
    if not (path / m["model_file"]).is_file():
        raise UserError(f"{path / m['model_file']}: missing")
    return m


class _ModelInfo:
    """What generation asks of ``session.model``: ``config`` and ``device`` (logits live on the CPU)."""

    def __init__(self, config):
        self.config = config
        self.device = torch.device("cpu")
        self.dtype = torch.float32


class _CacheInfo:
    def __init__(self, capacity: int, nbytes: int):
        self.capacity, self._nbytes = capacity, nbytes

    def nbytes(self) -> int:
        return self._nbytes


class OnnxSession:
    """A batch of streams run by onnxruntime on an exported graph; same ``feed`` as
    :class:`streaming_trt.session.Session`, so ``st.generate_tokens/generate_text`` accept it.

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
        import numpy as np
        import onnxruntime as ort

        from streaming_trt.config import ModelConfig

        self.path = Path(path)
        self.manifest = m = load_manifest(self.path)
        if not isinstance(batch, int) or batch < 1:
            raise UserError(f"batch must be an integer >= 1, got {batch!r}")
        self.config = ModelConfig.from_hf_dict(m["config"], source=str(self.path / "manifest.json"))
        self.model = _ModelInfo(self.config)
        from streaming_trt.contract import Geometry

        geometry = Geometry(m["sink_tokens"] if sink_tokens is None else sink_tokens,
                            m["window"] if window is None else window)
        self.geometry = geometry
        self.sink_tokens, self.window, self.capacity = geometry.sink_tokens, geometry.window, geometry.capacity
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
        self.device_type = "cuda" if prov == "CUDAExecutionProvider" else "cpu"
        self._np_dtype = np.float16 if m["dtype"] == "float16" else np.float32
        c = self.config
        self._cache_shape = (batch, c.num_kv_heads, self.capacity, c.head_dim)
        self._names = io_names(c.num_layers)
        self.batch = batch
        self.cache = _CacheInfo(self.capacity, 2 * c.num_layers * int(np.prod(self._cache_shape))
                                * np.dtype(self._np_dtype).itemsize)
        self._bufs = [[self._zeros() for _ in range(2 * c.num_layers)] for _ in range(2)]
        self._cur = 0
        self._seen = [0] * batch
        self.last_logits: torch.Tensor | None = None

    def _zeros(self):
        import numpy as np
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.zeros(self._cache_shape, dtype=self._np_dtype), self.device_type, 0)

    @property
    def seen(self) -> list[int]:
        return list(self._seen)

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

    def _as_batch(self, tokens, lengths):
        from streaming_trt.session import token_batch

        return token_batch(tokens, lengths, self.batch, self.model.config.vocab_size, self.model.device)

    def _run(self, ids: torch.Tensor, part: list[int], logits_index):
        """One graph call on ``ids [batch, width]``; returns logits ``[batch, m, vocab]`` (torch, CPU)."""
        import numpy as np

        width = ids.shape[1]
        cos_t, sin_t, cos_r, sin_r = rotary_inputs(self.inv_freq, self._seen, width, self.capacity)
        b = self.ort.io_binding()
        feeds = {"input_ids": ids.cpu().numpy().astype(np.int64), "logits_index": logits_index,
                 "seen": np.asarray(self._seen, dtype=np.int64), "lengths": np.asarray(part, dtype=np.int64),
                 "sink_tokens": np.full(self.batch, self.sink_tokens, dtype=np.int64),
                 "cos_text": cos_t, "sin_text": sin_t, "cos_rank": cos_r, "sin_rank": sin_r}
        for k, v in feeds.items():
            b.bind_cpu_input(k, np.ascontiguousarray(v))
        ins, outs = self._names
        past, present = self._bufs[self._cur], self._bufs[1 - self._cur]
        for name, val in zip(ins[9:], past):
            b.bind_ortvalue_input(name, val)
        b.bind_output("logits", "cpu")
        b.bind_output("seen_out", "cpu")
        for name, val in zip(outs[2:], present):
            b.bind_ortvalue_output(name, val)
        self.ort.run_with_iobinding(b)
        self._cur = 1 - self._cur
        self._seen = [s + p for s, p in zip(self._seen, part)]
        return torch.from_numpy(b.get_outputs()[0].numpy())

    def feed(self, tokens, lengths=None, all_logits: bool = True) -> torch.Tensor:
        """As :meth:`streaming_trt.session.Session.feed`: float32 logits ``[batch, n, vocab]`` of every
        token fed (zero past a stream's length), or ``[batch, vocab]`` with ``all_logits=False``."""
        import numpy as np

        tokens, lengths = self._as_batch(tokens, lengths)
        n, vocab = tokens.shape[1], self.config.vocab_size
        logits = torch.zeros(self.batch, n, vocab) if all_logits else None
        for lo in range(0, n, self.max_chunk):
            part = [min(max(length - lo, 0), self.max_chunk) for length in lengths]
            width = max(part)
            if width == 0:
                break
            chunk = tokens[:, lo: lo + width]
            last = np.asarray([[max(p - 1, 0)] for p in part], dtype=np.int64)
            if all_logits:
                out = self._run(chunk, part, np.tile(np.arange(width, dtype=np.int64), (self.batch, 1)))
                logits[:, lo: lo + width] = out
                newest = out[torch.arange(self.batch), torch.as_tensor(last[:, 0])]
            else:
                newest = self._run(chunk, part, last)[:, 0]
            fed = torch.tensor([p > 0 for p in part])
            if self.last_logits is None:
                self.last_logits = torch.zeros_like(newest)
            self.last_logits = torch.where(fed[:, None], newest, self.last_logits)
        return logits if all_logits else self.last_logits


def onnx_step_latency(path: str | Path, prompt_tokens: int, decode_tokens: int, provider: str = "cpu",
                      threads: int | None = None, seed: int = 0) -> dict:
    """Per-token decode latency of an export on onnxruntime: feed ``prompt_tokens`` random ids as
    one prompt, then time ``decode_tokens`` single-token steps. Returns ``{"prefill_s": float,
    "per_token_ms": [float, ...], "median_ms": float}`` (what ``bench.latency`` plots)."""
    import statistics

    s = OnnxSession(path, provider=provider, threads=threads)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    t0 = time.perf_counter()
    if ids:
        s.feed(ids, all_logits=False)
    prefill = time.perf_counter() - t0
    per = []
    tok = int(torch.randint(0, s.config.vocab_size, (1,), generator=g))
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        out = s.feed([tok], all_logits=False)
        per.append((time.perf_counter() - t0) * 1e3)
        tok = int(out[0].argmax())
    return {"prefill_s": prefill, "per_token_ms": per, "median_ms": statistics.median(per) if per else float("nan")}


# ------------------------------------------------------------------------------------------------
# Command line: python -m streaming_trt.build --format onnx
# ------------------------------------------------------------------------------------------------

def build_onnx(args) -> int:
    """The ``--format onnx`` writer of :mod:`streaming_trt.export.cli`: refuses TensorRT-LLM-only
    flags, loads ``--model`` (directory or .gguf) on the CPU in float32 and calls :func:`export_onnx`."""
    from pathlib import Path as _P

    refused = [flag for flag, bad in (("--tp", getattr(args, "tp", 1) != 1), ("--pp", getattr(args, "pp", 1) != 1),
                                      ("--gather-logits", getattr(args, "gather_logits", False)),
                                      ("--checkpoint-only", getattr(args, "checkpoint_only", False)),
                                      ("--allow-dense-context", getattr(args, "allow_dense_context", False)),
                                      ("--triton-repo", bool(getattr(args, "triton_repo", None))),
                                      ("--triton-decoupled", getattr(args, "triton_decoupled", False))) if bad]
    if refused:
        raise UserError(f"{', '.join(refused)}: TensorRT-LLM options; --format onnx writes one graph for one device "
                        "(its Triton repositories go to OUTPUT/triton); drop them or use --format trtllm")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    profile = Profile(max_batch=args.max_batch_size,
                      max_chunk=512 if args.max_input_len is None else args.max_input_len)
    from streaming_trt.contract import Geometry

    Geometry(args.sink_tokens, args.window)
    check_export_dtype = dtype  # refused inside export_onnx before anything loads
    if check_export_dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: --format onnx writes float32 or float16 (bfloat16 has no onnxruntime CPU "
                        "kernels; TensorRT can build bfloat16 from the float32 graph with trtexec --bf16)")
    from streaming_trt.export.files import check_output_dir

    check_output_dir(args.output, args.overwrite)
    from streaming_trt.model import load_model

    if not _P(args.model).exists():
        raise UserError(f"--model {args.model}: no such directory or file")
    model = load_model(args.model, dtype="float32", device="cpu", backend="torch")
    export_onnx(model, args.output, args.sink_tokens, args.window, dtype=dtype, profile=profile,
                tokenizer_source=args.model, overwrite=args.overwrite, source=str(args.model))
    _say(f"run it: python -m streaming_trt.generate --engine {args.output}; TensorRT: sh {args.output}/build_trt_engine.sh")
    return 0


def open_engine(args):
    """``python -m streaming_trt.generate --engine DIR``: ``(OnnxSession, tokenizer)`` for the flags;
    refuses the flags an onnxruntime session cannot honour."""
    from streaming_trt.tokenizer import load_tokenizer

    for flag, value in (("--save-session", getattr(args, "save_session", None)),
                        ("--load-session", getattr(args, "load_session", None))):
        if value:
            raise UserError(f"{flag} works with the eager runtime only; an onnxruntime session is not saved")
    m = load_manifest(args.engine)
    provider = "cuda" if str(getattr(args, "device", "cpu")).startswith("cuda") else "cpu"
    session = OnnxSession(args.engine, provider=provider, threads=getattr(args, "threads", None))
    tok_dir = Path(args.engine) / m["tokenizer"] if m.get("tokenizer") else None
    if tok_dir is None:
        _say("the export has no tokenizer/: using the built-in character tokenizer")
    tokenizer = load_tokenizer(None if tok_dir is None else tok_dir)
    _say(f"onnxruntime {provider}: {args.engine} (sink_tokens={session.sink_tokens}, window={session.window}, "
         f"{m['dtype']})")
    return session, tokenizer
