"""What a training run writes: a Hugging Face checkpoint, the resumable state, logs and plots.

A run folder holds ``config.json`` + ``model.safetensors`` + the tokenizer (loadable by
``st.load_model``, ``streaming_trt.hf`` and the exporters), ``train_state.pt`` (optimizer, RNG
states, data position, step, the run's settings), ``log.csv`` (loss per step),
``attention_mass.csv`` (per layer, over steps) and ``loss.png`` / ``attention_mass.png``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.config import ModelConfig
from ..contract import UserError

STATE = "train_state.pt"
LOG_FIELDS = ("step", "tokens", "seconds", "lr", "loss")
MASS_FIELDS = ("step", "tokens", "layer", "token0", "sink_term", "uniform", "heldout_loss")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def hf_config(config: ModelConfig, variant: str) -> dict:
    """config.json: the runtime's fields with Hugging Face names, plus what transformers wants."""
    d = config.to_hf_dict()
    d.update(architectures=["LlamaForCausalLM"], torch_dtype="float32", streaming_trt_variant=variant)
    return d


def save_model(folder: Path, model, variant: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32, Hugging Face names)."""
    c: ModelConfig = model.config
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("self_attn.sinks") and c.sink_logits != "learned":
            continue  # zero-sink: exp(0) is implied by the config, nothing is stored
        tensors[name if name.startswith("lm_head") else f"model.{name}"] = p.detach().float().cpu().contiguous()
    _atomic(folder / "model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    _atomic(folder / "config.json", lambda f: f.write_text(json.dumps(hf_config(c, variant), indent=2) + "\n"))


def save_state(folder: Path, state: dict) -> None:
    _atomic(folder / STATE, lambda f: torch.save(state, f))


def load_state(folder: Path) -> dict:
    path = folder / STATE
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; start a run in {folder} first (without --resume)")
    return torch.load(path, map_location="cpu", weights_only=False)


def append_rows(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def truncate_log(path: Path, step: int) -> None:
    """Drop rows past ``step`` (logged after the state a resumed run starts from was saved)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if int(r["step"]) <= step]
        fields = tuple(reader.fieldnames or ())
    path.unlink()
    if fields:
        append_rows(path, fields, rows)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot(folder: Path, title: str) -> None:
    """``loss.png`` (training loss per step, smoothed, and held-out loss) and ``attention_mass.png``
    (mean attention on token 0 per layer over steps, Figure 2 style, with the even-spread level)."""
    import matplotlib  # optional (the bench extra): only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the [bench] extra, optional

    log, mass = read_rows(folder / "log.csv"), read_rows(folder / "attention_mass.csv")
    if log:
        steps = [int(r["step"]) for r in log]
        loss = [float(r["loss"]) for r in log]
        k = max(1, len(loss) // 50)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, loss, color="0.8", lw=0.8, label="training loss")
        ax.plot(steps, smooth, color="C0", label=f"training loss (mean of {k})")
        held = sorted({(int(r["step"]), float(r["heldout_loss"])) for r in mass})
        if held:
            ax.plot(*zip(*held), "o-", color="C3", ms=3, label="held-out loss")
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=120)
        plt.close(fig)
    if mass:
        layers = sorted({int(r["layer"]) for r in mass})
        learned = any(float(r["sink_term"]) > 0 for r in mass)
        fig, axes = plt.subplots(1, 2 if learned else 1, figsize=(11 if learned else 6, 4), squeeze=False)
        for layer in layers:
            rows = [r for r in mass if int(r["layer"]) == layer]
            x = [int(r["step"]) for r in rows]
            axes[0][0].plot(x, [float(r["token0"]) for r in rows], label=f"layer {layer}")
            if learned:
                axes[0][1].plot(x, [float(r["sink_term"]) for r in rows], label=f"layer {layer}")
        axes[0][0].axhline(float(mass[0]["uniform"]), color="k", ls="--", lw=0.8, label="even spread")
        axes[0][0].set(xlabel="step", ylabel="mean attention on token 0", title=f"{title}: token 0")
        axes[0][0].legend(fontsize=7)
        if learned:
            axes[0][1].set(xlabel="step", ylabel="mean weight of the sink term", title=f"{title}: sink logits")
            axes[0][1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "attention_mass.png", dpi=120)
        plt.close(fig)
