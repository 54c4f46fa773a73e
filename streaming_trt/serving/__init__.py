"""Serving the eager runtime on Triton Inference Server.

- :mod:`.repo` writes a Triton model repository (Python backend, decoupled streaming,
  sequence batching) and finds/starts a ``tritonserver``;
- :mod:`.backend` is what the repository's ``model.py`` runs inside Triton;
- :mod:`.store` keeps one streaming :class:`~streaming_trt.Session` per conversation, at most
  ``max_resident`` in memory, every one saved to disk after each turn;
- :mod:`.gateway` is an OpenAI-compatible HTTP front end forwarding to Triton over gRPC.

The I/O contract of the Triton model is in :data:`.repo.MODEL_NAME`'s ``config.pbtxt`` and in
docs/serving.md.
"""
