"""``python -m streaming_trt.cli.serve`` without a server: flag errors and ``--write-repo``."""
from __future__ import annotations

import json
import subprocess
import sys


def test_serve_cli_bad_flags_and_write_repo(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "streaming_trt.cli.serve", *args], capture_output=True, text=True,
                              timeout=120)

    for args, words in ((["--slots", "0"], "--slots"), (["--host-memory", "lots"], "--host-memory"), (["--model", str(tmp_path / "nope")], "no such"),
                        (["--grpc-port", "70000"], "port")):
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("--model", "builtin:random", "--write-repo", str(tmp_path / "repo"), "--session-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "repo" / "streaming_llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in config and "CONTROL_SEQUENCE_CORRID" in config
    # a conversation idle for a minute gives its sequence slot back (its next turn resumes it)
    assert "max_sequence_idle_microseconds: 60000000" in config and "max_candidate_sequences: 4096" in config
    settings = json.loads((tmp_path / "repo" / "streaming_llm" / "serve.json").read_text())
    assert settings["session_dir"] == str((tmp_path / "s").resolve())
    assert "TritonPythonModel" in (tmp_path / "repo" / "streaming_llm" / "1" / "model.py").read_text()


def test_serve_cli_sequence_slots_and_key(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "streaming_trt.cli.serve", *args], capture_output=True, text=True,
                              timeout=120)

    r = run("--host", "0.0.0.0", "--model", "builtin:random")
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("--api-key", "has space", "--model", "builtin:random")
    assert r.returncode == 2 and "--api-key" in r.stderr, r.stderr
    r = run("--model", "builtin:random", "--write-repo", str(tmp_path / "repo"), "--max-sequences", "7",
            "--sequence-idle-seconds", "1.5")
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "repo" / "streaming_llm" / "config.pbtxt").read_text()
    assert "max_sequence_idle_microseconds: 1500000\n" in config and "max_candidate_sequences: 7 " in config


def test_tritonserver_is_an_internal_component(tmp_path):
    """Only the gateway faces the network: tritonserver's gRPC binds loopback unless --grpc-host asks,
    HTTP is off unless a port is given (and then on loopback), no metrics port; --grpc-host beyond
    loopback needs the key."""
    from pathlib import Path

    from streaming_trt.serving.repo import triton_command

    cmd = triton_command(Path("tritonserver"), Path("repo"), "127.0.0.1", 8001)
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--grpc-address"] == "127.0.0.1" and flags["--allow-http"] == "false"
    assert "--http-port" not in flags and flags["--allow-metrics"] == "false"
    flags = dict(zip(*[iter(triton_command(Path("t"), Path("r"), "10.0.0.5", 8001, http_port=8000)[1:])] * 2))
    assert flags["--http-address"] == "127.0.0.1" and flags["--http-port"] == "8000"
    r = subprocess.run([sys.executable, "-m", "streaming_trt.cli.serve", "--model", "builtin:random", "--grpc-host",
                        "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--grpc-host 0.0.0.0" in r.stderr and "--api-key" in r.stderr, r.stderr


def test_disk_and_idle_time_are_bounded_by_default(tmp_path):
    import shutil

    from streaming_trt.cli import serve

    parser = serve.build_parser()
    conf = serve.settings(parser.parse_args(["--model", "builtin:random", "--session-dir", str(tmp_path / "new")]))
    free = shutil.disk_usage(tmp_path).free
    assert 0 < conf["disk_budget"] <= free // 2 + (64 << 20) and conf["idle_ttl"] == 30 * 24 * 3600
    conf = serve.settings(parser.parse_args(["--model", "builtin:random", "--disk-budget", "unlimited",
                                             "--idle-ttl", "never"]))
    assert conf["disk_budget"] is None and conf["idle_ttl"] is None
    conf = serve.settings(parser.parse_args(["--model", "builtin:random", "--disk-budget", "2GiB"]))
    assert conf["disk_budget"] == 2 << 30
