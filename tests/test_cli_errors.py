"""Every command line, fed bad input, ends with one line and exit status 2: no traceback, nothing left behind.

Each case runs as its own process. Starting a fresh interpreter per case would cost seconds of
imports, so one driver process imports the heavy libraries once and forks a child per case; the
child runs the command's module as ``__main__`` (what ``python -m`` does) with its stderr in a
file, and the driver records the child's real exit status. A few cases also run as plain
``python -m`` processes to show the two agree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checkpoints import make_checkpoint, save_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PARALLEL = 2  # cases in flight at once
UNWRITABLE = "/proc/streaming-trt-test"  # /proc refuses new entries, even to root (os.access says yes to root)
RANDOM = ["--model", "builtin:random", "--max-new-tokens", "2"]
BUILD = ["--model", "{model}", "--sink-tokens", "4", "--window", "8"]

# (case id, module, argv, a piece of the one-line message). In argv, {model} is a tiny Llama
# checkpoint with a tokenizer, {file} a regular file, {dir} an existing directory, {garbage} a
# file that is not a session; every path is relative to the case's own empty working directory.
CASES = [
    # generate
    ("gen-window-0", "streaming_trt.cli.generate", RANDOM + ["--window", "0"], "window must be"),
    ("gen-window-bool-text", "streaming_trt.cli.generate", RANDOM + ["--window", "True"], "invalid int value"),
    ("gen-window-float", "streaming_trt.cli.generate", RANDOM + ["--window", "3.5"], "invalid int value"),
    ("gen-sinks-negative", "streaming_trt.cli.generate", RANDOM + ["--sink-tokens", "-1"], "sink_tokens must be"),
    ("gen-window-huge", "streaming_trt.cli.generate", RANDOM + ["--window", "1000000000"], "needs"),
    ("gen-sinks-huge", "streaming_trt.cli.generate", RANDOM + ["--sink-tokens", "1000000000"], "needs"),
    ("gen-temperature", "streaming_trt.cli.generate", RANDOM + ["--temperature", "-1"], "temperature must be"),
    ("gen-temperature-nan", "streaming_trt.cli.generate", RANDOM + ["--temperature", "nan"], "temperature must be"),
    ("gen-top-p", "streaming_trt.cli.generate", RANDOM + ["--top-p", "1.5"], "top_p must be"),
    ("gen-top-k", "streaming_trt.cli.generate", RANDOM + ["--top-k", "-3"], "top_k must be"),
    ("gen-max-new", "streaming_trt.cli.generate", RANDOM + ["--max-new-tokens", "-1"], "max_new_tokens must be"),
    ("gen-model-missing", "streaming_trt.cli.generate", ["--model", "nowhere/model"], "nowhere/model"),
    ("gen-model-file", "streaming_trt.cli.generate", ["--model", "{file}"], "not a directory"),
    ("gen-model-empty-dir", "streaming_trt.cli.generate", ["--model", "{dir}"], "config.json"),
    ("gen-device", "streaming_trt.cli.generate", RANDOM + ["--device", "gpu"], "not a device name"),
    ("gen-dtype", "streaming_trt.cli.generate", RANDOM + ["--dtype", "int8"], "invalid choice"),
    ("gen-unknown-flag", "streaming_trt.cli.generate", RANDOM + ["--bogus"], "unrecognized arguments"),
    ("gen-prompt-file-missing", "streaming_trt.cli.generate", RANDOM + ["--prompt-file", "none.txt"], "No such file"),
    ("gen-prompt-file-dir", "streaming_trt.cli.generate", RANDOM + ["--prompt-file", "{dir}"], "Is a directory"),
    ("gen-save-under-file", "streaming_trt.cli.generate", RANDOM + ["--save-session", "{file}/s.st"],
     "is a file, not a directory"),
    ("gen-save-no-dir", "streaming_trt.cli.generate", RANDOM + ["--save-session", "no/such/s.st"], "does not exist"),
    ("gen-save-is-dir", "streaming_trt.cli.generate", RANDOM + ["--save-session", "{dir}"], "is a directory"),
    ("gen-save-unwritable", "streaming_trt.cli.generate", RANDOM + ["--save-session", UNWRITABLE + ".st"],
     "not writable"),
    ("gen-load-missing", "streaming_trt.cli.generate", RANDOM + ["--load-session", "none.st"], "none.st"),
    ("gen-load-garbage", "streaming_trt.cli.generate", RANDOM + ["--load-session", "{garbage}"], "garbage"),
    ("gen-load-dir", "streaming_trt.cli.generate", RANDOM + ["--load-session", "{dir}"], "dir"),
    # chat
    ("chat-window-0", "streaming_trt.cli.chat", RANDOM + ["--window", "0"], "window must be"),
    ("chat-window-huge", "streaming_trt.cli.chat", RANDOM + ["--window", "1000000000"], "needs"),
    ("chat-top-p", "streaming_trt.cli.chat", RANDOM + ["--top-p", "0"], "top_p must be"),
    ("chat-model-file", "streaming_trt.cli.chat", ["--model", "{file}"], "not a directory"),
    ("chat-load-garbage", "streaming_trt.cli.chat", RANDOM + ["--load-session", "{garbage}"], "garbage"),
    # build
    ("build-window-huge", "streaming_trt.cli.build", ["--model", "{model}", "--output", "out", "--sink-tokens", "4",
                                                  "--window", "1000000000"], "no GPU has more than"),
    ("build-sinks-huge", "streaming_trt.cli.build", ["--model", "{model}", "--output", "out", "--sink-tokens",
                                                 "1000000000", "--window", "8"], "no GPU has more than"),
    ("build-window-int32", "streaming_trt.cli.build", ["--model", "{model}", "--output", "out", "--sink-tokens", "4",
                                                   "--window", "3000000000"], "32-bit"),
    ("build-window-1", "streaming_trt.cli.build", ["--model", "{model}", "--output", "out", "--sink-tokens", "4",
                                               "--window", "1"], "--window must be an integer >= 2"),
    ("build-output-under-file", "streaming_trt.cli.build", BUILD + ["--output", "{file}/out"],
     "is a file, not a directory"),
    ("build-output-deep-under-file", "streaming_trt.cli.build", BUILD + ["--output", "{file}/a/b"],
     "is a file, not a directory"),
    ("build-output-no-parent", "streaming_trt.cli.build", BUILD + ["--output", "no/such/out"], "does not exist"),
    ("build-output-unwritable", "streaming_trt.cli.build", BUILD + ["--output", UNWRITABLE], "not writable"),
    ("build-output-is-file", "streaming_trt.cli.build", BUILD + ["--output", "{file}"], "already exists"),
    ("build-output-is-file-overwrite", "streaming_trt.cli.build", BUILD + ["--output", "{file}", "--overwrite"],
     "not a directory"),
    ("build-triton-unwritable", "streaming_trt.cli.build", BUILD + ["--output", "out", "--triton-repo", UNWRITABLE],
     "not writable"),
    ("build-triton-under-file", "streaming_trt.cli.build", BUILD + ["--output", "out", "--triton-repo", "{file}/r"],
     "is a file, not a directory"),
    ("build-model-missing", "streaming_trt.cli.build", ["--model", "none", "--output", "out", "--sink-tokens", "4",
                                                    "--window", "8"], "no such directory"),
    ("build-tp", "streaming_trt.cli.build", BUILD + ["--output", "out", "--tp", "3"], "does not divide"),
    ("build-batch-0", "streaming_trt.cli.build", BUILD + ["--output", "out", "--max-batch-size", "0"], "must be >= 1"),
    ("build-missing-flag", "streaming_trt.cli.build", ["--model", "{model}"], "required"),
    ("build-format", "streaming_trt.cli.build", BUILD + ["--output", "out", "--format", "nope"], "invalid choice"),
    # benchmarks
    *[(f"{b}-out-under-file", f"bench.{b}", ["--out", "{file}/x"], "cannot create the folder")
      for b in ("latency", "long_ppl", "endless", "kernels")],
    *[(f"{b}-out-unwritable", f"bench.{b}", ["--out", UNWRITABLE], "cannot create the folder")
      for b in ("latency", "long_ppl", "endless", "kernels")],
    *[(f"{b}-device", f"bench.{b}", ["--device", "gpu"], "not a device name")
      for b in ("latency", "long_ppl", "endless", "kernels")],
    ("latency-methods", "bench.latency", ["--methods", "nope"], "unknown method"),
    ("latency-tokens-0", "bench.latency", ["--tokens", "0"], "--tokens must be"),
    ("long_ppl-tokens-0", "bench.long_ppl", ["--tokens", "0"], "--tokens must be"),
    ("endless-tokens-0", "bench.endless", ["--tokens", "0"], "--tokens must be"),
    ("kernels-capacity", "bench.kernels", ["--capacity", "2"], "must exceed"),
    ("kernels-batch", "bench.kernels", ["--batch", "x"], "comma-separated integers"),
]

if os.getuid() != 0:  # a read-only folder stops everyone but root
    CASES += [
        ("build-output-readonly", "streaming_trt.cli.build", BUILD + ["--output", "{readonly}/out"], "not writable"),
        ("gen-save-readonly", "streaming_trt.cli.generate", RANDOM + ["--save-session", "{readonly}/s.st"],
         "not writable"),
    ]

DRIVER = textwrap.dedent(r"""
    import json, os, runpy, sys, traceback
    sys.path.insert(0, sys.argv[1])
    import torch, transformers, safetensors.torch  # noqa: F401  (imported once, shared by every child)
    import streaming_trt, streaming_trt.cli.common, streaming_trt.export.engine, streaming_trt.export.onnx  # noqa: F401  (not the
    # command modules themselves: runpy runs each as __main__, and a preloaded one would be run twice)

    def child(case):
        code = 1
        try:
            os.chdir(case["cwd"])
            os.dup2(os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.argv = [case["module"]] + case["argv"]
            try:
                runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # as the interpreter does with it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)

    cases, running, results = json.load(sys.stdin), {}, {}
    while cases or running:
        while cases and len(running) < int(sys.argv[2]):
            case = cases.pop(0)
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(case)
            running[pid] = case["id"]
        pid, status = os.wait()
        results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    make_checkpoint(root / "model", "llama")
    save_tokenizer(root / "model")
    (root / "a-file").write_text("not a directory\n")
    (root / "a-dir").mkdir()
    (root / "garbage.st").write_bytes(b"this is not a session file" * 10)
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    return root


def expand(argv, fixtures):
    names = {"model": fixtures / "model", "file": fixtures / "a-file", "dir": fixtures / "a-dir",
             "garbage": fixtures / "garbage.st", "readonly": fixtures / "readonly"}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def results(fixtures, tmp_path_factory, request):
    """Run the selected cases (``-k`` picks some); ``{id: (exit status, stderr, files left)}``."""
    work = tmp_path_factory.mktemp("cli-cases")
    before = tree(fixtures)
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if hasattr(item, "callspec") and "case_id" in item.callspec.params}
    cases = []
    for case_id, module, argv, _ in CASES:
        if case_id not in selected:
            continue
        cwd = work / case_id
        cwd.mkdir()
        cases.append({"id": case_id, "module": module, "argv": expand(argv, fixtures), "cwd": str(cwd),
                      "stderr": str(work / f"{case_id}.stderr")})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), str(PARALLEL)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=600, env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for case in cases:
        out[case["id"]] = (codes[case["id"]], Path(case["stderr"]).read_text(), tree(Path(case["cwd"])))
    out["__fixtures__"] = (before, tree(fixtures))
    assert not Path(UNWRITABLE).exists()
    return out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="the unwritable-path cases use /proc (Linux)")
@pytest.mark.parametrize("case_id,module,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line_and_exit_2(results, case_id, module, argv, message):
    code, err, left = results[case_id]
    assert "Traceback" not in err, err
    assert code == 2, err
    last = err.rstrip("\n").splitlines()[-1]
    assert "error: " in last and message in last, err
    # the error is a single line: whatever precedes it are notices and warnings, not a dump
    assert all(line.startswith(("[streaming-trt", "warning:", "usage:", " ", "error:")) or "error: " in line
               or not line.strip() for line in err.splitlines()), err
    assert left == [], f"left behind in the working directory: {left}"
    before, after = results["__fixtures__"]
    assert after == before, "a case wrote into the shared fixtures"


def run_module(*args, cwd=None, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=cwd or ROOT, **kw)


@pytest.mark.parametrize("argv,message", [
    (["streaming_trt.cli.generate", *RANDOM, "--window", "1000000000"], "needs"),
    (["streaming_trt.cli.build", "--model", "nowhere", "--output", "out", "--sink-tokens", "4", "--window", "8"],
     "no such directory"),
    (["bench.kernels", "--out", UNWRITABLE], "cannot create the folder"),
], ids=["generate", "build", "bench"])
def test_plain_processes_agree_with_the_forked_ones(argv, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_before_set_up_a_command_says_to_run_it(tmp_path):
    """A fresh clone without the dependencies: `python -m streaming_trt.cli.generate` names the set-up
    script instead of an ImportError traceback (-S hides the installed packages, as before set-up)."""
    r = run_module("-S", "-m", "streaming_trt.cli.generate")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "bash scripts/setup.sh" in r.stderr and "torch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_module("-S", "-c", "import streaming_trt")  # as a library: an ImportError that says the same
    assert r.returncode == 1 and "ImportError: streaming-trt needs torch" in r.stderr and "scripts/setup.sh" in r.stderr


# --- chat's report -----------------------------------------------------------------------------------------

def report_seconds(stderr: str) -> float:
    line = next(l for l in stderr.splitlines() if "tokens fed in" in l)
    return float(line.split("tokens fed in ")[1].split(" s")[0])


def test_chat_tokens_per_second_leave_out_the_users_typing():
    """The user types for 3 s before the second turn: the reported time does not include it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "streaming_trt.cli.chat", *RANDOM, "--window", "16"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    proc.stdin.write("hi\n")
    proc.stdin.flush()
    proc.stdout.readline()  # the first reply has been written: the chat now waits for the user
    time.sleep(3.0)
    out, err = proc.communicate("there\n", timeout=300)
    assert proc.returncode == 0, err
    assert report_seconds(err) < 2.5, err  # two 2-token replies of the random model take well under a second


def test_chat_ctrl_d_puts_the_report_on_its_own_line():
    """Interactive chat (a terminal), Ctrl-D at the prompt: the prompt line is ended before the report."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.chdir(ROOT)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "streaming_trt.cli.chat", *RANDOM, "--window", "16"])
    output, sent, deadline = b"", False, time.time() + 240
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        if not sent and output.rstrip().endswith(b"you>"):
            os.write(fd, b"\x04")  # Ctrl-D at the prompt
            sent = True
    os.waitpid(pid, 0)
    text = output.decode(errors="replace").replace("\r\n", "\n")
    assert sent, text
    report = next(l for l in text.split("\n") if "tokens fed in" in l)
    assert report.startswith("[streaming-trt]"), text  # not "you> [streaming-trt] ..."


def test_an_unforeseen_os_error_is_one_line(capsys):
    """The last line of defence: a file error no check anticipated still ends as one line, exit 2."""
    from streaming_trt.cli import common as cli

    def job():
        raise PermissionError(13, "Permission denied", "/somewhere/file")

    assert cli.run(job) == 2
    assert capsys.readouterr().err == "error: /somewhere/file: Permission denied\n"
