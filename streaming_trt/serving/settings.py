"""The serve settings (``serve.json``, written by ``python -m streaming_trt.cli.serve``) made into a
model, its conversation store and the :class:`~streaming_trt.serving.scheduler.Scheduler`: what
the Triton backend and the Dynamo worker both run."""
from __future__ import annotations

from ..contract import Geometry, UserError
from ..loading.catalog import open_model
from ..runtime.cache import device_memory
from ..runtime.recall import Recall
from ..runtime.threads import set_threads
from .scheduler import Scheduler
from .store import ConversationStore


def build_scheduler(settings: dict, log) -> Scheduler:
    """The model, its session store and the :class:`Scheduler` of the serve settings (serve.json)."""
    set_threads(settings["threads"])
    model, tokenizer = open_model(settings["model"], settings["dtype"], settings["device"], settings["backend"],
                                  seed=settings["seed"], announce=False)
    store = ConversationStore(model, Geometry(settings["sink_tokens"], settings["window"]),
                              settings["session_dir"], settings["host_memory"], settings.get("disk_budget"),
                              settings.get("idle_ttl"), log=log)
    return Scheduler(model, tokenizer, store, slots=pool_slots(settings, model),
                     token_budget=settings["token_budget"], max_queue=settings["max_queue"],
                     max_new_tokens=settings["max_new_tokens"], max_new_tokens_limit=settings["max_new_tokens_limit"],
                     capture_decode=None if settings.get("cuda_graphs", True) else False,
                     recall=Recall(**settings["recall"]) if settings.get("recall") else None)


def pool_slots(settings: dict, model) -> int:
    """``slots``, or as many conversations as ``slot_memory`` bytes hold (default: a quarter of the
    device's free memory), at most 64 and at least 1."""
    if settings.get("slots"):
        return settings["slots"]
    c = model.config
    per = Geometry(settings["sink_tokens"], settings["window"]).cache_bytes(c.num_layers, 1, c.num_kv_heads,
                                                                            c.head_dim, model.dtype)
    budget = settings.get("slot_memory") or device_memory(model.device) // 4
    if budget < per:
        raise UserError(f"slot_memory of {budget} bytes holds no conversation: one needs {per} bytes")
    return max(1, min(64, budget // per))
