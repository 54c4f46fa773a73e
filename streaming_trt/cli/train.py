"""``python -m streaming_trt.cli.train``: pre-train (or continue) a Llama-architecture model from scratch.

Variants (section 3.3 of the StreamingLLM paper, and gpt-oss):
  vanilla       plain softmax attention;
  sink-token    a learnable token (<|sink|>) prepended to every training sample; its id is
                recorded in config.json (sink_token_id) and the runtime puts it at the start of
                every stream, once;
  zero-sink     softmax-off-by-one: exp(0) added to every softmax denominator;
  sink-logits   one learned logit per head and layer in every denominator (self_attn.sinks).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..contract import UserError
from ..train.forward import VARIANTS
from ..train.loop import Settings, train
from . import common

PRESETS = {
    # the CPU demonstration (bench/RESULTS.md): 3.7M parameters, 2048 tokens a step; 140 steps took
    # ~12 minutes on a shared CPU (a third of a core)
    "cpu-small": dict(layers=4, hidden=256, heads=4, kv_heads=4, intermediate=688, context=256, vocab_size=2048,
                      batch=8, steps=140, lr=2e-3, min_lr=2e-4, warmup=25, measure_every=10, save_every=50),
    # one H200 for an hour: ~61M parameters, 64 x 1024 tokens a step (Gu et al. saw sinks emerge in a
    # 60M LLaMA after 1-2B tokens; a larger corpus than Austen's 1M tokens is advised, --text FILE)
    "h200-60m": dict(layers=10, hidden=640, heads=10, kv_heads=10, intermediate=2048, context=1024,
                     vocab_size=8192, batch=64, steps=30000, lr=6e-4, min_lr=6e-5, warmup=500, device="cuda",
                     measure_every=250, save_every=1000, max_minutes=60.0),
    # unit tests: seconds on a CPU
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, context=32, vocab_size=300,
                 batch=4, steps=50, lr=3e-3, min_lr=3e-4, warmup=5, measure_every=10, save_every=25),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streaming_trt.cli.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: nice -n 10 python -m streaming_trt.cli.train --variant sink-token "
                                       "--preset cpu-small --threads 1 --max-minutes 12 --out runs/sink-token")
    d = Settings()
    p.add_argument("--variant", choices=VARIANTS, default=None, help=f"default: {d.variant}")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size and schedule; flags given override it")
    p.add_argument("--text", help=f"training text: a UTF-8 file or austen:BOOK / austen:all (default: {d.text})")
    p.add_argument("--out", help="run folder: the checkpoint, state, logs and plots (default: runs/VARIANT)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it was saved")
    p.add_argument("--init", metavar="DIR", help="continue training a Hugging Face Llama checkpoint (its tokenizer too)")
    for name, kind, what in (
        ("layers", int, "decoder layers"), ("hidden", int, "hidden size"), ("heads", int, "attention heads"),
        ("kv-heads", int, "key/value heads"), ("intermediate", int, "MLP width"),
        ("context", int, "tokens per training sample (a sink-token sample: the sink and context-1 text tokens)"),
        ("vocab-size", int, "BPE vocabulary learnt from the training text"), ("batch", int, "samples per step (per GPU)"),
        ("steps", int, "optimizer steps (the cosine schedule's length)"), ("lr", float, "peak learning rate"),
        ("min-lr", float, "final learning rate"), ("warmup", int, "warm-up steps"),
        ("weight-decay", float, "AdamW weight decay (matrices only)"), ("clip", float, "gradient-norm clip"),
        ("seed", int, "seed of the weights and the data order"), ("heldout", float, "share of the text held out"),
        ("device", str, "cpu, or cuda (bf16 autocast; several GPUs through torchrun)"),
        ("threads", int, "CPU threads for PyTorch"), ("save-every", int, "steps between checkpoints"),
        ("measure-every", int, "steps between held-out loss and attention-mass measurements"),
        ("measure-samples", int, "held-out samples each measurement reads"),
        ("max-minutes", float, "stop (and save) after this much training time"),
        ("stop-at", int, "stop (and save) after this step, keeping the schedule of --steps"),
    ):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: {getattr(d, name.replace('-', '_'))})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.preset:
        s = dataclasses.replace(s, **PRESETS[args.preset])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
             if getattr(args, f.name, None) is not None}
    s = dataclasses.replace(s, **given)
    if args.out is None:
        s = dataclasses.replace(s, out=f"runs/{s.variant}")
    return s


def check(s: Settings) -> None:
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "context", "batch", "steps",
                 "save_every", "measure_every", "measure_samples"):
        if getattr(s, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.context < 4:
        raise UserError(f"--context must be at least 4, got {s.context}")
    if s.lr <= 0 or s.min_lr < 0 or s.warmup < 0:
        raise UserError("--lr must be > 0, --min-lr and --warmup >= 0")
    if s.threads is not None and s.threads < 1:
        raise UserError(f"--threads must be >= 1, got {s.threads}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> int:
        s = settings_from(args)
        check(s)
        summary = train(s, resume=args.resume, quiet=args.quiet)
        if os.environ.get("RANK", "0") == "0":  # one summary per torchrun job
            print(json.dumps(summary))
        return 0

    return common.run(job)


if __name__ == "__main__":
    sys.exit(main())
