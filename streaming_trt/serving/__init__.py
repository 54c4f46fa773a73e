"""Serving the eager runtime on Triton Inference Server.

- :mod:`.repo` writes a Triton model repository (Python backend, decoupled streaming,
  sequence batching) and finds/starts a ``tritonserver``;
- :mod:`.tritonserver_model` is what the repository's ``model.py`` runs inside Triton: it hands every
  request to :mod:`.scheduler`, which batches the turns of every conversation in flight over one
  pool of cache slots (continuous batching);
- :mod:`.store` keeps idle conversations, in host memory up to a byte budget and on disk (every
  one saved after each turn), with an idle TTL and a disk budget;
- :mod:`.gateway` is an OpenAI-compatible HTTP front end forwarding to Triton over gRPC.

- :mod:`.protocol` is the wire: the Triton model's tensors and name, the request / token / result
  records and the error kinds every front door and the backend share (docs/serving.md).
"""
