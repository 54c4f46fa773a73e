"""The runtime's Triton backend against its PyTorch backend (natively on a GPU, else interpreted)."""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint
from streaming_trt import kernels

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, "llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                    num_hidden_layers=2)
    return path


@pytest.mark.parametrize("sink_tokens,window", [(0, 5), (4, 6)])
def test_triton_backend_matches_torch_backend(model_dir, sink_tokens, window):
    """Prefill chunks (shorter and longer than the window), one stream decoding beside the other's
    chunk (each attends as its own step: the decode kernel beside the prefill kernel), then
    token-by-token decode, in a batch of two streams of different lengths, with never-written
    slots full of NaN."""
    ref = st.load_model(model_dir, device=DEVICE, backend="torch")
    fast = st.load_model(model_dir, device=DEVICE, backend="triton")
    assert fast.backend == "triton"
    n = 2 * (sink_tokens + window) + 20
    streams = [torch.randint(0, 97, (n,)).tolist(), torch.randint(0, 97, (n,)).tolist()]
    plan = [(3, 0), (window + 4, 7), (1, 5), (4, 1)] + [(1, 1)] * 6
    outs = {}
    for name, model in (("torch", ref), ("triton", fast)):
        session = model.session(sink_tokens=sink_tokens, window=window, batch=2, cache_fill=float("nan"))
        pos, got = [0, 0], []
        for sizes in plan:
            rows = [s[p : p + k] for s, p, k in zip(streams, pos, sizes)]
            logits = session.feed(rows)
            got.append(torch.cat([logits[b, : len(r)] for b, r in enumerate(rows)]))
            pos = [p + len(r) for p, r in zip(pos, rows)]
        outs[name] = torch.cat(got)
    scale = outs["torch"].abs().max().item()
    err = (outs["triton"] - outs["torch"]).abs().max().item()
    assert err <= 1e-4 * scale, f"triton backend differs from torch by {err:.3g} (scale {scale:.3g})"
