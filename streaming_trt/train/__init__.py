"""Pre-training Llama-architecture models from scratch, with or without a dedicated sink token
(``python -m streaming_trt.cli.train --help``). The checkpoints it writes load everywhere the runtime's
do; see :mod:`streaming_trt.cli.train` for the variants."""
from .forward import VARIANTS, causal_attention, forward, new_model
from .loop import Settings, train

__all__ = ["VARIANTS", "Settings", "causal_attention", "forward", "new_model", "train"]
