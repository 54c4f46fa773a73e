"""The recall Triton kernels (``streaming_trt.kernels.recall_triton``) against their float64
PyTorch references (``streaming_trt.kernels.recall_reference``).

Without CUDA they run under TRITON_INTERPRET=1 (conftest.py) on CPU tensors; with a GPU natively,
in float16 and bfloat16 too. The reference gets the very inputs the kernel got (rounded to its
dtype, widened to float64). Queries for sinks, blocks and window are drawn independently, so a part
scored with the wrong query shows; the block rows past the selection and the cache hold NaN where
nothing may be read. Tolerances as in tests/test_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from streaming_trt.contract import Geometry
from streaming_trt.kernels import recall_reference as R

triton = pytest.importorskip("triton")

from test_kernels import DEVICE, ON_GPU, TOL, pytestmark  # noqa: E402,F401  (the same interpreter skip)

DTYPES = (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


def _check(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    tol = TOL[dtype]
    err = (got.double().cpu() - want.double().cpu()).abs()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output"
    assert bool((err <= tol + tol * want.abs().cpu()).all()), f"{what}: max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sink_tokens,window,num_sel,block,heads,kv,d", [
    (4, 40, 3, 16, 4, 2, 64), (0, 24, 1, 20, 2, 2, 32), (1, 33, 0, 16, 6, 1, 64), (4, 70, 2, 8, 4, 4, 80),
])
def test_recall_decode_attention_equals_reference(dtype, sink_tokens, window, num_sel, block, heads, kv, d):
    from streaming_trt.kernels import recall_triton as T

    g = Geometry(sink_tokens, window)
    gen = torch.Generator().manual_seed(sink_tokens * 100 + window)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q_text, q_sink = r(2, heads, d), r(2, heads, d)
    q_block = r(2, heads, max(num_sel, 1), d)[:, :, :num_sel]
    k_cache, v_cache = r(2, kv, g.capacity, d), r(2, kv, g.capacity, d)
    blk_k, blk_v = r(2, num_sel + 1, kv, block, d), r(2, num_sel + 1, kv, block, d)
    blk_k[:, num_sel:], blk_v[:, num_sel:] = float("nan"), float("nan")  # past the selection: never read
    sink_logits = torch.randn(heads, generator=gen) if sink_tokens == 1 else None
    scale = d**-0.5
    args = [x.to(DEVICE) for x in (q_text, q_sink, q_block, k_cache, v_cache)]
    got = T.recall_decode_attention(*args, blk_k[:, :num_sel].to(DEVICE), blk_v[:, :num_sel].to(DEVICE), g, scale,
                                    None if sink_logits is None else sink_logits.to(DEVICE))
    want = R.recall_decode_attention(q_text.double(), q_sink.double(), q_block.double(), k_cache.double(),
                                     v_cache.double(), blk_k[:, :num_sel].double(), blk_v[:, :num_sel].double(), g,
                                     scale, sink_logits)
    _check(got, want, dtype, "recall decode")


def test_decode_reference_is_softmax_over_the_recall_set():
    """The reference itself, against attention written out over [sinks, blocks, window] keys."""
    g = Geometry(3, 10)
    heads, kv, d, k, B = 4, 2, 16, 2, 5
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q_text, q_sink, q_block = r(1, heads, d), r(1, heads, d), r(1, heads, k, d)
    kc, vc, bk, bv = r(1, kv, 13, d), r(1, kv, 13, d), r(1, k, kv, B, d), r(1, k, kv, B, d)
    sink_logits = r(heads)
    got = R.recall_decode_attention(q_text, q_sink, q_block, kc, vc, bk, bv, g, 0.3, sink_logits)
    for h in range(heads):
        j = h // (heads // kv)
        scores = [q_sink[0, h] @ kc[0, j, s] for s in range(3)]
        scores += [q_block[0, h, i] @ bk[0, i, j, o] for i in range(k) for o in range(B)]
        scores += [q_text[0, h] @ kc[0, j, s] for s in range(3, 13)]
        values = [vc[0, j, s] for s in range(3)] + [bv[0, i, j, o] for i in range(k) for o in range(B)]
        values += [vc[0, j, s] for s in range(3, 13)]
        e = torch.exp(torch.stack(scores) * 0.3)
        want = (e[:, None] * torch.stack(values)).sum(0) / (e.sum() + torch.exp(sink_logits[h]))
        torch.testing.assert_close(got[0, h], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32,) + ((torch.float16,) if ON_GPU else ()))
@pytest.mark.parametrize("scorer", ["bounds", "representative"])
@pytest.mark.parametrize("blocks,heads,kv,d", [(5, 4, 2, 64), (70, 3, 1, 32), (33, 6, 3, 80)])
def test_block_scores_equal_reference(dtype, scorer, blocks, heads, kv, d):
    from streaming_trt.kernels import recall_triton as T

    gen = torch.Generator().manual_seed(blocks)
    q = torch.randn(3, heads, d, generator=gen).to(dtype)
    if scorer == "bounds":
        a, b = torch.randn(blocks, kv, d, generator=gen), torch.randn(blocks, kv, d, generator=gen)
        lo, hi = torch.minimum(a, b).to(dtype), torch.maximum(a, b).to(dtype)
        got = T.bound_scores(q.to(DEVICE), lo.to(DEVICE), hi.to(DEVICE))
        want = R.bound_scores(q.double(), lo.double(), hi.double())
    else:
        reps = torch.randn(blocks, kv, 4, d, generator=gen).to(dtype)
        got = T.representative_scores(q.to(DEVICE), reps.to(DEVICE))
        want = R.representative_scores(q.double(), reps.double())
    _check(got, want, torch.float32, f"{scorer} scores")  # float32 accumulation in every dtype


def test_recall_session_on_the_triton_backend_equals_torch(checkpoints):
    """The runtime's Triton path (decode steps through recall_decode_attention) against the
    PyTorch path, same model, same selection."""
    import streaming_trt as st

    path, _ = checkpoints("llama", num_hidden_layers=1)
    torch_model = st.load_model(path, backend="torch")
    triton_model = st.load_model(path, backend="triton", device=DEVICE)
    recall = st.Recall(block_size=4, top_k=2)
    a = torch_model.session(sink_tokens=4, window=8, recall=recall)
    b = triton_model.session(sink_tokens=4, window=8, recall=recall)
    ids = torch.randint(0, 97, (50,)).tolist()
    a.feed(ids[:26])
    b.feed(ids[:26])
    recalled = 0
    for x in ids[26:]:
        la, lb = a.feed([x])[0, 0], b.feed([x])[0, 0].cpu()
        assert a.recall.selected == b.recall.selected
        recalled += bool(a.recall.selected[0])
        _check(lb, la, torch.float32, "triton backend")
    assert recalled > 10
