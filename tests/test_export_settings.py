"""Sink-engine eligibility, the contract -> TensorRT-LLM translation, and the build command."""
from __future__ import annotations

import pytest

from checkpoints import make_checkpoint
from streaming_trt.contract import UnsupportedModelError, UserError
from streaming_trt.export import EngineOptions, find_toolchain, sink_settings, supports_sinks, trtllm_build_command
from streaming_trt.export.settings import check_engine_options, run_py_flags, runtime_settings
from streaming_trt.export.support import check_sink_engine, read_source


@pytest.mark.parametrize("arch,overrides,reason", [
    ("qwen3", {}, "q_norm/k_norm"),
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window is on"),
    ("llama3", {}, "rope scaling 'llama3'"),
    ("llama", {"mlp_bias": True}, "MLP biases"),
])
def test_models_that_do_not_map_onto_llama_are_refused(tmp_path, arch, overrides, reason):
    make_checkpoint(tmp_path, arch, **overrides)
    with pytest.raises(UnsupportedModelError) as e:
        check_sink_engine(read_source(tmp_path))
    assert reason in str(e.value) and "cannot build a TensorRT-LLM sink-token engine" in str(e.value)
    if arch not in ("llama", "llama3"):
        assert "accepts LlamaForCausalLM only" in str(e.value)


@pytest.mark.parametrize("arch,overrides,note", [
    ("llama", {}, None),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),
    ("mistral", {}, "exported as LlamaForCausalLM"),
    ("qwen2", {}, "zero attention.dense.bias"),
])
def test_models_that_map_exactly_are_accepted(tmp_path, arch, overrides, note):
    make_checkpoint(tmp_path, arch, **overrides)
    notes = check_sink_engine(read_source(tmp_path))
    assert (note is None and notes == []) or any(note in n for n in notes)


def test_translation_states_the_off_by_one():
    s = sink_settings(4, 1020)
    assert (s.capacity, s.sink_token_length, s.max_attention_window_size) == (1024, 4, 1023)
    assert "4 + 1020 - 1" in s.explain() and "not the current token" in s.explain()
    assert sink_settings(0, 2).max_attention_window_size == 1
    assert sink_settings(4, 1020, "inclusive").max_attention_window_size == 1024
    for bad in [(-1, 8), (4, 1), (4, 0)]:
        with pytest.raises(UserError):
            sink_settings(*bad)


def test_build_command_and_runtime_flags():
    s = sink_settings(4, 60)
    opts = EngineOptions(max_batch_size=2, max_input_len=64, max_output_len=100)
    cmd = trtllm_build_command("ckpt", "eng", opts)
    text = " ".join(cmd)
    assert cmd[0] == "trtllm-build"
    for flags in ["--checkpoint_dir ckpt", "--output_dir eng", "--streamingllm enable",
                  "--use_paged_context_fmha disable", "--max_beam_width 1", "--max_batch_size 2",
                  "--max_input_len 64", "--max_seq_len 164"]:
        assert flags in text
    assert "--paged_kv_cache disable" not in text and "gather" not in text
    old = " ".join(trtllm_build_command("ckpt", "eng", opts, trtllm_version="0.10.0"))
    assert "--max_output_len 100" in old and "--max_seq_len" not in old
    assert "--gemm_plugin bfloat16 --gpt_attention_plugin bfloat16" in " ".join(
        trtllm_build_command("ckpt", "eng", opts, dtype="bfloat16"))
    with_logits = trtllm_build_command("ckpt", "eng", EngineOptions(gather_logits=True))
    assert "--gather_context_logits" in with_logits and "--gather_generation_logits" in with_logits
    assert run_py_flags(s) == ["--sink_token_length", "4", "--max_attention_window_size", "63", "--num_beams", "1"]
    rt = runtime_settings(s, opts, cmd, "ckpt", "eng", engine_built=False, tp=1, pp=1)
    assert rt["sink_token_length"] == 4 and rt["max_attention_window_size"] == 63
    assert rt["contract"] == {"sink_tokens": 4, "window": 60, "capacity": 64}
    assert rt["required"]["enable_kv_cache_reuse"] is False and rt["required"]["enable_chunked_context"] is False
    assert rt["model_runner_cpp"]["max_attention_window_size"] == [63]
    assert rt["kv_cache_config"] == {"sink_token_length": 4, "max_attention_window": [63], "enable_block_reuse": False}


def test_prompts_longer_than_the_capacity_need_consent():
    s = sink_settings(4, 60)
    check_engine_options(EngineOptions(max_input_len=64), s)
    with pytest.raises(UserError, match="attend to a whole prompt densely"):
        check_engine_options(EngineOptions(max_input_len=65), s)
    check_engine_options(EngineOptions(max_input_len=65), s, allow_dense_context=True)
    with pytest.raises(UserError, match="--max-batch-size must be >= 1"):
        check_engine_options(EngineOptions(max_batch_size=0), s)


def test_versions_with_streamingllm():
    assert [supports_sinks(v) for v in ["0.8.0", "0.9.0", "0.12.0", "0.21.0", "0.21.1rc0", "1.0.0", "1.1.0", None]] \
        == [False, True, True, True, True, False, False, False]


def test_toolchain_here_says_what_is_missing():
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed on this machine")
    tc = find_toolchain()
    assert not tc.ready and tc.version is None
    assert "tensorrt_llm package is not installed" in tc.missing
