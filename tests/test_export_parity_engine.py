"""Parity of a real TensorRT-LLM sink-token engine with the emulation and the contract.

Runs only where TensorRT-LLM 0.9-0.21 and a CUDA GPU are present (it builds a tiny engine with
``python -m streaming_trt.cli.build``); elsewhere every test is skipped with what is missing. The
engine's greedy tokens and generation logits are compared with:

- ``TrtllmSinkEmulator`` (TensorRT-LLM's convention in PyTorch) for every prompt length;
- the eager runtime (the contract) where ``expected_agreement`` says they must agree, and shown
  to differ where it says they must differ (prompts longer than S + W).
"""
from __future__ import annotations

import json

import pytest
import torch

from streaming_trt.export import find_toolchain

TOOLCHAIN = find_toolchain()
pytestmark = pytest.mark.skipif(not TOOLCHAIN.ready, reason=f"needs a TensorRT-LLM engine build: {TOOLCHAIN.missing}")

S, W = 2, 14  # capacity 16; max_attention_window_size 15
NEW_TOKENS = 24
ATOL = 5e-2  # float16 engine against float64 emulation


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from checkpoints import make_checkpoint
    from streaming_trt.cli.build import main

    root = tmp_path_factory.mktemp("parity")
    # head_dim 64: a size every TensorRT-LLM attention kernel supports
    make_checkpoint(root / "hf", "llama", seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=512, num_hidden_layers=2)
    code = main(["--model", str(root / "hf"), "--output", str(root / "out"), "--sink-tokens", str(S),
                 "--window", str(W), "--dtype", "float16", "--max-batch-size", "1", "--max-input-len", str(3 * (S + W)),
                 "--allow-dense-context", "--max-output-len", str(NEW_TOKENS), "--gather-logits"])
    assert code == 0
    return root


def run_engine(root, prompt: list[int]):
    from tensorrt_llm.runtime import ModelRunnerCpp

    rt = json.loads((root / "out" / "runtime.json").read_text())
    runner = ModelRunnerCpp.from_dir(
        engine_dir=str(root / "out" / "engine"), max_batch_size=1, max_input_len=len(prompt),
        max_output_len=NEW_TOKENS, max_beam_width=1, **rt["model_runner_cpp"])
    with torch.no_grad():
        out = runner.generate(batch_input_ids=[torch.tensor(prompt, dtype=torch.int32)], max_new_tokens=NEW_TOKENS,
                              end_id=-1, pad_id=0, num_beams=1, output_generation_logits=True, return_dict=True)
    tokens = out["output_ids"][0, 0, len(prompt): len(prompt) + NEW_TOKENS].tolist()
    logits = out["generation_logits"][0, 0, :NEW_TOKENS].double().cpu()
    return tokens, logits


def fp16_model(root):
    """The eager model with the engine's float16-rounded weights, computing in float32."""
    from streaming_trt.loading.checkpoint import load_checkpoint
    from streaming_trt.runtime.model import Transformer

    config, tensors = load_checkpoint(root / "hf")
    return Transformer.from_state_dict(config, {k: v.half().float() for k, v in tensors.items()})


def emulated(root, prompt):
    from streaming_trt.export import TrtllmSinkEmulator, hf_weights, sink_settings

    model = fp16_model(root)
    s = sink_settings(S, W)
    emu = TrtllmSinkEmulator(model.config, hf_weights(model), s.sink_token_length, s.max_attention_window_size)
    return emu.greedy(prompt, NEW_TOKENS)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("prompt_len", [5, S + W, 2 * (S + W) + 3])
def test_engine_matches_the_emulation(engine, prompt_len):
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    got_tokens, got_logits = run_engine(engine, prompt)
    want_tokens, want_logits = emulated(engine, prompt)
    n = agreeing_prefix(got_tokens, want_tokens)
    assert n >= NEW_TOKENS // 2, f"tokens diverge at {n}: engine {got_tokens} vs emulation {want_tokens}"
    torch.testing.assert_close(got_logits[:n], want_logits[:n], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prompt_len", [5, S + W, 2 * (S + W) + 3])
def test_engine_against_the_contract(engine, prompt_len):
    from streaming_trt.export import expected_agreement

    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    got_tokens, got_logits = run_engine(engine, prompt)
    session = fp16_model(engine).session(sink_tokens=S, window=W)
    # teacher-force the engine's own tokens through the contract: row i predicts generated token i
    rows = session.feed(prompt + got_tokens[:-1])[0, prompt_len - 1:].double()
    agree = expected_agreement(prompt_len, prompt_len + NEW_TOKENS - 1, S, W, num_layers=2)[prompt_len - 1:]
    diff = (got_logits - rows).abs().amax(-1)
    assert diff[agree].max() < ATOL
    if (~agree).any():  # a prompt longer than S + W: the dense context phase shows
        assert diff[~agree].max() > ATOL
