import os

import torch

# Triton kernels only run on a CPU under the interpreter, and the variable must be set before any
# module defining @triton.jit functions is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
