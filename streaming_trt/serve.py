"""Serve the eager runtime on Triton Inference Server: ``python -m streaming_trt.serve``.

Writes a Triton model repository (Python backend, decoupled token streaming, sequence batching:
one conversation = one streaming session keyed by the sequence correlation id), starts the
``tritonserver`` it finds, waits until it is ready, prints the endpoints and stops cleanly on
Ctrl-C / SIGTERM. ``--openai-port`` adds an OpenAI-compatible HTTP endpoint in front of it;
``--write-repo DIR`` only writes the repository (for NGC containers). See docs/serving.md.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .contract import UserError


def build_parser():
    from . import cli

    p = cli.parser(
        "streaming_trt.serve",
        "Serve streaming chat on Triton Inference Server (gRPC streaming + HTTP), optionally with an "
        "OpenAI-compatible /v1/chat/completions endpoint. Every conversation is one endless StreamingLLM "
        "session; each turn feeds only its new tokens; sessions are saved to --session-dir after every "
        "turn and survive restarts.",
    )
    for action in p._actions:  # the sampling flags give per-request defaults here
        if action.dest == "max_new_tokens":
            action.help = "default reply length when a request does not say (MAX_TOKENS / max_tokens)"
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address every endpoint binds (loopback by default)")
    g.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port (health, metadata)")
    g.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port (streaming chat)")
    g.add_argument("--openai-port", type=int, default=0, help="port of the OpenAI-compatible gateway (0: off)")
    g.add_argument("--served-model-name", default="streaming-trt", help="the model id the OpenAI endpoint lists")
    g.add_argument("--session-dir", default="sessions", help="where conversations are saved after every turn")
    g.add_argument("--max-resident", type=int, default=64,
                   help="conversations kept in memory; the least recently used wait on disk")
    g.add_argument("--max-tokens-limit", type=int, default=4096, help="largest reply length a request may ask for")
    g.add_argument("--max-input-bytes", type=int, default=256 * 1024, help="largest message list a request may send")
    g.add_argument("--tritonserver", metavar="PATH", help="tritonserver binary (default: nvidia-pytriton's, or PATH)")
    g.add_argument("--repo-dir", metavar="DIR", help="where to write the model repository (default: a temporary directory)")
    g.add_argument("--write-repo", metavar="DIR", help="only write the model repository to DIR and exit")
    g.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    return p


def settings(args) -> dict:
    """The backend's settings (serve.json) from the flags, checked here so a bad flag fails fast."""
    if args.sink_tokens < 0 or args.window < 1:
        raise UserError(f"--sink-tokens must be >= 0 and --window >= 1, got {args.sink_tokens} and {args.window}")
    if args.max_resident < 1:
        raise UserError(f"--max-resident must be >= 1, got {args.max_resident}")
    if not 0 <= args.max_new_tokens <= args.max_tokens_limit:
        raise UserError(f"--max-new-tokens must be in [0, --max-tokens-limit={args.max_tokens_limit}]")
    for name in ("http_port", "grpc_port", "openai_port"):
        if not 0 <= getattr(args, name) < 65536:
            raise UserError(f"--{name.replace('_', '-')} must be a port number, got {getattr(args, name)}")
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
        "session_dir": str(Path(args.session_dir).resolve()), "max_resident": args.max_resident,
        "max_new_tokens": args.max_new_tokens, "max_new_tokens_limit": args.max_tokens_limit,
        "max_input_bytes": args.max_input_bytes, "threads": args.threads,
    }


def main(argv: list[str] | None = None) -> int:
    from . import cli

    args = build_parser().parse_args(argv)
    return cli.run(lambda: _serve(args))


def _serve(args) -> int:
    from . import cli
    from .serving.repo import TritonServer, find_tritonserver, write_repo

    conf = settings(args)
    if args.write_repo:
        model_dir = write_repo(args.write_repo, conf)
        cli.info(f"[streaming-trt] model repository written to {model_dir.parent} "
                 f"(serve it with: tritonserver --model-repository {model_dir.parent})")
        return 0
    Path(conf["session_dir"]).mkdir(parents=True, exist_ok=True)
    binary = find_tritonserver(args.tritonserver)
    work = Path(tempfile.mkdtemp(prefix="streaming-trt-serve-"))
    repo = Path(args.repo_dir) if args.repo_dir else work / "repo"
    write_repo(repo, conf)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repo, args.host, args.http_port, args.grpc_port, binary, work)
    gateway = None
    try:
        cli.info(f"[streaming-trt] starting {binary} (log: {server.log_path})")
        server.wait_ready(args.ready_timeout)
        if args.openai_port:
            from .serving.gateway import GatewayThread

            gateway = GatewayThread(f"{args.host}:{args.grpc_port}", args.host, args.openai_port,
                                    model_id=args.served_model_name, max_tokens_limit=args.max_tokens_limit,
                                    max_body_bytes=args.max_input_bytes)
            gateway.start()
        print(f"[streaming-trt] ready: gRPC {args.host}:{args.grpc_port}, HTTP http://{args.host}:{args.http_port}"
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
    cli.info("[streaming-trt] stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
