"""TensorRT-LLM's StreamingLLM convention, emulated, against the streaming contract (eager runtime).

The expected difference is computed: where the emulation must agree with the contract, it does to
float rounding; where ``expected_agreement`` predicts a difference, the logits differ clearly.
"""
from __future__ import annotations

import pytest
import torch

import streaming_trt as st
from checkpoints import make_checkpoint
from streaming_trt.contract import UserError
from streaming_trt.export import TrtllmSinkEmulator, expected_agreement, hf_weights, sink_settings

AGREE, DIFFER = 1e-4, 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for layers in (1, 2, 3):
        path = tmp_path_factory.mktemp(f"llama{layers}")
        make_checkpoint(path, "llama", seed=layers, num_hidden_layers=layers)
        out[layers] = st.load_model(path)
    return out


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def contract(model, sink_tokens: int, window: int, toks: list[int]) -> torch.Tensor:
    return model.session(sink_tokens=sink_tokens, window=window).feed(toks)[0].double()


def emulate(model, sink_tokens, window, toks, prompt_len, **kw) -> torch.Tensor:
    s = sink_settings(sink_tokens, window)
    emu = TrtllmSinkEmulator(model.config, hf_weights(model), s.sink_token_length, s.max_attention_window_size, **kw)
    return emu.run(toks[:prompt_len], toks[prompt_len:])


@pytest.mark.parametrize("sink_tokens,window,prompt_len,tokens_per_block", [
    (2, 5, 3, None), (2, 5, 7, None), (2, 5, 7, 4), (4, 3, 6, 8), (0, 4, 2, None), (1, 2, 3, 2),
])
def test_prompts_up_to_the_capacity_match_the_contract(models, sink_tokens, window, prompt_len, tokens_per_block):
    """Translated with L = S + W - 1, the engine is the contract for prompts of at most S + W tokens,
    through many wraps of the ring, contiguous or paged (sink bubble)."""
    model = models[2]
    toks = tokens(prompt_len + 4 * window + 3, seed=prompt_len)
    got = emulate(model, sink_tokens, window, toks, prompt_len, tokens_per_block=tokens_per_block)
    torch.testing.assert_close(got, contract(model, sink_tokens, window, toks), atol=AGREE, rtol=0)


def test_greedy_tokens_match_the_contract(models):
    model, S, W = models[3], 2, 4
    prompt = tokens(5, seed=9)
    s = sink_settings(S, W)
    emu = TrtllmSinkEmulator(model.config, hf_weights(model), s.sink_token_length, s.max_attention_window_size)
    got_tokens, got_logits = emu.greedy(prompt, 20)
    session = model.session(sink_tokens=S, window=W)
    logits = session.feed(prompt)[0, -1]
    want_tokens, want_logits = [], []
    for _ in range(20):
        want_logits.append(logits)
        want_tokens.append(int(logits.argmax()))
        logits = session.feed([want_tokens[-1]])[0, -1]
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, torch.stack(want_logits).double(), atol=AGREE, rtol=0)


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("prompt_len", [8, 13])
def test_longer_prompts_differ_exactly_where_predicted(models, layers, prompt_len):
    model, S, W = models[layers], 2, 5
    toks = tokens(prompt_len + 3 * (S + W), seed=layers * 100 + prompt_len)
    got = emulate(model, S, W, toks, prompt_len)
    diff = (got - contract(model, S, W, toks)).abs().amax(-1)
    agree = expected_agreement(prompt_len, len(toks), S, W, layers)
    assert (~agree).any() and agree[prompt_len:].any()  # both kinds of rows are exercised
    assert diff[agree].max() < AGREE
    assert diff[~agree].min() > DIFFER


def test_long_prompt_logits_are_dense_attention(models, tmp_path):
    """The context phase is plain causal attention at text positions: transformers' logits."""
    import transformers

    path = tmp_path / "hf"
    make_checkpoint(path, "llama", seed=2, num_hidden_layers=2)
    model = st.load_model(path)
    toks = tokens(30, seed=4)
    got = emulate(model, 2, 5, toks, prompt_len=30)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([toks])).logits[0].double()
    torch.testing.assert_close(got, want, atol=AGREE, rtol=0)


def test_expected_agreement_by_hand():
    # S=2, W=5, C=7, prompt of 12 tokens, 2 layers: prompt rows 7..11 attend densely; a generated
    # token agrees again once its window (t-4..t) has left the prompt: t >= 16.
    got = expected_agreement(12, 20, 2, 5, num_layers=2)
    assert got.tolist() == [True] * 7 + [False] * 9 + [True] * 4
    assert expected_agreement(12, 20, 2, 5, num_layers=1).tolist() == [True] * 7 + [False] * 5 + [True] * 8
    assert expected_agreement(7, 20, 2, 5, num_layers=3).all()


def test_the_off_by_one(models):
    """max_attention_window_size = S + W (counting the current token) is one key too many for
    0.9-0.21 kernels: that engine computes the contract with window W + 1. Kernels that count the
    current token ("inclusive") compute window W with it."""
    model, S, W, n = models[2], 2, 5, 4
    toks = tokens(n + 20, seed=5)
    engine_l = S + W
    naive = TrtllmSinkEmulator(model.config, hf_weights(model), S, engine_l, "exclusive").run(toks[:n], toks[n:])
    torch.testing.assert_close(naive, contract(model, S, W + 1, toks), atol=AGREE, rtol=0)
    wrong = (naive - contract(model, S, W, toks)).abs().amax(-1)
    assert wrong[: S + W].max() < AGREE and wrong[S + W:].min() > DIFFER  # wrong from the first eviction on
    inclusive = TrtllmSinkEmulator(model.config, hf_weights(model), S, engine_l, "inclusive").run(toks[:n], toks[n:])
    torch.testing.assert_close(inclusive, contract(model, S, W, toks), atol=AGREE, rtol=0)


@pytest.mark.parametrize("sink_tokens,window,tokens_per_block,bubble", [(4, 6, None, 0), (4, 6, 64, 60), (4, 6, 4, 0),
                                                                        (3, 9, 8, 5), (0, 3, 16, 0)])
def test_slot_map(models, sink_tokens, window, tokens_per_block, bubble):
    s = sink_settings(sink_tokens, window)
    emu = TrtllmSinkEmulator(models[1].config, hf_weights(models[1]), s.sink_token_length,
                             s.max_attention_window_size, tokens_per_block=tokens_per_block)
    assert emu.bubble == bubble and emu.ring == window - 1
    for t in range(1, 5 * (sink_tokens + window)):
        kept = emu.kept_after(t)
        slots = [emu.slot_of(u) for u in kept]
        assert len(set(slots)) == len(slots) == min(t, sink_tokens + window - 1)
        assert all(emu.slot_of(u) == u for u in kept if u < sink_tokens)
        assert all(sink_tokens + bubble <= emu.slot_of(u) < emu.num_slots for u in kept if u >= sink_tokens)
        assert kept[min(t, sink_tokens):] == list(range(t - (len(kept) - min(t, sink_tokens)), t))


def test_invalid_settings_are_refused(models):
    with pytest.raises(UserError, match="no ring slot"):
        TrtllmSinkEmulator(models[1].config, hf_weights(models[1]), 4, 4)
    with pytest.raises(UserError, match="convention"):
        TrtllmSinkEmulator(models[1].config, hf_weights(models[1]), 1, 4, convention="both")
    with pytest.raises(UserError, match=">= 2"):
        sink_settings(4, 1)
