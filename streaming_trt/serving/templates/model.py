# Triton Python-backend model written by `python -m streaming_trt.cli.serve`.
# The streaming-trt package must be importable by the Python that runs Triton's backend stub.
from streaming_trt.serving.tritonserver_model import TritonPythonModel  # noqa: F401
