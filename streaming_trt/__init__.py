"""streaming-trt: StreamingLLM (attention sinks + a rolling KV window) for NVIDIA GPUs.

>>> import streaming_trt as st
>>> model = st.load_model("path/to/hf-checkpoint", dtype="bfloat16", device="cuda")
>>> session = model.session(sink_tokens=4, window=1020)
>>> logits = session.feed([1, 2, 3])          # [1, 3, vocab]
>>> tokenizer = st.load_tokenizer("path/to/hf-checkpoint")
>>> for piece in st.generate_text(session, tokenizer, "Once upon a time", max_new_tokens=100):
...     print(piece, end="")
"""
import os as _os

# OpenMP threads that spin while waiting stall each other when another process wants a core (on 2
# cores, decoding fell from 14 to 0.4 tok/s); sleeping waiters only slow down. Read by libgomp when
# torch loads, hence before the first torch import; an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _mkl_code_path() -> None:
    """On AMD CPUs MKL's default dispatch runs small-batch float32 products on a slow path; its
    AVX2 path (``MKL_CBWR=AVX2``) ran SmolLM2's 16-row decode step's products about 30% faster on
    a 2-core AMD EPYC (README, Threads). Read by MKL at its first call; an explicit setting wins."""
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read(8192).split("\n\n")[0]
    except OSError:  # not Linux
        return
    flags = next((line.split(":", 1)[1].split() for line in first_cpu.splitlines() if line.startswith("flags")), [])
    if "AuthenticAMD" in first_cpu and "avx2" in flags:
        _os.environ.setdefault("MKL_CBWR", "AVX2")


_mkl_code_path()


def _check_installed() -> None:
    """Before set-up (a fresh clone), say what to run instead of an ImportError traceback."""
    import importlib.util
    import sys

    needed = ("torch", "safetensors", "numpy", "tokenizers", "transformers", "tqdm")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = (f"streaming-trt needs {', '.join(missing)}, not installed for {sys.executable}: "
               "run `bash scripts/setup.sh` first (it installs them and this package)")
    if sys.argv[:1] == ["-m"]:  # `python -m streaming_trt.<command>` is importing us: one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message)


_check_installed()

# Public names, resolved on first use (PEP 562): ``streaming_trt.kernels`` and
# ``streaming_trt.contract`` live inside this package, so Python runs this file before either;
# importing the runtime here would make every kernel import drag in the model, the session and
# the tokenizers (tests/test_layers.py checks that it does not).
_PUBLIC = {
    "ModelConfig": "runtime.config", "Transformer": "runtime.model", "load_model": "loading.load",
    "Session": "runtime.session", "SamplingParams": "runtime.sampling", "load_tokenizer": "loading.tokenizer",
    "builtin_model": "loading.builtin", "default_model": "loading.builtin", "generate_text": "runtime.generation",
    "generate_tokens": "runtime.generation", "UserError": "contract", "CheckpointError": "contract",
    "UnsupportedModelError": "contract", "Geometry": "contract", "Recall": "runtime.recall",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    import importlib

    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
