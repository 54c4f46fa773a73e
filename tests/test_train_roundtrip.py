"""Trained checkpoints keep their sink token and sink logits through every loader and exporter:
st.load_model (tests/test_train.py), streaming_trt.hf, ONNX (onnxruntime) and the TensorRT-LLM
checkpoint conversion."""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
import train_runs

VARIANTS = ["vanilla", "sink-token", "zero-sink", "sink-logits"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_runs.runs(tmp_path_factory)


def ids_of(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_with_streaming_equals_the_runtime(trained, variant):
    transformers = pytest.importorskip("transformers")
    import streaming_trt.hf as sthf

    folder = trained(variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sthf.enable_streaming(hf, sink_tokens=2, window=9, backend="torch")
    model = st.load_model(folder, backend="torch")
    ids = ids_of(model, 30)
    want = model.session(sink_tokens=2, window=9).feed(ids)[0]
    cache = sthf.HFStreamingCache(hf)
    with torch.no_grad():  # a prompt, then a continuation of the same stream
        got = torch.cat([hf(ids[:, :12], cache=cache).logits[0], hf(ids[:, 12:], cache=cache).logits[0]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert cache.seen == [30 + (variant == "sink-token")]


def test_transformers_generate_starts_with_the_sink_token_once(trained):
    transformers = pytest.importorskip("transformers")
    import streaming_trt.hf as sthf

    folder = trained("sink-token")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sthf.enable_streaming(hf, sink_tokens=1, window=8, backend="torch")
    model = st.load_model(folder, backend="torch")
    prompt = ids_of(model, 6, seed=1)
    cache = sthf.HFStreamingCache(hf)
    out = hf.generate(prompt, max_new_tokens=10, do_sample=False, cache=cache, pad_token_id=0)
    assert out.shape == (1, 16) and torch.equal(out[:, :6], prompt)
    assert cache.seen == [1 + 15]  # the sink token, the prompt, the generated tokens but the last
    session = model.session(sink_tokens=1, window=8)  # greedy with the runtime
    logits = session.feed(prompt, all_logits=False)
    tokens = []
    for _ in range(10):
        tokens.append(int(logits[0].argmax()))
        logits = session.feed([tokens[-1]], all_logits=False)
    assert out[0, 6:].tolist() == tokens
