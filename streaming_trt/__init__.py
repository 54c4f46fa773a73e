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

from .builtin import builtin_model, default_model  # noqa: E402
from .config import ModelConfig
from .errors import CheckpointError, UnsupportedModelError, UserError
from .generation import generate_text, generate_tokens
from .model import Transformer, load_model
from .sampling import SamplingParams
from .session import Session
from .tokenizer import load_tokenizer

__all__ = ["ModelConfig", "Transformer", "Session", "SamplingParams", "load_model", "load_tokenizer",
           "builtin_model", "default_model", "generate_text", "generate_tokens", "UserError", "CheckpointError", "UnsupportedModelError"]
__version__ = "0.1.0"
