"""Zero-sink and sink-logit models attend as trained: the runtime (PyTorch references and Triton
kernels under the interpreter) and the training forward against a float64 oracle written here."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import streaming_trt as st
from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import Geometry
from streaming_trt.kernels import triton_available
from streaming_trt.train import causal_attention, forward, new_model
from streaming_trt.train.files import save_model

CONFIG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64)


def one_layer(sink_logits: str, seed: int = 0):
    """A one-layer model with weights large enough that attention is far from uniform."""
    model = new_model(dataclasses.replace(CONFIG, sink_logits=sink_logits), seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        if sink_logits == "learned":
            model.layers[0].self_attn.sinks.copy_(torch.tensor([-1.0, 0.5, 2.0, 4.0]))
    return model.eval()


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, position, theta, dim):
    half = dim // 2
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    a = position * inv
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)


def oracle(model, ids: list[int], sink_tokens: int, window: int) -> torch.Tensor:
    """float64 logits ``[n, vocab]`` of a one-layer model streaming ``ids``: for each t, A(t) at
    rank positions, out = sum exp(s_j) v_j / (exp(s_h) + sum exp(s_j)) written out directly."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    p = "layers.0."
    sinks = w.get(p + "self_attn.sinks", torch.zeros(c.num_heads, dtype=torch.float64))
    group = c.num_heads // c.num_kv_heads
    rows = []
    for t in range(len(ids)):
        keep = Geometry(sink_tokens, window).attended(t)
        x = w["embed_tokens.weight"][torch.tensor([ids[u] for u in keep])]  # [|A|, hidden]
        h = _rms(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (h[-1] @ w[p + "self_attn.q_proj.weight"].T).view(c.num_heads, c.head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(len(keep), c.num_kv_heads, c.head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(len(keep), c.num_kv_heads, c.head_dim)
        q = _rotate(q, len(keep) - 1, c.rope_theta, c.head_dim)
        k = torch.stack([_rotate(k[j], j, c.rope_theta, c.head_dim) for j in range(len(keep))])
        out = torch.zeros(c.num_heads, c.head_dim, dtype=torch.float64)
        for head in range(c.num_heads):
            e = torch.exp(k[:, head // group] @ q[head] / c.head_dim**0.5)  # [|A|]
            out[head] = (e[:, None] * v[:, head // group]).sum(0) / (torch.exp(sinks[head]) + e.sum())
        y = x[-1] + out.reshape(-1) @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(y, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate, up = m @ w[p + "mlp.gate_proj.weight"].T, m @ w[p + "mlp.up_proj.weight"].T
        y = y + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        rows.append(_rms(y, w["norm.weight"], c.rms_norm_eps) @ w["lm_head.weight"].T)
    return torch.stack(rows)


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="the Triton kernels need triton (on CUDA or under TRITON_INTERPRET=1)"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sink_logits", ["zero", "learned"])
def test_runtime_attention_equals_float64_oracle(tmp_path, sink_logits, backend):
    model = one_layer(sink_logits)
    save_model(tmp_path, model, "test")
    loaded = st.load_model(tmp_path, backend=backend)
    assert loaded.backend == backend
    ids = torch.randint(0, CONFIG.vocab_size, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    want = oracle(model, ids, sink_tokens=2, window=5)
    session = loaded.session(sink_tokens=2, window=5, cache_fill=float("nan"))
    got = torch.cat([session.feed(ids[:6])[0], session.feed(ids[6:9])[0]]
                    + [session.feed([i])[0] for i in ids[9:]])  # prefill chunks, then decode steps
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # the sink term matters: plain softmax gives other logits
    plain = dataclasses.replace(model.config, sink_logits=None)
    vanilla = st.Transformer.from_state_dict(plain, {f"model.{k}" if k != "lm_head.weight" else k: v
                                                     for k, v in model.state_dict().items() if "sinks" not in k})
    other = vanilla.session(sink_tokens=2, window=5).feed(ids)[0]
    assert (other.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("sink_logits", ["zero", "learned"])
def test_training_forward_equals_float64_oracle(sink_logits):
    model = one_layer(sink_logits)
    ids = torch.randint(0, CONFIG.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        got = forward(model, torch.tensor([ids]))[0][0]
    torch.testing.assert_close(got.double(), oracle(model, ids, sink_tokens=0, window=len(ids)), rtol=1e-4, atol=1e-4)


def test_causal_attention_weights_leave_the_sink_share():
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    out, p = causal_attention(q, k[:, :2], v[:, :2], sinks, want_probs=True)
    scores = (q @ k[:, :2].repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    e = scores.exp().tril()
    want = e / (e.sum(-1, keepdim=True) + sinks.exp().view(1, -1, 1, 1))
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(out, want @ v[:, :2].repeat_interleave(2, 1))
    plain, _ = causal_attention(q, k, v)
    causal = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    torch.testing.assert_close(plain, torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + causal, -1) @ v)


def test_fused_sink_logit_attention_equals_the_explicit_softmax():
    """What training runs (fused SDPA with a constant-score key) equals the weights' formula, with
    gradients to the sink logits."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 7, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    sinks = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    fused, _ = causal_attention(q, k[:, :2], v[:, :2], sinks)
    explicit, _ = causal_attention(q, k[:, :2], v[:, :2], sinks, want_probs=True)
    torch.testing.assert_close(fused, explicit)
    (g1,) = torch.autograd.grad(fused.square().sum(), sinks)
    (g2,) = torch.autograd.grad(explicit.square().sum(), sinks)
    torch.testing.assert_close(g1, g2)
    assert g1.abs().min() > 0


def test_attention_mass_per_layer_and_head():
    model = one_layer("learned")
    ids = torch.randint(0, CONFIG.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, mass = forward(model, ids, measure=True)
    assert len(mass.token0) == len(mass.token0_late) == 1 and len(mass.token0_late[0]) == CONFIG.num_heads
    assert mass.uniform == pytest.approx(sum(1 / (t + 1) for t in range(1, 16)) / 15)
    assert mass.uniform_late == pytest.approx(sum(1 / (t + 1) for t in range(8, 16)) / 8)
    with torch.no_grad():  # the same weights with every s_h = 0: the sink term's share follows s_h
        _, zero = forward(one_layer("zero"), ids, measure=True)
    learned, plain = mass.sink_term_late[0], zero.sink_term_late[0]
    assert learned[0] < plain[0] and all(learned[h] > plain[h] for h in (1, 2, 3))  # s = -1, 0.5, 2, 4
    assert all(0 <= x <= 1 for x in mass.token0_late[0] + mass.sink_term_late[0])
