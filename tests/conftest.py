import os

import torch

# Triton kernels only run on a CPU under the interpreter, and the variable must be set before any
# module defining @triton.jit functions is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(arch, **overrides) -> (path, transformers model)``: tiny random checkpoints,
    written once per module and (architecture, overrides)."""
    from checkpoints import make_checkpoint

    made = {}

    def get(arch="llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(arch)
            made[key] = (path, make_checkpoint(path, arch, **kw))
        return made[key]

    return get
