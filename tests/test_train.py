"""python -m streaming_trt.cli.train: training falls, resumes exactly, and its checkpoints run as trained."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import streaming_trt as st
from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import CheckpointError
from streaming_trt.runtime.model import Transformer
from streaming_trt.train import forward, new_model, train
from streaming_trt.cli import train as cli
from streaming_trt.train import data, files
import train_runs
from train_runs import tiny

LOSS_MARGIN = 1.0  # nats: the loss after 50 steps is at least this far below the first step's


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return train_runs.text_file(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_runs.runs(tmp_path_factory)


def trained_model(folder: Path) -> Transformer:
    """The model as the trainer left it (from its state, not from the exported checkpoint)."""
    state = files.load_state(folder)
    model = new_model(ModelConfig.from_hf_dict(state["config"]), 0)
    model.load_state_dict(state["model"])
    return model.eval()


def test_loss_falls_in_50_steps(text_file, tmp_path):
    summary = train(tiny(text_file, tmp_path / "run", variant="sink-token"), quiet=True)
    assert summary["steps"] == 50
    assert summary["last_loss"] < summary["first_loss"] - LOSS_MARGIN, summary
    rows = files.read_rows(tmp_path / "run" / "attention_mass.csv")
    assert {int(r["step"]) for r in rows} == {0, 10, 20, 30, 40, 50}
    assert float(rows[-1]["heldout_loss"]) < float(rows[0]["heldout_loss"]) - LOSS_MARGIN
    for name in ("loss.png", "attention_mass.png", "config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name


@pytest.mark.parametrize("variant", ["vanilla", "sink-logits"])
def test_resume_equals_uninterrupted(text_file, tmp_path, variant):
    whole = tiny(text_file, tmp_path / "whole", variant=variant, steps=12, save_every=4, measure_every=3)
    train(whole, quiet=True)
    part = dataclasses.replace(whole, out=str(tmp_path / "part"), stop_at=7)
    assert train(part, quiet=True)["steps"] == 7
    assert train(dataclasses.replace(part, stop_at=None), resume=True, quiet=True)["steps"] == 12
    a, b = files.load_state(tmp_path / "whole"), files.load_state(tmp_path / "part")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    losses = [[r["loss"] for r in files.read_rows(tmp_path / d / "log.csv")] for d in ("whole", "part")]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    # (the interrupted run also measured where it stopped, step 7)
    masses = [[(r["step"], r["layer"], r["token0"]) for r in files.read_rows(tmp_path / d / "attention_mass.csv")
               if int(r["step"]) % 3 == 0] for d in ("whole", "part")]
    assert masses[0] == masses[1]


def test_resume_refuses_a_missing_run_and_overwriting(text_file, tmp_path, trained, capsys):
    assert cli.main(["--resume", "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "train_state.pt not found" in capsys.readouterr().err
    assert cli.main(["--text", str(text_file), "--preset", "tiny", "--out", str(trained("vanilla")), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["vanilla", "sink-token", "zero-sink", "sink-logits"])
def test_checkpoint_records_the_variant_and_runs_as_trained(trained, variant):
    folder = trained(variant)
    config = json.loads((folder / "config.json").read_text())
    assert config.get("sink_token_id") == (data.SINK_ID if variant == "sink-token" else None)
    assert config.get("sink_logits") == {"zero-sink": "zero", "sink-logits": "learned"}.get(variant)
    model = st.load_model(folder, backend="torch")
    mine = trained_model(folder)
    if variant == "sink-logits":
        assert all(bool(layer.self_attn.sinks.abs().min() > 0) for layer in mine.layers)  # they were trained
    tokenizer = st.load_tokenizer(str(folder))
    ids = tokenizer.encode("It is a truth universally acknowledged.", add_special_tokens=False)
    assert data.SINK_ID not in ids
    session = model.session(sink_tokens=0, window=32, cache_fill=float("nan"))
    got = session.feed(ids)[0]
    with torch.no_grad():
        if variant == "sink-token":
            want = forward(mine, torch.tensor([[data.SINK_ID] + ids]))[0][0, 1:]
            assert session.seen == [len(ids) + 1]
        else:
            want = forward(mine, torch.tensor([ids]))[0][0]
            assert session.seen == [len(ids)]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_config_round_trip_and_bad_sink_fields():
    c = ModelConfig(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=2, head_dim=8, sink_token_id=3, sink_logits="learned")
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    plain = dataclasses.replace(c, sink_token_id=None, sink_logits=None).to_hf_dict()
    assert "sink_token_id" not in plain and "sink_logits" not in plain
    with pytest.raises(CheckpointError, match="sink_logits 'yes'"):
        ModelConfig.from_hf_dict(dict(c.to_hf_dict(), sink_logits="yes"))
    with pytest.raises(CheckpointError, match="sink_token_id 50 is outside"):
        ModelConfig.from_hf_dict(dict(c.to_hf_dict(), sink_token_id=50))


# --- the sink token: at the start of every stream, exactly once -------------------------------

def _without_sink_token(model: Transformer) -> Transformer:
    """The same weights with no sink token recorded: the caller must feed it by hand."""
    config = dataclasses.replace(model.config, sink_token_id=None)
    tensors = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    return Transformer.from_state_dict(config, tensors, backend="torch")


def test_sink_token_is_prepended_once_per_stream(trained, tmp_path):
    model = st.load_model(trained("sink-token"), backend="torch")
    plain = _without_sink_token(model)
    sink = model.config.sink_token_id
    ids = torch.randint(2, model.config.vocab_size, (40,)).tolist()
    by_hand = plain.session(sink_tokens=1, window=11, cache_fill=float("nan")).feed([sink] + ids)[0, 1:]

    session = model.session(sink_tokens=1, window=11, cache_fill=float("nan"))
    first = session.feed(ids[:15])[0]
    assert session.seen == [16]
    session.save(tmp_path / "s.safetensors")
    rest = session.feed(ids[15:])[0]
    torch.testing.assert_close(torch.cat([first, rest]), by_hand, rtol=1e-5, atol=1e-5)
    assert session.seen == [41]

    restored = st.Session.load(tmp_path / "s.safetensors", model)
    torch.testing.assert_close(restored.feed(ids[15:])[0], by_hand[15:], rtol=1e-5, atol=1e-5)
    assert restored.seen == [41]  # no second sink token

    session.reset()
    torch.testing.assert_close(session.feed(ids)[0], by_hand, rtol=1e-5, atol=1e-5)
    assert session.seen == [41]

    # a batch: each stream gets its own sink token when it first receives tokens
    batch = model.session(sink_tokens=1, window=11, batch=2, cache_fill=float("nan"))
    batch.feed([ids[:5], []])
    out = batch.feed([ids[5:], ids])
    torch.testing.assert_close(out[0, :35], by_hand[5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], by_hand, rtol=1e-5, atol=1e-5)
    assert batch.seen == [41, 41]



def test_init_continues_a_checkpoint(trained, text_file, tmp_path):
    from streaming_trt.contract import UserError

    source = trained("sink-token")
    train(tiny(text_file, tmp_path / "more", variant="sink-token", steps=4, init=str(source)), quiet=True)
    before = files.read_rows(source / "attention_mass.csv")[-1]
    after = files.read_rows(tmp_path / "more" / "attention_mass.csv")[0]
    assert after["step"] == "0" and after["heldout_loss"] == before["heldout_loss"]  # the same weights, measured again
    assert json.loads((tmp_path / "more" / "config.json").read_text())["sink_token_id"] == data.SINK_ID
    with pytest.raises(UserError, match="is a sink-token model; pass --variant sink-token"):
        train(tiny(text_file, tmp_path / "wrong", variant="vanilla", init=str(source)), quiet=True)
