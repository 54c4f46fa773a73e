"""Serve the eager runtime on Triton Inference Server: ``python -m streaming_trt.cli.serve``.

Writes a Triton model repository (Python backend, decoupled token streaming, sequence batching:
one conversation = one streaming session keyed by the sequence correlation id), starts the
``tritonserver`` it finds, waits until it is ready, prints the endpoints and stops cleanly on
Ctrl-C / SIGTERM. ``--openai-port`` adds an OpenAI-compatible HTTP endpoint in front of it;
``--write-repo DIR`` only writes the repository (for NGC containers). See docs/serving.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from ..contract import Geometry, UserError
from . import common
from .common import recall_from_flags


def build_parser():

    p = common.parser(
        "streaming_trt.cli.serve",
        "Serve streaming chat on Triton Inference Server (gRPC streaming + HTTP), optionally with an "
        "OpenAI-compatible /v1/chat/completions endpoint. Every conversation is one endless StreamingLLM "
        "session; each turn feeds only its new tokens; sessions are saved to --session-dir after every "
        "turn and survive restarts.",
    )
    for action in p._actions:  # the sampling flags give per-request defaults here
        if action.dest == "max_new_tokens":
            action.help = "default reply length when a request does not say (MAX_TOKENS / max_tokens)"
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1",
                   help="address the OpenAI endpoint binds (loopback by default); tritonserver itself stays on "
                        "loopback unless --grpc-host says otherwise")
    g.add_argument("--grpc-host", default="127.0.0.1",
                   help="address Triton's gRPC endpoint (streaming chat, streaming_trt.serving.client) binds; loopback by "
                        "default, so only the gateway and local clients reach it")
    g.add_argument("--http-port", type=int, default=0,
                   help="Triton HTTP port (health, metadata), always on loopback; 0 (default): off")
    g.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (streaming chat)")
    g.add_argument("--openai-port", type=int, default=0, help="port of the OpenAI-compatible gateway (0: off)")
    g.add_argument("--served-model-name", default="streaming-trt", help="the model id the OpenAI endpoint lists")
    g.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names the OpenAI endpoint answers besides 127.0.0.1, localhost and "
                        "::1 (the name clients use when --host is not loopback; * for any): other names are "
                        "refused, so a web page cannot reach it by DNS rebinding")
    g.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                   help="comma-separated browser Origins allowed to call the OpenAI endpoint (default: none, so "
                        "no web page can post to it; * for any)")
    g.add_argument("--session-dir", default="sessions", help="where conversations are saved after every turn")
    common.add_recall_flags(p)
    g = p.add_argument_group("batching and capacity (docs/serving.md: capacity planning)")
    g.add_argument("--slots", type=int, default=None,
                   help="conversations whose turns run at once in one batched step (one cache of S + W slots "
                        "each, allocated at start); default: as many as --slot-memory holds, at most 64")
    g.add_argument("--slot-memory", type=parse_bytes, default=None, metavar="SIZE",
                   help="bytes of cache for the slots, e.g. 2GiB (default: a quarter of the free device memory)")
    g.add_argument("--token-budget", type=int, default=None,
                   help="tokens one batched step feeds, decode and prompt together; what is left after every "
                        "decoding slot's token goes to prompt chunks (default: 512 on CUDA, 1024 on a CPU, where prompts "
                        "that arrive together are best fed in one step: docs/serving.md)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="turns that may wait for a slot; beyond, requests are refused at once (server busy)")
    g.add_argument("--host-memory", type=parse_bytes, default=parse_bytes("4GiB"), metavar="SIZE",
                   help="idle conversations kept in host memory, by bytes; the least recently used wait on disk")
    g.add_argument("--disk-budget", type=budget, default="auto", metavar="SIZE",
                   help="bytes of session files; beyond, the least recently used conversations are deleted "
                        "(auto: half the space free on --session-dir's disk at start; unlimited: no bound)")
    g.add_argument("--idle-ttl", type=ttl, default=IDLE_TTL, metavar="SECONDS",
                   help="delete a conversation this long after its last turn (default: 30 days; never: keep)")
    g.add_argument("--max-tokens-limit", type=int, default=4096, help="largest reply length a request may ask for")
    g.add_argument("--max-input-bytes", type=int, default=256 * 1024, help="largest message list a request may send")
    g.add_argument("--max-sequences", type=int, default=4096,
                   help="conversations Triton holds a sequence slot for at once (its max_candidate_sequences)")
    g.add_argument("--sequence-idle-seconds", type=float, default=60.0,
                   help="Triton releases the sequence slot of a conversation idle this long; its next turn "
                        "resumes it from --session-dir (clients do this by themselves)")
    g.add_argument("--api-key", default=os.environ.get("STREAMING_TRT_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' by the OpenAI gateway and by Triton's gRPC and "
                        "HTTP endpoints (all but health); needed when --host is beyond loopback "
                        "(default: $STREAMING_TRT_API_KEY)")
    g.add_argument("--openai-max-conversations", type=int, default=4096,
                   help="conversations the OpenAI gateway remembers for prefix reuse; the least recently used "
                        "are ended on the server")
    g.add_argument("--gateway-state-dir", metavar="DIR",
                   help="a local directory for this replica's OpenAI conversation map (SQLite: never on the shared "
                        "--session-dir; default: $XDG_STATE_HOME/streaming-trt/gateway-PORT-HASH)")
    g.add_argument("--openai-conversation-ttl", type=float, default=24 * 3600.0,
                   help="seconds after which an OpenAI conversation nobody continued is ended on the server")
    g.add_argument("--tritonserver", metavar="PATH", help="tritonserver binary (default: nvidia-pytriton's, or PATH)")
    g.add_argument("--repo-dir", metavar="DIR", help="where to write the model repository (default: a temporary directory)")
    g.add_argument("--write-repo", metavar="DIR", help="only write the model repository to DIR and exit")
    g.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    g = p.add_argument_group("NVIDIA Dynamo worker (docs/serving.md: more than one machine)")
    g.add_argument("--dynamo", action="store_true",
                   help="serve as a worker behind 'python -m dynamo.frontend' instead of starting tritonserver: "
                        "a token-input Chat and Completions model named --served-model-name, one conversation per "
                        "X-Dynamo-Session-ID, sessions in --session-dir (pip install 'streaming-trt[dynamo]')")
    g.add_argument("--discovery-backend", choices=("etcd", "file", "kubernetes", "mem"),
                   default=os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                   help="how the worker and the frontend find each other (sets DYN_DISCOVERY_BACKEND; default: "
                        "$DYN_DISCOVERY_BACKEND or etcd); 'file' needs no etcd, on one host")
    g.add_argument("--file-kv", metavar="DIR", default=os.environ.get("DYN_FILE_KV"),
                   help="with --discovery-backend file: the directory the frontend and workers share "
                        "(sets DYN_FILE_KV; default: $DYN_FILE_KV, else Dynamo's own default)")
    g.add_argument("--dynamo-host", default=os.environ.get("DYN_TCP_RPC_HOST", "127.0.0.1"), metavar="ADDR",
                   help="address the worker's request plane binds and advertises (sets DYN_TCP_RPC_HOST; default: "
                        "$DYN_TCP_RPC_HOST or loopback, so only a frontend on this host reaches it)")
    g.add_argument("--dynamo-namespace", default="streaming_trt", metavar="NAME",
                   help="the Dynamo namespace of the worker's endpoint NAME.worker.generate")
    g.add_argument("--session-affinity-ttl", type=int, default=600, metavar="SECONDS",
                   help="the session-affinity idle TTL in the RouterConfig this worker registers; affinity itself "
                        "is switched on by the frontend's --router-session-affinity-ttl-secs (docs/serving.md)")
    return p


UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


IDLE_TTL = 30 * 24 * 3600.0


def budget(text: str) -> int | str | None:
    """``--disk-budget``: a size, ``auto`` (resolved at start) or ``unlimited`` (None)."""
    low = str(text).strip().lower()
    return None if low == "unlimited" else "auto" if low == "auto" else parse_bytes(text)


def ttl(text: str) -> float | None:
    """``--idle-ttl``: seconds, or ``never`` (None)."""

    if str(text).strip().lower() == "never":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (or never)") from None


def gateway_state_dir(args, session_dir: str) -> str:
    """Where this replica's gateway keeps its conversation map: ``--gateway-state-dir``, else a
    directory of the local user's state named by the port and the session directory."""
    if args.gateway_state_dir:
        return args.gateway_state_dir
    import hashlib

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "streaming-trt"
    return str(base / f"gateway-{args.openai_port}-{hashlib.sha256(session_dir.encode()).hexdigest()[:12]}")


def auto_disk_budget(session_dir: str) -> int:
    """Half the space free on the disk that holds ``session_dir`` (its nearest existing parent)."""

    path = Path(session_dir).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // 2


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"1000"`` -> bytes (an argparse type)."""

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def settings(args) -> dict:
    """The backend's settings (serve.json) from the flags, checked here so a bad flag fails fast."""
    Geometry(args.sink_tokens, args.window)  # UserError for an impossible cache
    if args.slots is not None and args.slots < 1:
        raise UserError(f"--slots must be >= 1, got {args.slots}")
    if args.token_budget is not None and args.token_budget < 1:
        raise UserError(f"--token-budget must be >= 1, got {args.token_budget}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.idle_ttl is not None and args.idle_ttl <= 0:
        raise UserError(f"--idle-ttl must be > 0 seconds, got {args.idle_ttl}")
    if not 0 <= args.max_new_tokens <= args.max_tokens_limit:
        raise UserError(f"--max-new-tokens must be in [0, --max-tokens-limit={args.max_tokens_limit}]")
    if args.max_sequences < 1 or not args.sequence_idle_seconds > 0:
        raise UserError(f"--max-sequences must be >= 1 and --sequence-idle-seconds > 0, got {args.max_sequences} "
                        f"and {args.sequence_idle_seconds}")
    if args.openai_max_conversations < 1 or not args.openai_conversation_ttl > 0:
        raise UserError("--openai-max-conversations must be >= 1 and --openai-conversation-ttl > 0")
    if args.api_key is not None and (not args.api_key or any(c.isspace() or not c.isprintable() for c in args.api_key)):
        raise UserError("--api-key must be a non-empty string of printable characters without spaces")
    for flag, host in (("--host", args.host), ("--grpc-host", args.grpc_host)):
        if not is_loopback(host) and not args.api_key and not args.write_repo:
            raise UserError(f"{flag} {host} reaches beyond this machine: give --api-key (or "
                            "$STREAMING_TRT_API_KEY) so that only clients holding it are served")
    for name in ("http_port", "grpc_port", "openai_port"):
        if not 0 <= getattr(args, name) < 65536:
            raise UserError(f"--{name.replace('_', '-')} must be a port number, got {getattr(args, name)}")
    recall = recall_from_flags(args)
    model = None
    if args.model is not None and args.model.startswith("builtin:"):
        model = args.model
    elif args.model is not None:
        if not Path(args.model).exists():
            raise UserError(f"--model {args.model}: no such file or directory")
        model = str(Path(args.model).resolve())
    return {
        "model": model, "dtype": args.dtype, "device": args.device, "backend": args.backend,
        "seed": 0 if args.seed is None else args.seed,
        "sink_tokens": args.sink_tokens, "window": args.window,
        "session_dir": str(Path(args.session_dir).resolve()), "slots": args.slots, "slot_memory": args.slot_memory,
        "token_budget": args.token_budget, "max_queue": args.max_queue, "host_memory": args.host_memory,
        "disk_budget": auto_disk_budget(args.session_dir) if args.disk_budget == "auto" else args.disk_budget,
        "idle_ttl": args.idle_ttl,
        "max_new_tokens": args.max_new_tokens, "max_new_tokens_limit": args.max_tokens_limit,
        "max_input_bytes": args.max_input_bytes, "threads": args.threads,
        "cuda_graphs": not args.no_cuda_graphs,  # decode steps replay CUDA graphs on CUDA (--no-cuda-graphs: eager)
        "recall": None if recall is None else dataclasses.asdict(recall),  # each conversation its own block store
    }


def names(text: str) -> list[str]:
    """``"a, b,,c" -> ["a", "b", "c"]``."""
    return [n.strip() for n in text.split(",") if n.strip()]


def is_loopback(host: str) -> bool:

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def restricted_protocol_flags(api_key: str | None) -> list[str]:
    """tritonserver flags requiring the key (header ``authorization: Bearer KEY``) on every gRPC and HTTP
    endpoint group but health, which load balancers probe."""
    if not api_key:
        return []
    groups = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
    return [f"--grpc-restricted-protocol={groups}:authorization=Bearer {api_key}",
            f"--http-restricted-api={groups}:authorization=Bearer {api_key}"]


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    return common.run(lambda: _serve(args))


def sequence_slots(args) -> dict:
    return {"idle_seconds": args.sequence_idle_seconds, "candidates": args.max_sequences}


def _serve(args) -> int:
    # the serving stack needs the [serve] extra (tritonclient, starlette, uvicorn): imported only to serve, so --help
    # and the flag checks run without it
    from ..serving.repo import TritonServer, find_tritonserver, write_repo

    conf = settings(args)
    if args.dynamo:
        from ..serving import dynamo  # the [dynamo] extra, optional

        if args.session_affinity_ttl < 1:
            raise UserError(f"--session-affinity-ttl must be >= 1 second, got {args.session_affinity_ttl}")
        os.environ["DYN_DISCOVERY_BACKEND"] = args.discovery_backend
        os.environ["DYN_TCP_RPC_HOST"] = args.dynamo_host
        if args.file_kv:
            os.environ["DYN_FILE_KV"] = str(Path(args.file_kv).resolve())
        Path(conf["session_dir"]).mkdir(parents=True, exist_ok=True)
        return dynamo.run(conf, args.served_model_name, args.dynamo_namespace, args.session_affinity_ttl)
    if args.write_repo:
        model_dir = write_repo(args.write_repo, conf, **sequence_slots(args))
        common.info(f"[streaming-trt] model repository written to {model_dir.parent} "
                    f"(serve it with: tritonserver --model-repository {model_dir.parent})")
        return 0
    Path(conf["session_dir"]).mkdir(parents=True, exist_ok=True)
    binary = find_tritonserver(args.tritonserver)
    work = Path(tempfile.mkdtemp(prefix="streaming-trt-serve-"))
    repo = Path(args.repo_dir) if args.repo_dir else work / "repo"
    # the backend ENDs the Triton sequence of a START it refused, over this loopback gRPC address
    conf["grpc_url"] = f"{'127.0.0.1' if args.grpc_host in ('0.0.0.0', '::', '') else args.grpc_host}:{args.grpc_port}"
    conf["api_key"] = args.api_key
    write_repo(repo, conf, **sequence_slots(args))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, args.grpc_host, args.http_port, args.grpc_port, binary, work,
                          extra_args=restricted_protocol_flags(args.api_key))
    gateway = None
    try:
        common.info(f"[streaming-trt] starting {binary} (log: {server.log_path})")
        server.wait_ready(args.ready_timeout)
        if args.openai_port:
            from ..serving.gateway import GatewayThread  # the [serve] extra, as above

            gateway = GatewayThread(f"{server.grpc_address}:{args.grpc_port}", args.host, args.openai_port,
                                    model_id=args.served_model_name, max_tokens_limit=args.max_tokens_limit,
                                    max_body_bytes=args.max_input_bytes, api_key=args.api_key,
                                    state_dir=gateway_state_dir(args, conf["session_dir"]),
                                    session_dir=conf["session_dir"], max_conversations=args.openai_max_conversations,
                                    conversation_ttl=args.openai_conversation_ttl,
                                    allowed_hosts=names(args.allowed_hosts) + ([] if is_loopback(args.host) else [args.host]),
                                    allowed_origins=names(args.allowed_origins))
            gateway.start()
        print(f"[streaming-trt] ready: gRPC {args.grpc_host}:{args.grpc_port}"
              + (f", HTTP http://127.0.0.1:{args.http_port}" if args.http_port else "")
              + (f", OpenAI http://{args.host}:{args.openai_port}/v1" if gateway else "")
              + f"; sessions in {conf['session_dir']}", flush=True)
        while not stop.wait(0.5):
            if server.proc.poll() is not None:
                raise UserError(f"tritonserver exited with status {server.proc.returncode}; its log ends:\n"
                                f"{server.log_tail()}")
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()
    common.info("[streaming-trt] stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
