"""The training loop: AdamW with warm-up and cosine decay, resumable exactly, DDP when launched
by torchrun (``WORLD_SIZE > 1``), bf16 autocast on CUDA."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..loading.checkpoint import load_checkpoint
from ..runtime.config import ModelConfig
from ..contract import UserError
from ..loading.tokenizer import load_tokenizer
from . import data, files
from .forward import VARIANTS, Objective, forward, new_model


@dataclasses.dataclass
class Settings:
    """One run's settings (saved in the run's state; a resumed run keeps them but for ``RESUMABLE``)."""

    variant: str = "vanilla"
    text: str = "austen:all"
    out: str = "runs/vanilla"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688
    context: int = 256
    vocab_size: int = 2048
    batch: int = 16
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    heldout: float = 0.02
    device: str = "cpu"
    threads: int | None = None
    save_every: int = 200
    measure_every: int = 50
    measure_samples: int = 8
    max_minutes: float | None = None
    stop_at: int | None = None  # stop (and save) after this step, keeping the schedule of ``steps``
    init: str | None = None


RESUMABLE = ("steps", "device", "threads", "save_every", "max_minutes", "stop_at", "out")


def lr_at(s: Settings, step: int) -> float:
    """Learning rate of ``step`` (1-based): linear warm-up, then cosine from ``lr`` to ``min_lr``."""
    if step <= s.warmup:
        return s.lr * step / max(1, s.warmup)
    frac = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * frac))


def model_config(s: Settings, vocab_size: int) -> ModelConfig:
    if s.hidden % s.heads or s.heads % s.kv_heads:
        raise UserError(f"--hidden ({s.hidden}) must be a multiple of --heads ({s.heads}), and --heads of --kv-heads ({s.kv_heads})")
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.hidden // s.heads,
        rms_norm_eps=1e-5, max_position_embeddings=s.context, tie_word_embeddings=True, eos_token_id=data.EOS_ID,
        sink_token_id=data.SINK_ID if s.variant == "sink-token" else None,
        sink_logits={"zero-sink": "zero", "sink-logits": "learned"}.get(s.variant),
    )


def variant_of(config: ModelConfig) -> str:
    if config.sink_token_id is not None:
        return "sink-token"
    return {"zero": "zero-sink", "learned": "sink-logits"}.get(config.sink_logits, "vanilla")


class Distributed:
    """torch.distributed when torchrun launched several processes, else a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
            self.device = torch.device("cuda", local if self.world > 1 else torch.device(device).index or 0)
            torch.cuda.set_device(self.device)
        elif device == "cpu":
            self.device = torch.device("cpu")
        else:
            raise UserError(f"--device {device!r}: use cpu or cuda")
        if self.world > 1:
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, x: torch.Tensor) -> float:
        if self.world > 1:
            x = x.detach().clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return float(x)

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()


def _prepare(s: Settings, resume: dict | None, out: Path, dist: Distributed):
    """Tokenizer, token ids, config and model of a new, continued or resumed run."""
    text, label = data.read_text(s.text)
    train_text, held_text = data.split_text(text, s.heldout)
    tensors = None
    if resume is not None:
        tokenizer = data.load_tokenizer(out)
        config = ModelConfig.from_hf_dict(resume["config"])
    elif s.init:
        config, tensors = load_checkpoint(s.init)
        if variant_of(config) != s.variant:
            raise UserError(f"--init {s.init} is a {variant_of(config)} model; pass --variant {variant_of(config)}")
        if s.context > config.max_position_embeddings:
            raise UserError(f"--context {s.context} exceeds the model's max_position_embeddings ({config.max_position_embeddings})")
        tokenizer = load_tokenizer(s.init)
        if dist.main:
            tokenizer.save_pretrained(out)
    else:
        if dist.main:
            data.train_tokenizer(train_text, s.vocab_size, out)
        dist.barrier()
        tokenizer = data.load_tokenizer(out)
        config = model_config(s, len(tokenizer))
    model = new_model(config, s.seed)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif tensors is not None:
        names = dict(model.named_parameters())
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()}
                              | {k: p.detach() for k, p in names.items() if k.endswith("sinks") and config.sink_logits == "zero"})
    ids, held = data.encode(tokenizer, train_text), data.encode(tokenizer, held_text)
    return config, model, ids, held, label


def _optimizer(model, s: Settings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def train(s: Settings, resume: bool = False, quiet: bool = False) -> dict:
    """Run (or resume) training as ``s`` says; returns a summary (steps, tokens, seconds, losses)."""
    if s.variant not in VARIANTS:
        raise UserError(f"--variant {s.variant!r} is not one of {', '.join(VARIANTS)}")
    out = Path(s.out)
    state = None
    if resume:
        state = files.load_state(out)
        s = dataclasses.replace(Settings(**state["settings"]), **{k: getattr(s, k) for k in RESUMABLE})
    elif (out / files.STATE).is_file():
        raise UserError(f"--out {out} already holds a run; pass --resume to continue it, or another --out")
    if s.threads:
        torch.set_num_threads(s.threads)
    dist = Distributed(s.device)
    try:
        out.mkdir(parents=True, exist_ok=True)
        config, model, ids, held, label = _prepare(s, state, out, dist)
        return _loop(s, state, out, dist, config, model, ids, held, label, quiet)
    finally:
        dist.close()


def _loop(s, state, out, dist, config, model, ids, held, label, quiet) -> dict:
    device = dist.device
    model.to(device)
    objective = Objective(model)
    if dist.world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _optimizer(model, s)
    sink_id = config.sink_token_id
    samples = data.Samples(ids, s.context, s.batch, s.seed, sink_id, dist.rank, dist.world)
    probe = data.fixed_windows(held, s.measure_samples, s.context, sink_id).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    step, seconds = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        samples.load_state_dict(state["samples"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, seconds = state["step"], state["seconds"]
        for name in ("log.csv", "attention_mass.csv"):
            files.truncate_log(out / name, step)
    tokens_per_step = s.batch * s.context * dist.world
    log_rows: list[dict] = []
    mass_rows: list[dict] = []
    recent: list[float] = []  # the last 10 training losses
    measured = {"step": -1, "loss": float("nan")}

    def measure() -> None:
        with torch.no_grad(), autocast():
            logits, mass = forward(model, probe[:, :-1], measure=True)
        targets, logits = probe[:, 1:], logits.float()
        if sink_id is not None:
            targets, logits = targets[:, 1:], logits[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()
        measured.update(step=step, loss=loss)
        for layer, (t0, st) in enumerate(zip(mass.token0, mass.sink_term)):
            mass_rows.append(dict(step=step, tokens=step * tokens_per_step, layer=layer, token0=f"{t0:.6f}",
                                  sink_term=f"{st:.6f}", uniform=f"{mass.uniform:.6f}", heldout_loss=f"{loss:.5f}"))

    def save() -> None:
        if not dist.main:
            return
        files.append_rows(out / "log.csv", files.LOG_FIELDS, log_rows)
        files.append_rows(out / "attention_mass.csv", files.MASS_FIELDS, mass_rows)
        log_rows.clear()
        mass_rows.clear()
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        files.save_state(out, {"settings": dataclasses.asdict(s), "config": config.to_hf_dict(), "step": step,
                               "seconds": seconds, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "samples": samples.state_dict(), "rng": rng})
        files.save_model(out, model, s.variant)
        files.plot(out, f"{s.variant} ({config.num_layers}x{config.hidden_size})")

    if step == 0:
        measure()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # zero-sink: no stored sinks
    if dist.main and not quiet:
        print(f"{s.variant}: {params / 1e6:.2f}M parameters, {ids.numel():,} training tokens of {label}, "
              f"{held.numel():,} held out; {tokens_per_step:,} tokens per step on {dist.world} x {device}", flush=True)
    first = None
    bar = tqdm(total=s.steps, initial=step, desc=s.variant, disable=quiet or not dist.main, dynamic_ncols=True)
    began = time.perf_counter() - seconds
    budget = None if s.max_minutes is None else s.max_minutes * 60
    end = s.steps if s.stop_at is None else min(s.steps, s.stop_at)
    while step < end and (budget is None or time.perf_counter() - began < budget):
        step += 1
        lr = lr_at(s, step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = samples.next().to(device)
        with autocast():
            loss = objective(batch, sink_id is not None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = dist.mean(loss.detach())
        first = value if first is None else first
        recent[:] = (recent + [value])[-10:]
        seconds = time.perf_counter() - began
        log_rows.append(dict(step=step, tokens=step * tokens_per_step, seconds=f"{seconds:.2f}", lr=f"{lr:.3e}",
                             loss=f"{value:.5f}"))
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        if step % s.measure_every == 0 or step == s.steps:
            measure()
        if step % s.save_every == 0:
            save()
    bar.close()
    if measured["step"] != step:
        measure()
    save()
    return dict(variant=s.variant, steps=step, tokens=step * tokens_per_step, seconds=seconds, parameters=params,
                first_loss=first, last_loss=sum(recent) / len(recent) if recent else None,
                heldout_loss=measured["loss"], stopped_by_time=step < s.steps)
