"""The benchmark scripts: quick smoke runs, their self-checks, and the re-computation baseline."""
from __future__ import annotations

import csv
import math
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import baselines, endless, harness, latency, long_ppl  # noqa: E402
from streaming_trt.loading.builtin import builtin_config, builtin_state_dict  # noqa: E402
from streaming_trt.runtime.model import Transformer  # noqa: E402


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The scripts set torch's thread count (--threads, default 1); so do these tests, and other
    test files keep theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_latency_smoke(tmp_path, capsys):
    rc = latency.main(["--cache-sizes", "32,64", "--tokens", "3", "--slow-tokens", "2", "--warmup", "1",
                       "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "latency.csv")
    assert {(int(r["cache"]), r["method"]) for r in rows} == {(c, m) for c in (32, 64) for m in baselines.DEFAULT_METHODS}
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["timed_tokens"]) >= 2
        if r["method"] == "streaming":
            assert float(r["ratio_to_streaming"]) == 1.0
    streaming = {int(r["cache"]): int(r["cache_bytes"]) for r in rows if r["method"] == "streaming"}
    assert streaming[64] == 2 * streaming[32]  # the cache is sized by C, nothing else
    assert_png(tmp_path / "latency.png")
    assert "x streaming" in (tmp_path / "latency.md").read_text()
    assert "| 64 |" in capsys.readouterr().out


def test_latency_prefill_fill_and_method_subset(tmp_path):
    rc = latency.main(["--cache-sizes", "16", "--methods", "streaming,dense,recompute", "--fill", "prefill",
                       "--tokens", "2", "--slow-tokens", "1", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert [r["method"] for r in read_csv(tmp_path / "latency.csv")] == ["streaming", "dense", "recompute"]


@pytest.mark.parametrize("module,argv,message", [
    (latency, ["--cache-sizes", "256,abc"], "comma-separated integers"),
    (latency, ["--methods", "streaming,magic"], "unknown method magic"),
    (latency, ["--tokens", "0"], "--tokens must be >= 1"),
    (latency, ["--cache-sizes", "4,64"], "must exceed --sink-tokens"),
    (latency, ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda"),
    (long_ppl, ["--text", "/nonexistent/book.txt", "--tokens", "50"], "cannot be read"),
    (long_ppl, ["--cache", "64", "--check-tokens", "32"], "must exceed the cache size"),
    (endless, ["--tokens", "100", "--settle", "200"], "--settle (200) must be smaller"),
    (endless, ["--model", "/nonexistent/model"], "not a directory"),
])
def test_bad_flags_exit_2_with_one_line(module, argv, message, capsys):
    assert module.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_cli_help_and_argparse_errors():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("latency", "long_ppl", "endless"):
        r = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
        assert r.returncode == 0 and "usage: python -m bench." + name in r.stdout and "--out" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bench.latency", "--fill", "sideways"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_long_ppl_smoke(tmp_path):
    rc = long_ppl.main(["--tokens", "260", "--cache", "48", "--chunk", "32", "--recompute-stride", "16",
                        "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    summary = {r["method"]: r for r in read_csv(tmp_path / "long_ppl_summary.csv")}
    assert set(summary) == set(baselines.DEFAULT_METHODS)
    for m in ("streaming", "window", "dense"):
        assert int(summary[m]["tokens_scored"]) == 259 and float(summary[m]["check_error"]) < 1e-4
    # transformers' references compute their twins' functions
    assert float(summary["hf-dense"]["ppl"]) == pytest.approx(float(summary["dense"]["ppl"]), rel=1e-4)
    assert float(summary["hf-recompute"]["ppl"]) == pytest.approx(float(summary["recompute"]["ppl"]), rel=1e-4)
    # nothing is evicted before the cache is full: every method agrees there
    before = {float(summary[m]["ppl_before_eviction"]) for m in ("streaming", "dense", "recompute")}
    assert max(before) / min(before) < 1 + 1e-4
    rows = read_csv(tmp_path / "long_ppl.csv")
    assert {r["method"] for r in rows} == set(baselines.DEFAULT_METHODS)
    assert_png(tmp_path / "long_ppl.png")
    text = (tmp_path / "long_ppl.md").read_text()
    assert "random weights" in text and "Self-checks passed" in text


class SinksLostInChunks(baselines.RuntimeStream):
    """A streaming method with a subtle bug: its chunked path keeps no sink tokens (a window of the
    same capacity instead), which only shows once tokens are evicted."""

    def __init__(self, model):
        super().__init__("streaming", model, 4, 20, 16)
        self.chunked = baselines.RuntimeStream("window", model, 0, 24, 16)

    def feed(self, ids):
        return super().feed(ids) if ids.shape[0] == 1 else self.chunked.feed(ids)


def test_long_ppl_check_catches_chunking_mismatch(tmp_path, capsys):
    args = long_ppl.arguments(["--tokens", "120", "--cache", "24", "--chunk", "16", "--methods", "streaming",
                               "--out", str(tmp_path), "--no-progress"])
    built = harness.build(args)
    broken = lambda: SinksLostInChunks(built.model)  # noqa: E731
    with pytest.raises(harness.CheckFailed, match="chunked feeding cannot be trusted"):
        long_ppl.run(args, methods_override={"streaming": broken})
    assert not (tmp_path / "long_ppl.csv").exists()  # no perplexity from an untrusted path
    # and the same method, unbroken, passes
    fine = lambda: baselines.RuntimeStream("streaming", built.model, 4, 20, 16)  # noqa: E731
    result = long_ppl.run(args, methods_override={"streaming": fine})
    assert result["checks"]["streaming"] < 1e-4


def endless_args(tmp_path, *extra):
    return endless.arguments(["--tokens", "480", "--cache", "48", "--settle", "120", "--samples", "16",
                              "--out", str(tmp_path), "--no-progress", *extra])


def test_endless_smoke(tmp_path):
    rc = endless.main(["--tokens", "480", "--cache", "48", "--settle", "120", "--samples", "16",
                       "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "endless.csv")
    assert int(rows[-1]["tokens"]) == 480 and len(rows) >= 15
    assert len({r["cache_bytes"] for r in rows}) == 1
    assert_png(tmp_path / "endless.png")
    assert "PASSED" in (tmp_path / "endless.md").read_text()


class Leaky:
    """A session that keeps 1 MiB of every token it is fed: a memory leak."""

    def __init__(self, session):
        self.session, self.cache, self.hoard = session, session.cache, []

    def feed(self, ids):
        self.hoard.append(torch.ones(1 << 18))
        return self.session.feed(ids)


class Poisoned:
    """A session whose first sink slot turns to NaN at token 200."""

    def __init__(self, session):
        self.session, self.cache, self.fed = session, session.cache, 0

    def feed(self, ids):
        self.fed += ids.shape[-1]
        if self.fed == 200:
            self.cache.values[:, :, :, 0] = float("nan")
        return self.session.feed(ids)


@pytest.mark.parametrize("wrapper,message", [(Leaky, "memory grew"), (Poisoned, "NaN or infinite logits at token")])
def test_endless_fails_loudly(tmp_path, wrapper, message, capsys):
    with pytest.raises(harness.CheckFailed, match=message):
        endless.run(endless_args(tmp_path), wrap_session=wrapper)
    # what was measured up to the failure is still written, marked as failed
    assert read_csv(tmp_path / "endless.csv")
    assert_png(tmp_path / "endless.png")
    assert "FAILED" in (tmp_path / "endless.md").read_text()


def test_endless_exit_status_on_failure(tmp_path, monkeypatch, capsys):
    real_run = endless.run
    monkeypatch.setattr(endless, "run", lambda args, argv=None: real_run(args, argv, wrap_session=Poisoned))
    assert endless.main(["--tokens", "480", "--cache", "48", "--settle", "120", "--out", str(tmp_path),
                         "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: NaN" in err and "Traceback" not in err


def _model(layers: int):
    config = dataclasses.replace(builtin_config(), num_layers=layers)
    return Transformer.from_state_dict(config, builtin_state_dict(config, seed=3), backend="torch")


def test_recompute_baseline_equals_streaming_for_one_layer():
    """The contract's equality holds for one layer; with more, re-computation differs after eviction."""
    S, W = 2, 14
    ids = torch.randint(6, 100, (3 * (S + W) + 5,), generator=torch.Generator().manual_seed(0))
    one = _model(1)
    streaming = baselines.RuntimeStream("streaming", one, S, W).feed(ids)
    recompute = baselines.RecomputeStream(one, S, W).feed(ids)
    harness.assert_close(recompute, streaming, 1e-4, "one layer")
    deep = _model(2)
    streaming = baselines.RuntimeStream("streaming", deep, S, W).feed(ids)
    recompute = baselines.RecomputeStream(deep, S, W).feed(ids)
    harness.assert_close(recompute[: S + W], streaming[: S + W], 1e-4, "two layers, before eviction")
    assert harness.max_rel_error(recompute[-1:], streaming[-1:]) > 1e-3


def test_hf_twin_shares_weights_and_is_checked():
    args = latency.arguments(["--layers", "1"])
    built = harness.build(args, need_tokenizer=False)
    hf = built.hf()
    assert hf.model.embed_tokens.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    S, W = 2, 10
    ids = torch.randint(6, 100, (30,), generator=torch.Generator().manual_seed(1))
    a = baselines.HFRecomputeStream(hf, S, W, built.device).feed(ids)
    b = baselines.RuntimeStream("streaming", built.model, S, W).feed(ids)
    harness.assert_close(a, b, 1e-4, "transformers' re-computation against streaming, one layer")
    with torch.no_grad():
        built.model.norm.weight.mul_(2.0)  # the runtime's weights are transformers' weights
    assert hf.model.norm.weight[0].item() == 2.0


def test_builtin_text_is_there_and_plain():
    text = harness.BUILTIN_TEXT.read_text(encoding="ascii")
    assert 200_000 < len(text) < 1_000_000
    from streaming_trt.loading.tokenizer import load_tokenizer

    ids = load_tokenizer(None).encode(text[:5000])
    assert 0 not in ids  # the character tokenizer knows every character


# ----------------------------------------------------------------------------------------------
# The real text, the paper's tables and figure, the attention_sinks peer
# ----------------------------------------------------------------------------------------------

def _rdb_record(lines: list[str | None]) -> bytes:
    """One record of an R lazy-load DB as R writes it: XDR serialization v3 of a character vector."""
    import struct
    import zlib

    body = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">ii", 16, len(lines))
    for line in lines:
        if line is None:
            body += struct.pack(">ii", 9, -1)
        else:
            raw = line.encode()
            body += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return struct.pack(">I", len(body)) + zlib.compress(body)


def test_text_reads_r_lazy_load_db(tmp_path, monkeypatch):
    from streaming_trt.train import books as text

    novels = [[f"BOOK {i}", "", None, f"It is a truth universally acknowledged, {i}."] for i in range(6)]
    rdb = tmp_path / text.INSIDE
    rdb.parent.mkdir(parents=True)
    rdb.write_bytes(b"".join(_rdb_record(n) for n in novels))
    monkeypatch.setenv("STREAMING_TRT_TEXT_DIR", str(tmp_path))
    assert text.locate(allow_fetch=False) == rdb
    assert text.book("pride") == "BOOK 4\n\n\nIt is a truth universally acknowledged, 4."
    assert text.book("all").count("BOOK") == 6 and text.book("all").startswith("BOOK 0")
    with pytest.raises(harness.UserError, match="unknown book"):
        text.book("ulysses")
    rdb.write_bytes(_rdb_record(["only one"]))
    with pytest.raises(harness.UserError, match="holds 1 objects"):
        text.book("pride")


@pytest.mark.skipif(not Path("/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").is_file()
                    and not (Path.home() / ".cache/streaming-trt/text/r-cran-janeaustenr").is_dir(),
                    reason="the Debian package r-cran-janeaustenr is neither installed nor fetched "
                           "(python -m bench.text fetches it)")
def test_text_real_austen():
    from streaming_trt.train import books as text

    pride = text.book("pride", allow_fetch=False)
    assert pride.startswith("PRIDE AND PREJUDICE") and len(pride.split()) > 120_000
    assert "It is a truth universally acknowledged" in pride


def test_sinks_table_smoke(tmp_path):
    from bench import sinks_table

    rc = sinks_table.main(["--tokens", "120", "--capacity", "32", "--sinks", "0,4", "--capacities", "16,32",
                           "--chunk", "16", "--text", str(harness.BUILTIN_TEXT), "--out", str(tmp_path),
                           "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "sinks_table.csv")
    assert [(r["table"], int(r["sink_tokens"]), int(r["capacity"])) for r in rows] == \
        [("2", 0, 32), ("2", 4, 32), ("6", 4, 16), ("6", 4, 32)]
    assert all(int(r["tokens_scored"]) == 120 - 1 - 32 and float(r["ppl"]) > 1 for r in rows)
    assert_png(tmp_path / "sinks_table.png")
    assert sinks_table.main(["--sinks", "0,40", "--capacity", "32", "--out", str(tmp_path)]) == 2


def test_attention_map_smoke(tmp_path):
    from bench import attention_map

    rc = attention_map.main(["--tokens", "40", "--late", "8", "--skip", "0", "--heatmap-tokens", "8",
                             "--text", str(harness.BUILTIN_TEXT), "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "attention_map.csv")
    assert [int(r["layer"]) for r in rows] == list(range(builtin_config().num_layers))
    for r in rows:
        assert 0 < float(r["share_token0"]) <= float(r["share_first4"]) <= 1
        assert float(r["share_token0"]) <= float(r["max_head_share_token0"]) <= 1
    assert_png(tmp_path / "attention_map.png")


def test_fill_random_sets_the_stream_counter():
    """The latency shortcut must leave the session where a real stream of that length would be."""
    model = Transformer.from_state_dict(builtin_config(), builtin_state_dict(builtin_config(), 0))
    stream = baselines.RuntimeStream("streaming", model, 4, 28)
    stream.fill_random(100)
    assert stream.session.seen == [100]
    stream.feed(torch.tensor([5]))
    assert stream.session.seen == [101]


def test_attention_sinks_peer_needs_its_python(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STREAMING_TRT_SINKS_PYTHON", raising=False)
    assert latency.main(["--methods", "streaming,attention-sinks", "--out", str(tmp_path)]) == 2
    assert "--sinks-python" in capsys.readouterr().err
    assert long_ppl.main(["--methods", "attention-sinks", "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(not os.environ.get("STREAMING_TRT_SINKS_PYTHON"),
                    reason="STREAMING_TRT_SINKS_PYTHON names no environment with attention_sinks 0.4.0 and "
                           "transformers 4.34 (python -m bench.peer_sinks shows how to build one)")
def test_attention_sinks_peer_runs(tmp_path):
    rc = latency.main(["--cache-sizes", "32", "--methods", "streaming,attention-sinks", "--tokens", "3",
                       "--warmup", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = {r["method"]: r for r in read_csv(tmp_path / "latency.csv")}
    assert float(rows["attention-sinks"]["median_ms"]) > 0


def test_figure3_from_long_ppl_csvs(tmp_path):
    from bench import figure3

    def write(folder, methods):
        folder.mkdir()
        rows = [dict(method=m, token=t, nll=v, running_ppl=0) for m, pts in methods.items() for t, v in pts]
        long_ppl_csv = folder / "long_ppl.csv"
        with open(long_ppl_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["method", "token", "nll", "running_ppl"])
            w.writeheader()
            w.writerows(rows)

    write(tmp_path / "a", {"streaming": [(t, 2.0) for t in range(1, 400)], "window": [(t, 3.0) for t in range(1, 400)],
                           "recompute": [(t, 2.5) for t in range(1, 400, 50)]})
    write(tmp_path / "d", {"dense": [(t, 1.0) for t in range(1, 500)]})
    rc = figure3.main(["--run", f"32={tmp_path / 'a'}", "--dense", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert rc == 0
    got = {r["method"]: r for r in read_csv(tmp_path / "o" / "figure3.csv")}
    # scored on the tokens every method has after the cache: recompute's strided subset
    assert {int(r["tokens_scored"]) for r in got.values()} == {len(range(51, 400, 50))}
    assert float(got["window"]["ppl"]) == pytest.approx(math.exp(3.0), rel=1e-5)
    assert float(got["dense"]["ppl"]) == pytest.approx(math.exp(1.0), rel=1e-5)
    assert_png(tmp_path / "o" / "figure3.png")
    assert figure3.main(["--run", "x=y", "--out", str(tmp_path / "o")]) == 2


def test_step_profile_smoke(tmp_path):
    from bench import step_profile

    rc = step_profile.main(["--rows", "3", "--steps", "2", "--prompt-tokens", "5", "--window", "20", "--out",
                            str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = read_csv(tmp_path / "step_profile.csv")
    ops = {r["operator"]: r for r in rows}
    assert "aten::mm" in ops and float(ops["aten::mm"]["ms_per_step"]) > 0
    assert abs(sum(float(r["share"]) for r in rows) - 1) < 1e-3
    assert step_profile.main(["--rows", "0", "--out", str(tmp_path)]) == 2


def test_soak_smoke(tmp_path):
    """bench/soak.py for a few seconds with few clients: a real server, valid and abusive clients,
    the figures it prints and writes, every target met."""
    pytest.importorskip("uvicorn", reason="the gateway needs uvicorn and starlette")
    from streaming_trt.contract import UserError
    from streaming_trt.serving.repo import find_tritonserver

    try:
        find_tritonserver()
    except UserError as e:
        pytest.skip(f"no tritonserver: {e}")
    from bench import soak

    out = tmp_path / "soak.json"
    rc = soak.main(["--minutes", "0.15", "--clients", "4", "--abusive", "2", "--turns", "2", "--check", "2",
                    "--no-baseline", "--out", str(out)])
    r = json.loads(out.read_text())["soak"]
    assert rc == 0, r["failures"]
    assert r["alive"] and r["valid_turns_completed"] >= 2 and r["valid_turns_failed"] == 0
    assert r["conversations_checked"] >= 1 and r["conversations_mismatched"] == 0 and r["conversations_forked"] == 0
    assert 0 < r["peak_rss"] <= r["rss_budget"] and r["peak_disk"] <= r["disk_budget"]
    assert sum(sum(statuses.values()) for statuses in r["abuse"].values()) >= 2
    assert r["abuse"]["malformed"].keys() <= {"400"} and r["abuse"]["bad_numbers"].keys() <= {"400"}
