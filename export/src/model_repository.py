"""The one writer of Triton Inference Server model repositories (``streaming_trt.cli.serve``'s eager
model, the TensorRT-LLM ensemble, the ONNX stateful models): every ``config.pbtxt`` is parsed back
into Triton's ``ModelConfig`` and must name its own directory before any file is written."""
from __future__ import annotations

import os
from pathlib import Path

from streaming_trt.contract import UserError


def parse_model_config(text: str, source: str = "config.pbtxt"):
    """Parse config.pbtxt text into Triton's ``ModelConfig`` protobuf; UserError if it does not parse."""
    try:
        from google.protobuf import text_format  # the [export] / [serve] extras, optional
        from tritonclient.grpc import model_config_pb2  # the [export] / [serve] extras, optional
    except ImportError as e:
        raise UserError(f"checking {source} needs tritonclient[grpc] and protobuf ({e}); "
                        "pip install 'streaming-trt[export]'") from None
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise UserError(f"{source}: not a valid Triton model config ({e})") from None
    return message


def write_model_repository(root: str | Path, files: dict[str, str], versions: dict[str, int] | None = None,
                           private: set[str] = frozenset()) -> Path:
    """Write ``files`` (path relative to ``root`` -> text) and return ``root``; those in ``private``
    are created anew with mode 0600 (never readable by others, not even for a moment).

    Each model directory gets its version folder (``versions[model]``, default 1) even when no file
    goes there (Triton needs one). Configs are checked first, so a bad one leaves nothing written.
    """
    root = Path(root)
    for rel, text in files.items():
        if rel.endswith("config.pbtxt"):
            message = parse_model_config(text, rel)
            if message.name != Path(rel).parent.name:
                raise UserError(f"{rel}: model name {message.name!r} does not match its directory")
    models = {Path(rel).parent for rel in files if rel.endswith("config.pbtxt")}
    try:
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel in private:
                path.unlink(missing_ok=True)
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                    f.write(text)
            else:
                path.write_text(text)
        for model in models:
            (root / model / str((versions or {}).get(model.name, 1))).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the model repository in {root} ({e})") from None
    return root
