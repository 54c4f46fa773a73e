"""Trained checkpoints keep their sink token and sink logits through every loader and exporter:
st.load_model (tests/test_train.py), streaming_trt.hf, ONNX (onnxruntime) and the TensorRT-LLM
checkpoint conversion."""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
import train_runs
from checkpoints import streaming_hf

VARIANTS = ["vanilla", "sink-token", "zero-sink", "sink-logits"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_runs.runs(tmp_path_factory)


def ids_of(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_with_streaming_equals_the_runtime(trained, variant):
    transformers = pytest.importorskip("transformers")
    sthf = streaming_hf()

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
    sthf = streaming_hf()

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


def test_transformers_batched_generate_gives_each_stream_its_sink_token(trained):
    """Left-padded prompts of two lengths, generated past the cache: each row equals its own
    greedy stream in the runtime (padding is never the sink, the sink is never padding)."""
    transformers = pytest.importorskip("transformers")
    sthf = streaming_hf()

    folder = trained("sink-token")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sthf.enable_streaming(hf, sink_tokens=1, window=8, backend="torch")
    model = st.load_model(folder, backend="torch")
    prompts = [ids_of(model, 9, seed=2)[0], ids_of(model, 4, seed=3)[0]]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = p, 1
    cache = sthf.HFStreamingCache(hf)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache=cache, pad_token_id=0)
    assert cache.seen == [1 + 9 + 11, 1 + 4 + 11]
    for row, p in enumerate(prompts):
        session = model.session(sink_tokens=1, window=8)
        logits, tokens = session.feed(p, all_logits=False), []
        for _ in range(12):
            tokens.append(int(logits[0].argmax()))
            logits = session.feed([tokens[-1]], all_logits=False)
        assert out[row, 9:].tolist() == tokens, row


def both_sinks(folder, out):
    """A copy of a sink-logit checkpoint that also records a sink token: both features in one export."""
    import json
    import shutil

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("train_state.pt", "*.png", "*.csv"))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, sink_token_id=1)))
    return out


def test_onnx_keeps_the_sink_token_and_the_sink_logits(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from streaming_trt.export.onnx import OnnxSession, export_onnx, load_manifest

    model = st.load_model(both_sinks(trained("sink-logits"), tmp_path / "both"), backend="torch")
    assert model.config.sink_token_id == 1 and model.config.sink_logits == "learned"
    export_onnx(model, tmp_path / "onnx", 2, 9, triton=False)
    config = load_manifest(tmp_path / "onnx")["config"]
    assert config["sink_token_id"] == 1 and config["sink_logits"] == "learned"
    ids = ids_of(model, 30)
    want = model.session(sink_tokens=2, window=9).feed(ids)[0]
    onnx = OnnxSession(tmp_path / "onnx", threads=1)
    got = torch.cat([onnx.feed(ids[:, :12])[0], onnx.feed(ids[:, 12:])[0]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert onnx.seen == [31]
    onnx.reset()
    torch.testing.assert_close(onnx.feed(ids)[0], want, rtol=1e-4, atol=1e-4)
    assert onnx.seen == [31]
    plain = st.load_model(trained("sink-logits"), backend="torch")  # the token changes the logits
    assert (plain.session(sink_tokens=2, window=9).feed(ids)[0] - want).abs().max() > 1e-3


def test_tensorrt_llm_checkpoint_keeps_the_sink_token(trained, tmp_path):
    import json

    from streaming_trt.export import export_checkpoint, load_trtllm_checkpoint

    folder = trained("sink-token")
    export_checkpoint(folder, tmp_path / "trt", dtype="float32")
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["streaming_trt"]["sink_token_id"] == 1
    back = load_trtllm_checkpoint(tmp_path / "trt")
    assert back.config.sink_token_id == 1
    model = st.load_model(folder, backend="torch")
    ids = ids_of(model, 30)
    session = back.session(sink_tokens=1, window=10)
    torch.testing.assert_close(session.feed(ids)[0], model.session(sink_tokens=1, window=10).feed(ids)[0])
    assert session.seen == [31]


@pytest.mark.parametrize("variant", ["zero-sink", "sink-logits"])
def test_tensorrt_llm_export_refuses_sink_logits(trained, tmp_path, variant):
    from streaming_trt.loading.checkpoint import load_checkpoint
    from streaming_trt.contract import UnsupportedModelError, UserError
    from streaming_trt.export import Mapping, export_checkpoint
    from streaming_trt.export.convert import write_trtllm_checkpoint

    with pytest.raises(UnsupportedModelError, match="sink_logits .* TensorRT-LLM's Llama attention does not compute"):
        export_checkpoint(trained(variant), tmp_path / "a", dtype="float32")
    config, tensors = load_checkpoint(trained(variant))
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="sink_logits"):
        write_trtllm_checkpoint(config, tensors, tmp_path / "b", Mapping(1, 1), "float32")


def test_triton_preprocessing_puts_the_sink_token_first(trained, tmp_path, monkeypatch):
    import numpy as np

    from streaming_trt.export import TritonOptions, sink_settings, write_triton_repo
    from test_export_triton import init_args, load_model_py

    folder = trained("sink-token")
    repo = tmp_path / "repo"
    repo.mkdir()
    write_triton_repo(repo, TritonOptions("/e", str(folder), sink_token_id=1), sink_settings(1, 9))
    pre = load_model_py(repo / "preprocessing" / "1" / "model.py", monkeypatch).TritonPythonModel()
    pre.initialize(init_args(repo, "preprocessing"))
    pb = __import__("sys").modules["triton_python_backend_utils"]
    request = {"QUERY": pb.Tensor("QUERY", np.array([[b"It is a truth"]], dtype=object)),
               "REQUEST_OUTPUT_LEN": pb.Tensor("REQUEST_OUTPUT_LEN", np.array([[5]], dtype=np.int32))}
    (response,) = pre.execute([request])
    out = {t.name: t.array for t in response.output_tensors}
    ids = st.load_tokenizer(str(folder)).encode("It is a truth", add_special_tokens=False)
    assert out["INPUT_ID"].tolist() == [[1] + ids] and out["REQUEST_INPUT_LEN"].tolist() == [[len(ids) + 1]]
