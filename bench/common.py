"""What the benchmark scripts share: flags, model building, the methods compared, timing, output.

The methods (names used in every CSV, table and plot):

- ``streaming``: this library's StreamingLLM cache, ``sink_tokens`` sinks plus a rolling window.
- ``recompute``: sliding window with re-computation, the contract's expensive baseline, on the
  same model and kernels: for every token t a fresh session re-encodes the tokens of A(t) at
  positions 0..|A(t)|-1 in one ``feed`` call and its last logits are kept. For a one-layer model
  it computes the same function as ``streaming``; with more layers it does not (the window's
  deeper-layer keys are re-derived from the truncated context), so its perplexity is its own line.
- ``dense``: a session whose window holds the whole text (the cache grows with the text).
- ``window``: window attention, ``sink_tokens = 0`` (ranked positions, as in the contract).
- ``hf-recompute``: outside reference, transformers' own model re-encoding A(t) for every token.
- ``hf-dense``: outside reference, transformers' own model with its ordinary growing cache.

The transformers model is built from the very tensors the runtime uses (shared, not copied), and
is checked against the runtime on a short input before any figure is taken from it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import inspect
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from streaming_trt import cli
from streaming_trt.errors import UserError
from streaming_trt.model import resolve_device as runtime_device, resolve_dtype as runtime_dtype

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BUILTIN_TEXT = DATA / "builtin_text.txt"

METHODS = ("streaming", "recompute", "dense", "window", "hf-recompute", "hf-dense")
RUNTIME_METHODS = ("streaming", "recompute", "dense", "window")
SLOW_METHODS = ("recompute", "hf-recompute")  # O(C^2) per token

LABELS = {
    "streaming": "StreamingLLM (this library)",
    "recompute": "sliding window + re-computation",
    "dense": "dense attention",
    "window": "window attention (no sinks)",
    "hf-recompute": "transformers: re-encode window",
    "hf-dense": "transformers: growing cache",
}
STYLES = {  # colour, marker, line style: one look per method in every plot
    "streaming": ("#d62728", "o", "-"),
    "recompute": ("#1f77b4", "s", "-"),
    "dense": ("#7f7f7f", "^", "-"),
    "window": ("#2ca02c", "v", "-"),
    "hf-recompute": ("#0b3d66", "s", ":"),
    "hf-dense": ("#222222", "^", ":"),
}


class CheckFailed(Exception):
    """A self-check of a benchmark failed: its figures must not be trusted (exit status 1)."""


# --------------------------------------------------------------------------------------------
# Flags and the command-line wrapper
# --------------------------------------------------------------------------------------------

def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parser(name: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (default: --preset)")
    g.add_argument("--preset", default="builtin", choices=sorted(PRESETS),
                   help="model shape with seeded random weights when --model is absent: 'builtin' is the "
                        "library's small 4-layer Llama, 'llama2-7b' has Llama-2-7B's shape (latency does not "
                        "depend on the weights' values) (default: %(default)s)")
    g.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers (quick trials of a big shape)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    g.add_argument("--device", metavar="DEVICE", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="attention kernels of the runtime: auto = Triton on CUDA, PyTorch otherwise")
    g.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the random weights and inputs (default: %(default)s)")
    g.add_argument("--threads", type=int, metavar="N", default=1,
                   help="CPU threads for torch; 0 keeps torch's default (one per core). One is the default because "
                        "on a shared machine a second thread waiting on a busy core makes small steps 10-50x slower "
                        "and the figures meaningless (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help=f"output folder (default: runs/{name}/)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} takes positive integers, got {text!r}")
    return values


def method_list(text: str, allowed: Sequence[str] = METHODS) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in allowed]
    if unknown or not names:
        raise UserError(f"--methods: unknown method {', '.join(unknown) or repr(text)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def run_main(job: Callable[[], int]) -> int:
    """Bad input: one line and exit 2 (as the library's CLIs); a failed self-check: one line and
    exit 1; never a traceback for either."""
    def checked() -> int:
        try:
            return job()
        except CheckFailed as e:
            info(f"FAILED: {e}")
            return 1

    return cli.run(checked)


def script_main(arguments: Callable, run: Callable, argv: Sequence[str] | None = None) -> int:
    """A script's ``main``: parse ``argv`` with ``arguments``, then ``run(args, argv)``; exit
    statuses as :func:`run_main`."""
    def job() -> int:
        run(arguments(argv), argv)
        return 0

    return run_main(job)


def resolve_device(name: str) -> torch.device:
    """The runtime's device lookup (``auto`` = CUDA when available), limited to what the
    benchmarks run on: the CPU, or a CUDA GPU that is present."""
    device = runtime_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The runtime's dtype lookup, plus ``auto``: bfloat16 on CUDA, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return runtime_dtype(name)


def out_dir(args, name: str) -> Path:
    path = Path(args.out) if args.out else ROOT / "runs" / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create the folder ({e.strerror})") from None
    return path


def progress(total: int | None, desc: str, disable: bool = False, unit: str = "tok"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1)


# --------------------------------------------------------------------------------------------
# Models: presets with random weights, or a checkpoint; transformers' twin on the same tensors
# --------------------------------------------------------------------------------------------

def _llama2_7b():
    from streaming_trt.config import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def _builtin():
    from streaming_trt.builtin import builtin_config

    return builtin_config()


PRESETS: dict[str, Callable] = {"builtin": _builtin, "llama2-7b": _llama2_7b}


@dataclasses.dataclass
class Built:
    """A runtime model, the tensors it was built from, and how it was made."""

    model: "object"  # streaming_trt.Transformer
    config: "object"  # streaming_trt.ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: "object"
    device: torch.device
    dtype: torch.dtype
    source: str  # what the model is, in words
    random_weights: bool
    _hf: "object" = None

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def weight_bytes_read_per_token(self) -> int:
        """Bytes of weights one decode step must read: all but the embedding table (one row of
        it), unless the table doubles as the output head."""
        total = 0
        for name, t in self.tensors.items():
            if name.endswith("embed_tokens.weight") and not self.config.tie_word_embeddings:
                total += t.shape[-1] * t.element_size()
            else:
                total += t.nbytes
        return total

    def hf(self, strict: bool = True):
        """transformers' own model on the same tensors, checked against the runtime once. With
        ``strict=False`` (timing only: values do not matter) a mismatch is a warning."""
        if self._hf is None:
            self._hf = build_hf_model(self, strict)
        return self._hf


def build(args, need_tokenizer: bool = True) -> Built:
    """The model the flags name: --model DIR, or --preset with seeded random weights."""
    from streaming_trt.model import Transformer
    from streaming_trt.tokenizer import load_tokenizer

    positive("--layers", args.layers)
    positive("--threads", args.threads, 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        from streaming_trt.checkpoint import load_checkpoint

        config, tensors = load_checkpoint(args.model)
        config, tensors = _keep_layers(config, tensors, args.layers)
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
        source, random_weights = f"checkpoint {args.model}", False
        tokenizer = load_tokenizer(args.model) if need_tokenizer else None
    else:
        config = PRESETS[args.preset]()
        if args.layers:
            config = dataclasses.replace(config, num_layers=min(args.layers, config.num_layers))
        _check_fits(config, dtype, device)
        from streaming_trt.builtin import builtin_state_dict

        if args.preset == "builtin":  # the very weights of the runtime's built-in model
            tensors = {k: v.to(device=device, dtype=dtype) for k, v in builtin_state_dict(config, args.seed).items()}
        else:  # made on the device in the dtype: a 7B shape never passes through host memory
            tensors = builtin_state_dict(config, args.seed, dtype, device)
        layers = f"{config.num_layers} layer{'s' if config.num_layers != 1 else ''}"
        source, random_weights = f"preset {args.preset} ({layers}, random weights, seed {args.seed})", True
        tokenizer = load_tokenizer(None)
    model = Transformer.from_state_dict(config, tensors, dtype=dtype, device=device, backend=args.backend,
                                        source=source)
    return Built(model, config, tensors, tokenizer, device, dtype, source, random_weights)


def _keep_layers(config, tensors, layers):
    if not layers or layers >= config.num_layers:
        return config, tensors
    keep = {k: v for k, v in tensors.items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers}
    return dataclasses.replace(config, num_layers=layers), keep


def _check_fits(config, dtype: torch.dtype, device: torch.device) -> None:
    from streaming_trt.checkpoint import expected_shapes

    elements = sum(math.prod(s) for s in expected_shapes(config).values())
    need = elements * torch.empty(0, dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have, where = free, f"{device} has {free / 2**30:.1f} GiB free"
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        where = f"this machine has {have / 2**30:.1f} GiB of free memory"
    if need > 0.9 * have:
        raise UserError(f"the weights alone need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} and "
                        f"{where}; use --device cuda, a smaller --dtype, or --layers N")


def build_hf_model(built: Built, strict: bool = True):
    """transformers' model class for the config, its parameters replaced by the runtime's tensors."""
    import transformers

    cfg = built.config
    hf_config = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    with torch.device(built.device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=built.dtype)
    names = dict(hf.named_parameters())
    tensors = {k: v for k, v in built.tensors.items() if k in names}
    missing = [k for k in names if k not in tensors and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckFailed(f"transformers' model needs tensors the runtime does not have: {missing[:3]}")
    hf.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.eval().requires_grad_(False)
    # Same function on a short input (no eviction: window holds it), or no figure is taken from it.
    n = min(24, cfg.max_position_embeddings)
    ids = torch.randint(0, min(cfg.vocab_size, 100), (1, n), generator=torch.Generator().manual_seed(1)).to(built.device)
    with torch.inference_mode():
        ref = hf(ids).logits.float()
    got = built.model.session(sink_tokens=0, window=n).feed(ids)
    try:
        assert_close(got, ref, tolerance(built.dtype), "transformers' model against the runtime (dense, 24 tokens)")
    except CheckFailed as e:
        if strict:
            raise
        warnings.warn(f"{e}; its timings are still taken")
    return hf


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance on logits for 'the same function' at this precision."""
    return 1e-4 if dtype == torch.float32 else 6e-2


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> float:
    err = max_rel_error(a, b)
    if not err <= tol:
        raise CheckFailed(f"{what}: logits differ by {err:.3g} (relative to the largest logit) > tolerance {tol:g}")
    return err


# --------------------------------------------------------------------------------------------
# The methods as streams: feed token ids, get the logits of each one
# --------------------------------------------------------------------------------------------

class Stream:
    """One stream of one method. ``feed(ids [n]) -> float32 logits [n, vocab]``."""

    name = "?"

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        """Bytes of key/value state the method holds between tokens."""
        return 0


class RuntimeStream(Stream):
    """streaming / window / dense: one session of the runtime; chunks are fed as they come."""

    def __init__(self, name: str, model, sink_tokens: int, window: int, max_chunk: int = 512):
        self.name = name
        with warnings.catch_warnings():
            # dense windows may exceed max_position_embeddings: that is what the baseline measures
            warnings.filterwarnings("ignore", message="capacity sink_tokens")
            self.session = model.session(sink_tokens=sink_tokens, window=window, max_chunk=max_chunk)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.session.feed(ids.view(1, -1))[0]

    def cache_bytes(self) -> int:
        return self.session.cache.nbytes()

    def fill_random(self, seen: int, seed: int = 0) -> None:
        """Put the cache in the state it has after ``seen`` tokens, with random keys/values
        (attention time does not depend on their values); instant where feeding takes minutes."""
        cache = self.session.cache
        g = torch.Generator(device=cache.keys.device).manual_seed(seed)
        for t in (cache.keys, cache.values):
            t.normal_(generator=g)
        cache.seen.fill_(seen)


class RecomputeStream(Stream):
    """Sliding window with re-computation on the runtime: per token, a fresh session re-encodes
    A(t) (positions 0..|A(t)|-1 as the stream starts afresh) in one ``feed`` call."""

    name = "recompute"

    def __init__(self, model, sink_tokens: int, window: int, max_chunk: int = 512):
        self.sink_tokens, self.window = sink_tokens, window
        self.session = model.session(sink_tokens=sink_tokens, window=window, max_chunk=max_chunk)
        self.device = model.device
        self.sinks: list[int] = []
        self.recent: deque[int] = deque(maxlen=window)

    def push(self, token: int) -> list[int]:
        """Record token t of the stream; return A(t)'s token ids."""
        if len(self.sinks) < self.sink_tokens:
            self.sinks.append(token)
        else:
            self.recent.append(token)
        return self.sinks + list(self.recent)

    def encode(self, ids: list[int]) -> torch.Tensor:
        """Logits of the last token of ``ids`` encoded from scratch."""
        self.session.reset()
        return self.session.feed(torch.tensor(ids, device=self.device).view(1, -1))[0, -1]

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.encode(self.push(int(t))) for t in ids.tolist()])

    def cache_bytes(self) -> int:
        return self.session.cache.nbytes()


class HFRecomputeStream(RecomputeStream):
    """transformers' model re-encoding A(t) from scratch for every token (no cache kept)."""

    name = "hf-recompute"

    def __init__(self, hf_model, sink_tokens: int, window: int, device: torch.device):
        self.hf, self.device = hf_model, device
        self.sink_tokens, self.window = sink_tokens, window
        self.sinks, self.recent = [], deque(maxlen=window)

    @torch.inference_mode()
    def encode(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, device=self.device).view(1, -1)
        return self.hf(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    def cache_bytes(self) -> int:
        return 0


class HFDenseStream(Stream):
    """transformers' model with its ordinary growing cache (DynamicCache)."""

    name = "hf-dense"

    def __init__(self, hf_model, device: torch.device, max_chunk: int = 512):
        from transformers import DynamicCache

        self.hf, self.device, self.max_chunk = hf_model, device, max_chunk
        self.cache = DynamicCache(config=hf_model.config)
        # transformers >= 5.2x calls it ``cache``; older versions ``past_key_values``
        params = inspect.signature(type(hf_model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor, keep_logits: bool = True) -> torch.Tensor | None:
        out = []
        ids = ids.to(self.device).view(1, -1)
        for lo in range(0, ids.shape[1], self.max_chunk):
            r = self.hf(input_ids=ids[:, lo : lo + self.max_chunk], use_cache=True,
                        logits_to_keep=0 if keep_logits else 1, **{self.cache_kw: self.cache})
            out.append(r.logits[0].float())
        return torch.cat(out) if keep_logits else None

    def cache_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total


def cache_shape(method: str, capacity: int, sink_tokens: int) -> tuple[int, int]:
    """(sink_tokens, window) of a method whose cache holds ``capacity`` tokens."""
    if method == "window":
        return 0, capacity
    if capacity <= sink_tokens:
        raise UserError(f"a cache of {capacity} tokens cannot hold {sink_tokens} sink tokens plus a window")
    return sink_tokens, capacity - sink_tokens


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds ``fn`` takes (GPU work included) and, on CUDA, the most memory it allocated on top
    of what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return seconds, extra


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-memory copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type == "cuda":
        nbytes = 1 << 30
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        seconds, _ = timed(lambda: b.copy_(a), device)
        best = min(best, seconds)
    del a, b
    return 2 * nbytes / best


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def load_text_ids(path: str | None, tokenizer, tokens: int, min_tokens: int = 2) -> tuple[torch.Tensor, str]:
    """The first ``tokens`` token ids of the text file (the built-in text when None), cycling the
    text if it is shorter."""
    file = Path(path) if path else BUILTIN_TEXT
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--text {file}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise UserError(f"--text {file}: the file is empty")
    ids: list[int] = []
    # tokenize piece by piece: a few hundred KB at a time is plenty and keeps big files cheap
    step = max(4 * tokens, 1 << 16)
    for lo in range(0, len(text), step):
        ids.extend(tokenizer.encode(text[lo : lo + step], add_special_tokens=False))
        if len(ids) >= tokens:
            break
    if len(ids) < min_tokens:
        raise UserError(f"--text {file}: only {len(ids)} tokens; at least {min_tokens} are needed")
    name = "built-in text (bench/data/builtin_text.txt)" if path is None else str(file)
    if len(ids) < tokens:
        reps = -(-tokens // len(ids))
        ids = (ids * reps)[:tokens]
        name += f" (repeated {reps}x to reach {tokens} tokens)"
    return torch.tensor(ids[:tokens], dtype=torch.int64), name


# --------------------------------------------------------------------------------------------
# Reports: machine, command, CSV, markdown, plots
# --------------------------------------------------------------------------------------------

def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def command(name: str, argv: Sequence[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", f"bench.{name}", *map(shlex.quote, argv)])


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_csv(path: Path, rows: Iterable[dict], fields: Sequence[str] | None = None) -> None:
    rows = list(rows)
    fields = list(fields or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Path, title: str, cmd: str, built: Built, body: str) -> str:
    text = (f"### {title}\n\n`{cmd}`\n\n- machine: {machine(built.device)}\n- date: {today()}\n"
            f"- model: {built.source}, {str(built.dtype).removeprefix('torch.')}, backend {built.model.backend}\n\n{body}\n")
    path.write_text(text)
    return text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8, "legend.frameon": False})
    return plt


def log2_axis(ax, ticks: Sequence[int]) -> None:
    """Log x axis with exactly these tick labels."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def style(method: str) -> dict:
    color, marker, ls = STYLES.get(method, ("black", ".", "-"))
    return dict(color=color, marker=marker, linestyle=ls, label=LABELS.get(method, method))


def footer(built: Built, prefix: str = "") -> str:
    """The small print under every figure: what model, dtype, machine and date made it."""
    return f"{prefix}{built.source}, {str(built.dtype).removeprefix('torch.')}, {machine(built.device)}, {today()}"


def save_figure(fig, path: Path, footer: str) -> None:
    import textwrap

    width, height = fig.get_size_inches()
    lines = textwrap.wrap(footer, width=int(width * 19))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6.5, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, min(0.3, (0.05 + 0.13 * len(lines)) / height), 1, 1))
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def ms(seconds: float) -> str:
    if seconds != seconds:
        return "-"
    v = seconds * 1e3
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
