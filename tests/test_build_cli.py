"""``python -m streaming_trt.cli.build``: outputs, the written engine command, errors and atomicity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import streaming_trt.cli.build as export_cli
from checkpoints import make_checkpoint
from streaming_trt.cli.build import main
from streaming_trt.export import Toolchain
from streaming_trt.export.inference_server import model_parameters
from streaming_trt.export.model_repository import parse_model_config


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(autouse=True)
def no_toolchain(monkeypatch):
    """This machine has no TensorRT-LLM; make that explicit (and independent of the machine)."""
    monkeypatch.setattr(export_cli, "find_toolchain", lambda: Toolchain(
        version=None, cuda=False, build_exe=None,
        missing="the tensorrt_llm package is not installed (stand-in); no CUDA GPU is visible to torch"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--model", "--output", "--sink-tokens", "--window", "--dtype", "--tp", "--pp", "--max-batch-size",
                 "--max-input-len", "--max-output-len", "--triton-repo", "--overwrite", "--allow-dense-context"]:
        assert flag in text
    assert "S + W - 1" in text


def test_checkpoint_command_and_runtime_flags(llama, tmp_path, capsys):
    out, repo = tmp_path / "out", tmp_path / "repo"
    code, err = run(capsys, "--model", llama, "--output", out, "--sink-tokens", 4, "--window", 28, "--tp", 2,
                    "--dtype", "float32", "--max-output-len", 100, "--triton-repo", repo)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.sh", "checkpoint", "runtime.json"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["config.json", "rank0.safetensors",
                                                                      "rank1.safetensors"]
    # the engine was not built, and the message says why and what to run
    assert "engine NOT built: the tensorrt_llm package is not installed" in err
    assert f"sh {out / 'build_engine.sh'}" in err
    script = (out / "build_engine.sh").read_text()
    command = ("trtllm-build --checkpoint_dir checkpoint --output_dir engine --streamingllm enable "
               "--use_paged_context_fmha disable --max_beam_width 1 --max_batch_size 8 --max_input_len 32 "
               "--max_seq_len 132 --gemm_plugin float32 --gpt_attention_plugin float32")
    assert command in script.splitlines()
    assert "--sink_token_length 4 --max_attention_window_size 31 --num_beams 1" in script
    assert os.access(out / "build_engine.sh", os.X_OK)
    rt = json.loads((out / "runtime.json").read_text())
    assert (rt["sink_token_length"], rt["max_attention_window_size"], rt["engine_built"]) == (4, 31, False)
    assert rt["run_py_flags"] == ["--sink_token_length", "4", "--max_attention_window_size", "31", "--num_beams", "1"]
    assert rt["engine_dir"] == str(out / "engine") and " ".join(rt["build_command"]) == command
    p = model_parameters(parse_model_config((repo / "tensorrt_llm" / "config.pbtxt").read_text()))
    assert p["gpt_model_path"] == str(out / "engine")
    assert (p["sink_token_length"], p["max_attention_window_size"]) == ("4", "31")
    assert leftovers(tmp_path) == []


def test_a_mistral_checkpoint_is_exported_as_llama(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", "mistral")
    code, err = run(capsys, "--model", tmp_path / "hf", "--output", tmp_path / "out", "--sink-tokens", 2,
                    "--window", 6, "--checkpoint-only")
    assert code == 0, err
    assert "exported as LlamaForCausalLM" in err
    cfg = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert cfg["streaming_trt"]["source_architecture"] == "MistralForCausalLM"


@pytest.mark.parametrize("case,message", [
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("bad_json", "not valid JSON"),
    ("no_field", "required field 'hidden_size' is missing"),
    ("bad_tensors", "cannot be read as safetensors"),
    ("qwen3", "accepts LlamaForCausalLM only"),
    ("tp3", "does not divide the model's 4 attention heads"),
    ("pp3", "does not divide the model's 2 layers"),
    ("window1", "--window must be an integer >= 2"),
    ("long_prompt", "exceeds the cache capacity S + W = 12"),
])
def test_bad_input_exits_2_with_the_reason(tmp_path, capsys, llama, case, message):
    model, extra = tmp_path / "model", []
    if case == "file":
        model.write_text("x")
    elif case in ("bad_json", "no_field", "bad_tensors"):
        make_checkpoint(model, "llama")
        if case == "bad_json":
            (model / "config.json").write_text("{ nope")
        elif case == "no_field":
            cfg = json.loads((model / "config.json").read_text())
            del cfg["hidden_size"]
            (model / "config.json").write_text(json.dumps(cfg))
        else:
            (model / "model.safetensors").write_bytes(b"\x00" * 100)
    elif case == "qwen3":
        make_checkpoint(model, "qwen3")
    elif case != "missing":
        model = llama
        extra = {"tp3": ["--tp", 3], "pp3": ["--pp", 3], "window1": [], "long_prompt": ["--max-input-len", 13]}[case]
    window = 1 if case == "window1" else 8
    code, err = run(capsys, "--model", model, "--output", tmp_path / "out", "--sink-tokens", 4, "--window", window,
                    *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, err = run(capsys, "--model", llama, "--output", out, "--sink-tokens", 4, "--window", 8)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "old.txt").exists()
    code, err = run(capsys, "--model", llama, "--output", out, "--sink-tokens", 4, "--window", 8, "--overwrite")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "runtime.json").is_file()
    assert leftovers(tmp_path) == []


def test_triton_repo_must_be_separate_and_new(llama, tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "out", "--sink-tokens", 4, "--window", 8,
                    "--triton-repo", tmp_path / "repo")
    assert code == 2 and "already exists" in err and not (tmp_path / "out").exists()
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "out", "--sink-tokens", 4, "--window", 8,
                    "--triton-repo", tmp_path / "out" / "triton")
    assert code == 2 and "separate directories" in err


FAKE_BUILD = textwrap.dedent("""
    import json, pathlib, sys
    args = sys.argv[1:]
    print("fake trtllm-build starting")
    if "--fail" in open(sys.argv[0]).read().split("#", 1)[1]:
        print("fatal: out of memory"); sys.exit(1)
    out = pathlib.Path(args[args.index("--output_dir") + 1])
    out.mkdir(parents=True)
    (out / "args.json").write_text(json.dumps(args))
    (out / "rank0.engine").write_bytes(b"engine")
    #
""")


def fake_toolchain(tmp_path, fail=False):
    script = tmp_path / "fake_trtllm_build.py"
    script.write_text(FAKE_BUILD + ("# --fail\n" if fail else ""))
    return Toolchain(version="0.21.0", cuda=True, build_exe=[sys.executable, str(script)], missing=None)


def test_with_a_toolchain_the_engine_is_built_with_sink_options(llama, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(export_cli, "find_toolchain", lambda: fake_toolchain(tmp_path))
    code, err = run(capsys, "--model", llama, "--output", work / "out", "--sink-tokens", 4, "--window", 12,
                    "--gather-logits")
    assert code == 0, err
    args = json.loads((work / "out" / "engine" / "args.json").read_text())
    text = " ".join(args)
    for flags in ["--streamingllm enable", "--use_paged_context_fmha disable", "--max_beam_width 1",
                  "--max_input_len 16", "--gather_generation_logits"]:
        assert flags in text
    assert args[args.index("--checkpoint_dir") + 1].endswith("/checkpoint")  # the temporary dir, renamed since
    assert "trtllm-build: fake trtllm-build starting" in err
    assert json.loads((work / "out" / "runtime.json").read_text())["engine_built"] is True
    assert leftovers(work) == []


def test_a_failed_build_leaves_nothing(llama, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(export_cli, "find_toolchain", lambda: fake_toolchain(tmp_path, fail=True))
    code, err = run(capsys, "--model", llama, "--output", work / "out", "--sink-tokens", 4, "--window", 12,
                    "--triton-repo", work / "repo")
    assert code == 2
    assert "trtllm-build failed with status 1" in err and "fatal: out of memory" in err
    assert list(work.iterdir()) == []


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streaming_trt.cli.build", "--model", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out"), "--sink-tokens", "4", "--window", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no such directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "streaming_trt.cli.build", "--model", "x"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "required" in proc.stderr


@pytest.mark.parametrize("window,warns", [(252, False), (253, True)])
def test_trained_positions_warning_boundary(llama, tmp_path, capsys, window, warns):
    """The checkpoint has max_position_embeddings 256: capacity 4 + 252 is fine, one more warns."""
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "out", "--sink-tokens", 4, "--window", window,
                    "--checkpoint-only")
    assert code == 0, err
    assert ("exceeds the model's max_position_embeddings (256)" in err) == warns, err
    if warns:
        assert "choose a window <= 252" in err


@pytest.mark.parametrize("sizes,message", [
    (["--sink-tokens", 4, "--window", 1_000_000_000], "no GPU has more than 288.0 GB: choose --window <= "),
    (["--sink-tokens", 1_000_000_000, "--window", 8], "no GPU has more than"),
    (["--sink-tokens", 4, "--window", 3_000_000_000], "32-bit integers"),
    (["--sink-tokens", 4, "--window", 3_000_000_000, "--max-input-len", 8], "32-bit integers"),
    (["--sink-tokens", 4, "--window", 100_000, "--max-input-len", 2_000_000_000, "--allow-dense-context",
      "--dtype", "float32"], "lower --max-input-len"),  # 2e9 prompt tokens x 512 bytes of activations
])
def test_sizes_no_gpu_holds_are_refused_before_writing(llama, tmp_path, capsys, sizes, message):
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "out", *sizes)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_the_suggested_window_fits_and_one_more_does_not(llama, tmp_path, capsys):
    """The refusal's suggestion is exact: the suggested window is accepted, one more is refused."""
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "a", "--sink-tokens", 4, "--window",
                    1_000_000_000, "--max-batch-size", 1)
    fit = int(err.split("choose --window <= ")[1].split(" ")[0].replace(",", ""))
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "b", "--sink-tokens", 4, "--window", fit + 1,
                    "--max-batch-size", 1)
    assert code == 2 and "no GPU has more than" in err
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "c", "--sink-tokens", 4, "--window", fit,
                    "--max-batch-size", 1, "--checkpoint-only")
    assert code == 0, err
    assert "--max-batch-size" not in err  # one sequence: no batch warning


def test_a_batch_that_cannot_be_held_at_once_warns(llama, tmp_path, capsys):
    # float16, 2 layers x 2 KV heads x 16 dims: 256 bytes of K+V per token, and 2 x 64 x 2 = 256 bytes of
    # prompt activations; 200M tokens: one sequence needs 102.4 GB, each further one 51.2 GB, so 4 fit in 288 GB
    code, err = run(capsys, "--model", llama, "--output", tmp_path / "out", "--sink-tokens", 4, "--window",
                    200_000_000, "--checkpoint-only")
    assert code == 0, err
    assert "warning: --max-batch-size 8 sequences" in err and "holds at most 4 at once" in err


def test_tensor_parallel_splits_the_kv_cache_in_the_estimate(llama, tmp_path, capsys):
    """Each of 2 ranks holds 1 of the 2 KV heads: 128 instead of 256 cache bytes per token beside the
    256 bytes of (replicated) prompt activations, so the window that fits grows by 512 / 384."""
    fits = []
    for tp in (1, 2):
        code, err = run(capsys, "--model", llama, "--output", tmp_path / f"tp{tp}", "--sink-tokens", 4, "--window",
                        1_000_000_000, "--tp", tp)
        assert code == 2, err
        fits.append(int(err.split("choose --window <= ")[1].split(" ")[0].replace(",", "")) + 4)
    assert abs(fits[1] / fits[0] - 512 / 384) < 1e-6
