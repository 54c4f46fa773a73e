"""The engine: a conversation's state as one value (:class:`StreamState`) and the batch runner that
owns every tensor of serving (:class:`BatchRunner`). Above the runtime, below the front doors."""
from .runner import BatchRunner, Draw
from .state import StreamState

__all__ = ["BatchRunner", "Draw", "StreamState"]
