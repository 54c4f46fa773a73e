"""streaming-trt: StreamingLLM (attention sinks + a rolling KV window) for NVIDIA GPUs.

>>> import streaming_trt as st
>>> model = st.load_model("path/to/hf-checkpoint", dtype="bfloat16", device="cuda")
>>> session = model.session(sink_tokens=4, window=1020)
>>> logits = session.feed([1, 2, 3])          # [1, 3, vocab]
"""
from .config import ModelConfig
from .errors import CheckpointError, UnsupportedModelError, UserError
from .model import Transformer, load_model
from .session import Session

__all__ = ["ModelConfig", "Transformer", "Session", "load_model", "UserError", "CheckpointError",
           "UnsupportedModelError"]
__version__ = "0.1.0"
