"""Decode cost of transformers models streaming through :mod:`streaming_trt.hf`, against the native runtime.

``python -m bench.hf_cost [--backend auto|torch|triton] [--device cuda]``: greedy decoding, per token,
after the cache is full, each architecture timed alternately with the native runtime's Llama of the
same shape (random weights); prints a markdown table (README.md quotes it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import transformers
from tqdm import tqdm

import streaming_trt as st
import streaming_trt.hf as sthf
from streaming_trt.contract import Geometry, UserError

ARCHS = ("llama", "gpt_neox", "phi3", "qwen3", "gemma2", "falcon", "mpt")


def bench_config(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """A transformers config of ``arch`` at the given shape (random weights are drawn from it)."""
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden if arch == "gpt_neox" else
              (8 * hidden) // 3, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=4096)
    if arch == "gpt_neox":  # Pythia: partial rotary 0.25, parallel residual, MHA
        return transformers.GPTNeoXConfig(partial_rotary_factor=0.25, use_parallel_residual=True, **kw)
    if arch == "falcon":  # Falcon-7B's layout: multi-query, parallel attention
        return transformers.FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               multi_query=True, parallel_attn=True, bias=False)
    if arch == "mpt":  # MPT-7B's layout: ALiBi, MHA
        return transformers.MptConfig(vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=heads, max_seq_len=4096)
    kw.update(num_key_value_heads=kv_heads)
    if arch == "llama":
        return transformers.LlamaConfig(**kw)
    if arch == "phi3":
        return transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=hidden // heads, **kw)
    if arch == "gemma2":
        return transformers.Gemma2Config(head_dim=hidden // heads, pad_token_id=0, **kw)
    raise UserError(f"--archs: unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def main(argv=None) -> int:
    """``python -m bench.hf_cost``: decode cost through streaming_trt.hf vs the native runtime."""
    p = argparse.ArgumentParser(
        prog="python -m bench.hf_cost",
        description="Time greedy decoding, per token, after the cache is full: the native runtime (Llama) "
                    "against transformers models streaming through streaming_trt.hf, all with random weights of "
                    "the same shape. Prints a markdown table.")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated transformers architectures "
                   f"to run through streaming_trt.hf (default: {','.join(ARCHS)})")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default 768: Pythia-160M)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    p.add_argument("--kv-heads", type=int, default=12, help="key/value heads where the architecture has GQA")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary size (default 50304)")
    p.add_argument("--sink-tokens", type=int, default=4, help="attention sinks S (default 4)")
    p.add_argument("--window", type=int, default=508, help="window W, current token included (default 508)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed after the cache is full (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="attention kernels of both paths: auto = the Triton kernels on CUDA, PyTorch otherwise")
    args = p.parse_args(argv)
    try:
        archs = [a for a in args.archs.split(",") if a]
        for a in archs:
            if a not in ARCHS:
                raise UserError(f"--archs: unknown architecture {a!r}; choose from {', '.join(ARCHS)}")
        geometry = Geometry(args.sink_tokens, args.window)
        if args.tokens < 1 or args.hidden % args.heads or args.heads % max(1, args.kv_heads):
            raise UserError("--tokens must be >= 1, --hidden a multiple of --heads, --heads of --kv-heads")
        if args.threads:
            torch.set_num_threads(args.threads)
        cap = geometry.capacity
        prompt = torch.randint(3, args.vocab, (1, cap), generator=torch.Generator().manual_seed(0)).tolist()[0]
        rows = []

        def interleaved(step, ref):
            """Median ms of ``step`` and of the native ``ref`` step, taken alternately so that both see the
            same load from other jobs sharing the machine."""
            for _ in range(3):
                step(), ref()
            a, b = [], []
            for _ in tqdm(range(args.tokens), leave=False, file=sys.stderr):
                for fn, out in ((step, a), (ref, b)):
                    t0 = time.perf_counter()
                    fn()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    out.append(time.perf_counter() - t0)
            med = lambda x: 1000 * sorted(x)[len(x) // 2]  # noqa: E731
            return med(a), med(b)

        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(bench_config("llama", args.hidden, args.layers, args.heads,
                                                               args.kv_heads, args.vocab), dtype=torch.float32)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            native = st.load_model(d, device=args.device, backend=args.backend)
        del hf
        session = native.session(sink_tokens=args.sink_tokens, window=args.window)
        session.feed(prompt, all_logits=False)
        native_step = lambda: session.feed([7], all_logits=False)  # noqa: E731
        for arch in tqdm(archs, desc="models", file=sys.stderr):
            torch.manual_seed(0)
            cfg = bench_config(arch, args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().to(args.device)
            sthf.enable_streaming(hf, args.sink_tokens, args.window, backend=args.backend)
            cache = sthf.HFStreamingCache(hf)
            with torch.inference_mode():
                hf(torch.tensor([prompt], device=args.device), cache=cache, logits_to_keep=1)
                tok = torch.tensor([[7]], device=args.device)
                ms, ref = interleaved(lambda: hf(tok, cache=cache, logits_to_keep=1), native_step)
            rows.append((arch, ms, ref))
        print(f"decode after {cap} tokens (S={args.sink_tokens}, W={args.window}), hidden {args.hidden}, "
              f"{args.layers} layers, {args.heads} heads, vocab {args.vocab}, {args.device}, backend {args.backend}, "
              f"{torch.get_num_threads()} threads, transformers {transformers.__version__}; median step, each "
              f"architecture timed alternately with the native runtime's Llama of the same shape")
        print("| architecture | streaming_trt.hf ms / token | native Llama ms / token (same run) | ratio |\n"
              "| --- | --- | --- | --- |")
        for arch, ms, ref in rows:
            print(f"| {arch} | {ms:.1f} | {ref:.1f} | {ms / ref:.2f}x |")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
