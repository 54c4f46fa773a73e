"""The Triton Inference Server repository: every config.pbtxt parses as a Triton ModelConfig, carries
the sink settings, and the ensemble wires existing tensors; the Python models run on a stand-in of
Triton's python-backend API."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from streaming_trt.contract import UserError
from streaming_trt.export import TritonOptions, sink_settings, write_triton_repo
from streaming_trt.export.inference_server import model_parameters
from streaming_trt.export.model_repository import parse_model_config

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (ships the ModelConfig protobuf) is not installed")


@pytest.fixture
def repo(tmp_path):
    opts = TritonOptions(engine_dir="/models/llama/engine", tokenizer_dir="/models/llama/tokenizer",
                         max_batch_size=4, max_input_len=64)
    write_triton_repo(tmp_path, opts, sink_settings(4, 60))
    return tmp_path


def configs(repo):
    return {m: parse_model_config((repo / m / "config.pbtxt").read_text(), m)
            for m in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")}


def test_layout_and_no_placeholders(repo):
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == ["ensemble/1/.keep", "ensemble/config.pbtxt", "postprocessing/1/model.py",
                     "postprocessing/config.pbtxt", "preprocessing/1/model.py", "preprocessing/config.pbtxt",
                     "tensorrt_llm/1/.keep", "tensorrt_llm/config.pbtxt"]
    for p in repo.rglob("*.pbtxt"):
        assert "${" not in p.read_text()


def test_tensorrt_llm_model_carries_the_sink_settings(repo):
    c = configs(repo)["tensorrt_llm"]
    assert (c.name, c.backend, c.max_batch_size) == ("tensorrt_llm", "tensorrtllm", 4)
    p = model_parameters(c)
    assert p["gpt_model_path"] == "/models/llama/engine"
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["sink_token_length"] == "4"
    assert p["max_attention_window_size"] == "63"  # S + W - 1
    assert p["enable_kv_cache_reuse"] == "false" and p["enable_chunked_context"] == "false"
    assert p["max_beam_width"] == "1"
    assert not c.model_transaction_policy.decoupled
    assert {i.name for i in c.input} >= {"input_ids", "input_lengths", "request_output_len", "end_id", "streaming"}


def test_tokenizer_path_in_pre_and_postprocessing(repo):
    c = configs(repo)
    for name in ("preprocessing", "postprocessing"):
        assert c[name].backend == "python"
        assert model_parameters(c[name])["tokenizer_dir"] == "/models/llama/tokenizer"
    assert model_parameters(c["preprocessing"])["max_input_len"] == "64"


def test_ensemble_wires_existing_tensors_with_matching_shapes(repo):
    c = configs(repo)
    ens = c["ensemble"]
    assert ens.platform == "ensemble"
    available = {t.name: list(t.dims) for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = c[step.model_name]
        inputs = {t.name: list(t.dims) for t in model.input}
        outputs = {t.name: list(t.dims) for t in model.output}
        for key, value in step.input_map.items():
            assert key in inputs, f"{step.model_name} has no input {key}"
            assert value in available, f"{value} is not produced before {step.model_name}"
            assert available[value] == inputs[key], f"{value} -> {step.model_name}.{key}: dims differ"
        for key, value in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            available[value] = outputs[key]
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: required inputs not fed"
    for t in ens.output:
        assert available.get(t.name) == list(t.dims)


def test_options_reach_the_files(tmp_path):
    opts = TritonOptions(engine_dir="/e", tokenizer_dir="/t", max_batch_size=16, batching_strategy="V1",
                         decoupled=True)
    write_triton_repo(tmp_path, opts, sink_settings(0, 2))
    c = configs(tmp_path)
    assert all(m.max_batch_size == 16 for m in c.values())
    p = model_parameters(c["tensorrt_llm"])
    assert (p["gpt_model_type"], p["sink_token_length"], p["max_attention_window_size"]) == ("V1", "0", "1")
    assert c["tensorrt_llm"].model_transaction_policy.decoupled
    with pytest.raises(UserError, match="batching strategy"):
        write_triton_repo(tmp_path / "x", TritonOptions("/e", "/t", batching_strategy="static"), sink_settings(4, 8))


def test_invalid_config_text_is_reported():
    with pytest.raises(UserError, match="not a valid Triton model config"):
        parse_model_config('name: "x"\nmax_batch_size: "eight"\n', "x/config.pbtxt")


# -- the Python-backend models, on a stand-in for triton_python_backend_utils -----------------

def fake_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors or [], error

    class TritonError(Exception):
        pass

    m.Tensor, m.InferenceResponse, m.TritonError = Tensor, InferenceResponse, TritonError
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    return m


@pytest.fixture
def tokenizer_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "once", "upon", "a", "time", "there", "was"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def load_model_py(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"model_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_args(repo, name):
    c = parse_model_config((repo / name / "config.pbtxt").read_text())
    params = {k: {"string_value": v} for k, v in model_parameters(c).items()}
    return {"model_config": json.dumps({"name": name, "parameters": params})}


def test_pre_and_postprocessing_models_run(tmp_path, tokenizer_dir, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_triton_repo(repo, TritonOptions("/e", str(tokenizer_dir), max_input_len=4), sink_settings(1, 3))
    pre = load_model_py(repo / "preprocessing" / "1" / "model.py", monkeypatch).TritonPythonModel()
    pre.initialize(init_args(repo, "preprocessing"))
    pb = sys.modules["triton_python_backend_utils"]
    request = {"QUERY": pb.Tensor("QUERY", np.array([[b"once upon a time"], [b"there was"]], dtype=object)),
               "REQUEST_OUTPUT_LEN": pb.Tensor("REQUEST_OUTPUT_LEN", np.array([[5], [5]], dtype=np.int32))}
    (response,) = pre.execute([request])
    out = {t.name: t.array for t in response.output_tensors}
    assert out["INPUT_ID"].tolist() == [[3, 4, 5, 6], [7, 8, 0, 0]]
    assert out["REQUEST_INPUT_LEN"].tolist() == [[4], [2]]
    assert out["OUT_END_ID"].tolist() == [[1], [1]] and out["OUT_PAD_ID"].tolist() == [[0], [0]]
    too_long = {**request, "QUERY": pb.Tensor("QUERY", np.array([[b"once upon a time there"]], dtype=object)),
                "REQUEST_OUTPUT_LEN": pb.Tensor("REQUEST_OUTPUT_LEN", np.array([[5]], dtype=np.int32))}
    (response,) = pre.execute([too_long])
    assert response.error is not None and "max_input_len=4" in str(response.error)

    post = load_model_py(repo / "postprocessing" / "1" / "model.py", monkeypatch).TritonPythonModel()
    post.initialize(init_args(repo, "postprocessing"))
    request = {"TOKENS_BATCH": pb.Tensor("TOKENS_BATCH", np.array([[[7, 8, 1, 0]]], dtype=np.int32)),
               "SEQUENCE_LENGTH": pb.Tensor("SEQUENCE_LENGTH", np.array([[3]], dtype=np.int32))}
    (response,) = post.execute([request])
    assert response.output_tensors[0].array.tolist() == [[b"there was"]]
