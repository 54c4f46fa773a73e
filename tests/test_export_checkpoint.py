"""TensorRT-LLM checkpoint export: names, shapes, dtypes and contents per rank, and the round trip."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_checkpoint
from streaming_trt.loading.checkpoint import load_checkpoint
from streaming_trt.contract import CheckpointError, UnsupportedModelError, UserError
from streaming_trt.export import (Mapping, export_checkpoint, load_trtllm_checkpoint, merge_trtllm_checkpoint,
                                  read_trtllm_checkpoint)

MAPPINGS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama with 2 KV heads (duplicated at tp=4), 4 layers (2 per stage at pp=2), vocab 97 (padded)."""
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, "llama", num_hidden_layers=4)
    return path


def expected_layout(hf_cfg: dict, tp: int, pp: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The rules of TensorRT-LLM's Llama checkpoint, written out independently of export/src/convert.py."""
    heads, kv, hidden = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"], hf_cfg["hidden_size"]
    d, inter = hidden // heads, hf_cfg["intermediate_size"]
    layers, vocab = hf_cfg["num_hidden_layers"], hf_cfg["vocab_size"]
    tp_rank, pp_rank = rank % tp, rank // tp
    kv_local = kv // tp if kv >= tp else 1
    out = {}
    for i in range(layers // pp):
        p = f"transformer.layers.{i}."
        out[p + "attention.qkv.weight"] = ((heads // tp + 2 * kv_local) * d, hidden)
        out[p + "attention.dense.weight"] = (hidden, heads // tp * d)
        out[p + "mlp.fc.weight"] = (inter // tp, hidden)
        out[p + "mlp.gate.weight"] = (inter // tp, hidden)
        out[p + "mlp.proj.weight"] = (hidden, inter // tp)
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_layernorm.weight"] = (hidden,)
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = (vocab, hidden)
    if pp_rank == pp - 1:
        out["lm_head.weight"] = (-(-vocab // tp), hidden)
        out["transformer.ln_f.weight"] = (hidden,)
    return out


@pytest.mark.parametrize("tp,pp", MAPPINGS)
def test_keys_shapes_dtypes_and_config(llama, tmp_path, tp, pp):
    out = tmp_path / "trt"
    export_checkpoint(llama, out, dtype="float16", tp=tp, pp=pp)
    hf_cfg = json.loads((llama / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "float16"
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert cfg["num_hidden_layers"] == 4 and cfg["num_key_value_heads"] == 2 and cfg["head_size"] == 16
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["hidden_act"] == "silu"
    assert cfg["norm_epsilon"] == hf_cfg["rms_norm_eps"] and cfg["rotary_base"] == 10000.0
    assert cfg["quantization"]["quant_algo"] is None and cfg["use_parallel_embedding"] is False
    ranks = [f"rank{r}.safetensors" for r in range(tp * pp)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json"] + ranks)
    for rank in range(tp * pp):
        tensors = load_file(str(out / f"rank{rank}.safetensors"))
        want = expected_layout(hf_cfg, tp, pp, rank)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == want
        assert all(v.dtype == torch.float16 for v in tensors.values())


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (4, 2)])
def test_contents_follow_the_rules(llama, tmp_path, tp, pp):
    """Each rank holds exactly the HF rows/columns the rules assign it (float32, so bit-exact)."""
    out = tmp_path / "trt"
    export_checkpoint(llama, out, dtype="float32", tp=tp, pp=pp)
    _, hf = load_checkpoint(llama)
    d, heads, kv, layers, vocab = 16, 4, 2, 4, 97
    for rank in range(tp * pp):
        t = load_file(str(out / f"rank{rank}.safetensors"))
        tp_rank, pp_rank = rank % tp, rank // tp
        for local in range(layers // pp):
            g = pp_rank * (layers // pp) + local  # layer numbering restarts on every stage
            src, dst = f"model.layers.{g}.", f"transformer.layers.{local}."
            qkv = t[dst + "attention.qkv.weight"]
            q_heads = heads // tp
            q = hf[src + "self_attn.q_proj.weight"].view(heads, d, -1)[tp_rank * q_heads:(tp_rank + 1) * q_heads]
            assert torch.equal(qkv[: q_heads * d], q.reshape(-1, q.shape[-1]))
            # KV heads: this rank's share; with tp > kv heads, the head its query heads use (duplicated)
            if tp > kv:
                kv_ids = [tp_rank * q_heads * kv // heads]
            else:
                kv_ids = list(range(tp_rank * kv // tp, (tp_rank + 1) * kv // tp))
            k = hf[src + "self_attn.k_proj.weight"].view(kv, d, -1)[kv_ids].reshape(-1, 64)
            v = hf[src + "self_attn.v_proj.weight"].view(kv, d, -1)[kv_ids].reshape(-1, 64)
            assert torch.equal(qkv[q_heads * d: q_heads * d + k.shape[0]], k)
            assert torch.equal(qkv[q_heads * d + k.shape[0]:], v)
            cols = slice(tp_rank * q_heads * d, (tp_rank + 1) * q_heads * d)
            assert torch.equal(t[dst + "attention.dense.weight"], hf[src + "self_attn.o_proj.weight"][:, cols])
            rows = slice(tp_rank * 96 // tp, (tp_rank + 1) * 96 // tp)
            assert torch.equal(t[dst + "mlp.fc.weight"], hf[src + "mlp.gate_proj.weight"][rows])  # fc <- gate_proj
            assert torch.equal(t[dst + "mlp.gate.weight"], hf[src + "mlp.up_proj.weight"][rows])  # gate <- up_proj
            assert torch.equal(t[dst + "mlp.proj.weight"], hf[src + "mlp.down_proj.weight"][:, rows])
            assert torch.equal(t[dst + "post_layernorm.weight"], hf[src + "post_attention_layernorm.weight"])
        if pp_rank == pp - 1:
            padded = -(-vocab // tp) * tp
            head = torch.cat([hf["lm_head.weight"], torch.zeros(padded - vocab, 64)])
            per = padded // tp
            assert torch.equal(t["lm_head.weight"], head[tp_rank * per:(tp_rank + 1) * per])
        if pp_rank == 0:
            assert torch.equal(t["transformer.vocab_embedding.weight"], hf["model.embed_tokens.weight"])


def hf_logits(path, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("arch,tp,pp,overrides", [
    ("llama", 2, 2, {"num_hidden_layers": 4}),
    ("llama", 4, 1, {"num_key_value_heads": 1}),  # MQA duplicated 4 times
    ("llama3", 2, 1, {}),  # tied embeddings, llama3 rope (exported without the sink-engine check)
    ("mistral", 1, 2, {}),
    ("qwen2", 2, 1, {}),  # q/k/v biases, zero dense bias, tied embeddings
    ("llama", 2, 1, {"attention_bias": True}),  # o_proj bias too
])
def test_round_trip_matches_transformers(tmp_path, arch, tp, pp, overrides):
    """HF checkpoint -> TensorRT-LLM checkpoint -> eager runtime gives the HF model's logits."""
    src = tmp_path / "hf"
    make_checkpoint(src, arch, seed=3, **overrides)
    out = tmp_path / "trt"
    export_checkpoint(src, out, dtype="float32", tp=tp, pp=pp, sink_engine=False)
    tokens = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    model = load_trtllm_checkpoint(out)
    # 12 tokens < capacity 16: the contract is plain causal attention, so transformers is the reference
    got = model.session(sink_tokens=4, window=12).feed(tokens)[0]
    torch.testing.assert_close(got, hf_logits(src, tokens), atol=2e-4, rtol=1e-4)


def test_merge_restores_the_hf_tensors(tmp_path):
    src = tmp_path / "hf"
    make_checkpoint(src, "llama", num_key_value_heads=1, num_hidden_layers=4)
    export_checkpoint(src, tmp_path / "trt", dtype="float32", tp=4, pp=2)
    config, merged = merge_trtllm_checkpoint(tmp_path / "trt")
    _, hf = load_checkpoint(src)
    assert set(merged) == set(hf)
    assert all(torch.equal(merged[k], hf[k]) for k in hf)
    assert config.num_kv_heads == 1 and config.vocab_size == 97


def test_bfloat16_export_and_load(tmp_path, llama):
    export_checkpoint(llama, tmp_path / "trt", dtype="bfloat16", tp=2)
    t = load_file(str(tmp_path / "trt" / "rank1.safetensors"))
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    model = load_trtllm_checkpoint(tmp_path / "trt", dtype=torch.float32)
    _, hf = load_checkpoint(llama)
    assert torch.equal(model.embed_tokens.weight, hf["model.embed_tokens.weight"].bfloat16().float())


def test_auto_dtype_is_float16_for_a_float32_checkpoint(tmp_path, llama):
    result = export_checkpoint(llama, tmp_path / "trt", tp=1)
    assert result.dtype == "float16"
    assert json.loads((tmp_path / "trt" / "config.json").read_text())["dtype"] == "float16"


def test_existing_output_is_refused_and_kept(tmp_path, llama):
    out = tmp_path / "trt"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        export_checkpoint(llama, out)
    assert (out / "mine.txt").read_text() == "keep me"
    export_checkpoint(llama, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "rank0.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["trt"]  # no temporary directories left


def test_unsupported_parallelism_is_refused(tmp_path, llama):
    with pytest.raises(UserError, match="does not divide the model's 4 attention heads"):
        export_checkpoint(llama, tmp_path / "a", tp=3)
    with pytest.raises(UserError, match="does not divide the model's 4 layers"):
        export_checkpoint(llama, tmp_path / "b", pp=3)
    with pytest.raises(UserError, match=">= 1"):
        export_checkpoint(llama, tmp_path / "c", tp=0)
    assert list(tmp_path.iterdir()) == []


def test_qwen3_cannot_be_written_in_the_llama_format(tmp_path):
    make_checkpoint(tmp_path / "hf", "qwen3")
    with pytest.raises(UnsupportedModelError, match="q_norm/k_norm"):
        export_checkpoint(tmp_path / "hf", tmp_path / "a")
    with pytest.raises(UserError, match="Qwen3"):
        export_checkpoint(tmp_path / "hf", tmp_path / "b", sink_engine=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_corrupt_trtllm_checkpoints_are_reported(tmp_path, llama):
    out = tmp_path / "trt"
    export_checkpoint(llama, out, dtype="float32", tp=2)
    rank1 = load_file(str(out / "rank1.safetensors"))
    del rank1["transformer.layers.0.mlp.fc.weight"]
    save_file(rank1, str(out / "rank1.safetensors"))
    missing = r"rank1.safetensors: tensor 'transformer.layers.0.mlp.fc.weight' is missing"
    with pytest.raises(CheckpointError, match=missing):
        read_trtllm_checkpoint(out)
    (out / "rank1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_trtllm_checkpoint(out)
    (out / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank1.safetensors: not found"):
        load_trtllm_checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "architecture": "GPTForCausalLM"}))
    with pytest.raises(CheckpointError, match="architecture 'GPTForCausalLM' is not supported"):
        load_trtllm_checkpoint(out)
    (out / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_trtllm_checkpoint(out)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_trtllm_checkpoint(tmp_path / "missing")


def test_mapping_rank_order():
    m = Mapping(tp=2, pp=3)
    assert [m.coords(r) for r in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert list(m.stage_layers(1, 6)) == [2, 3]
