"""``python -m streaming_trt.serve`` without a server: flag errors and ``--write-repo``."""
from __future__ import annotations

import json
import subprocess
import sys


def test_serve_cli_bad_flags_and_write_repo(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "streaming_trt.serve", *args], capture_output=True, text=True,
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
        return subprocess.run([sys.executable, "-m", "streaming_trt.serve", *args], capture_output=True, text=True,
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
