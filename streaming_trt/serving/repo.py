"""Writing the Triton model repository, and finding and running a ``tritonserver``."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import shutil
import subprocess
import sys
import sysconfig
import time
from importlib import resources, util
from pathlib import Path

import tritonclient.grpc as grpcclient

from ..contract import UserError
from ..export.model_repository import write_model_repository
from .protocol import CONTROLS, CORRID_DTYPE, INPUTS, MODEL_NAME, OUTPUTS, Tensor

CONFIG = """\
# Written by `python -m streaming_trt.cli.serve`: the eager streaming-trt runtime on the Python backend.
# One request = one chat turn; the conversation is the sequence (correlation id); replies stream.
# The tensors are streaming_trt.serving.protocol's (docs/serving.md): text is UTF-8 in UINT8 tensors
# (not BYTES: the wheel's backend stub mishandles numpy 2 arrays).
# The backend hands every request to its batching scheduler and returns at once.
name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
{inputs}
]
output [
{outputs}
]
sequence_batching {{
  max_sequence_idle_microseconds: {idle_us}
  oldest {{ max_candidate_sequences: {candidates} }}
  control_input [
{controls}
  ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _tensor_lines(tensors: tuple[Tensor, ...]) -> str:
    return ",\n".join(f'  {{ name: "{t.name}" data_type: TYPE_{t.dtype} dims: [ {", ".join(map(str, t.dims))} ]'
                      + (" optional: true" if t.optional else "") + " }" for t in tensors)


def _control_lines() -> str:
    lines = []
    for name, kind in CONTROLS:
        detail = f"data_type: TYPE_{CORRID_DTYPE}" if kind.endswith("CORRID") else "fp32_false_true: [ 0, 1 ]"
        lines.append(f'    {{ name: "{name}" control [ {{ kind: {kind} {detail} }} ] }}')
    return ",\n".join(lines)


def config_pbtxt(name: str = MODEL_NAME, idle_seconds: float = 60.0, candidates: int = 4096) -> str:
    """The model's ``config.pbtxt``: the protocol's tensors, decoupled, sequence batching (``oldest``)."""
    return CONFIG.format(name=name, idle_us=round(idle_seconds * 1e6), candidates=candidates,
                         inputs=_tensor_lines(INPUTS), outputs=_tensor_lines(OUTPUTS), controls=_control_lines())


def write_repo(repo: str | os.PathLike, settings: dict, name: str = MODEL_NAME, idle_seconds: float = 60.0,
               candidates: int = 4096) -> Path:
    """Write ``repo/<name>/{config.pbtxt, serve.json, 1/model.py}``; return the model directory.

    ``settings`` are the backend's (see ``serve.py``): model, dtype, device, backend, seed,
    sink_tokens, window, session_dir, slots, slot_memory, token_budget, max_queue, host_memory,
    disk_budget, idle_ttl, cuda_graphs, max_new_tokens, max_new_tokens_limit, max_input_bytes,
    threads, grpc_url and api_key (so the file is private). One model instance: its scheduler batches every conversation, and the store of idle
    ones stays consistent. Triton releases a conversation's sequence slot after ``idle_seconds``
    without a turn (its next turn resumes it from disk) and holds at most ``candidates`` at once.
    """
    template = resources.files("streaming_trt.serving").joinpath("templates/model.py").read_text()
    write_model_repository(repo, {f"{name}/config.pbtxt": config_pbtxt(name, idle_seconds, candidates),
                                  f"{name}/serve.json": json.dumps(settings, indent=2) + "\n",
                                  f"{name}/1/model.py": template},
                           private={f"{name}/serve.json"})  # it may hold the API key
    return Path(repo) / name


def _pytriton_dir() -> Path | None:
    spec = util.find_spec("pytriton")  # found without importing PyTriton's Python API
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def find_tritonserver(explicit: str | None = None) -> Path:
    """The binary: ``explicit``, else the one inside the nvidia-pytriton wheel, else ``tritonserver`` on PATH."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--tritonserver {explicit}: no such file")
        return path
    base = _pytriton_dir()
    if base is not None and (base / "bin" / "tritonserver").is_file():
        return base / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise UserError("no tritonserver found: pip install nvidia-pytriton --no-deps (it bundles one), put "
                    "tritonserver on PATH, or pass --tritonserver PATH; --write-repo DIR only writes the repository")


def backend_dir(binary: Path, into: Path) -> Path | None:
    """For the wheel's binary: a backend directory whose ``python/`` holds the backend library and
    the stub built for the running Python (the wheel keeps stubs per version elsewhere). Other
    binaries (NGC containers) use their own backends: None."""
    base = binary.parent.parent
    stub = base / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    lib = base / "backends" / "python"
    if not stub.is_file() or not lib.is_dir():
        return None
    target = into / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (lib / "libtriton_python.so", lib / "triton_python_backend_utils.py", stub):
        dst = target / src.name
        if not dst.exists():
            os.symlink(src, dst)
    return into


def server_env() -> dict:
    """Environment for the server: the running interpreter first on PATH (the stub runs model.py
    with it), its ``libpython`` and the wheel's bundled libraries on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    base = _pytriton_dir()
    if base is not None:
        libs.append(str(base.parent.parent / "nvidia_pytriton.libs"))
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + ([old] if old else []))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the process that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def triton_command(binary: Path, repo: Path, grpc_host: str, grpc_port: int, http_port: int = 0,
                   exit_timeout: int = 5) -> list[str]:
    """tritonserver's argv: gRPC on ``grpc_host``, HTTP on loopback only and only when ``http_port``
    is not 0, no metrics port."""
    http = ["--http-address", "127.0.0.1", "--http-port", str(http_port)] if http_port else ["--allow-http", "false"]
    return [str(binary), "--model-repository", str(repo), "--grpc-address", grpc_host, "--grpc-port", str(grpc_port),
            *http, "--allow-metrics", "false", "--exit-timeout-secs", str(exit_timeout), "--log-verbose", "0"]


class TritonServer:
    """A ``tritonserver`` child process serving ``repo``: gRPC on ``grpc_host`` (loopback unless
    asked), HTTP only when ``http_port`` is not 0 and then on loopback, no metrics."""

    def __init__(self, repo: Path, grpc_host: str, http_port: int, grpc_port: int, binary: Path, work: Path,
                 log_path: Path | None = None, exit_timeout: int = 5, extra_args: list[str] = ()):
        self.repo, self.grpc_host, self.http_port, self.grpc_port = repo, grpc_host, http_port, grpc_port
        cmd = triton_command(binary, repo, grpc_host, grpc_port, http_port, exit_timeout) + list(extra_args)
        backends = backend_dir(binary, work / "backends")
        if backends is not None:
            cmd += ["--backend-directory", str(backends)]
        self.log_path = log_path or work / "tritonserver.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def grpc_address(self) -> str:
        """Where a local client reaches the gRPC endpoint (loopback when it listens on every address)."""
        return "127.0.0.1" if self.grpc_host in ("0.0.0.0", "::", "") else self.grpc_host

    def ready(self) -> bool:
        """gRPC health (HTTP may be off); health is never behind the key."""
        try:
            with grpcclient.InferenceServerClient(f"{self.grpc_address}:{self.grpc_port}") as client:
                return bool(client.is_server_ready(client_timeout=2))
        except Exception:  # noqa: BLE001 - not listening yet, or refused: not ready
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"tritonserver exited with status {self.proc.returncode} before it was ready; "
                                f"its log ends:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s; its log ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL (the process group: the backend stub too) if it does not exit."""

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftover stubs of this server only
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()
        return self.proc.returncode
