"""Training under torchrun with DDP (gloo on the CPU): two ranks of 4 samples compute what one
process of 8 does (same offsets, averaged gradients)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streaming_trt.train import files, train
import train_runs


def test_two_ranks_equal_one_process_of_twice_the_batch(tmp_path):
    pytest.importorskip("torch.distributed")
    text = train_runs.text_file(tmp_path)
    common = ["--preset", "tiny", "--text", str(text), "--heldout", "0.1", "--steps", "6", "--save-every", "6",
              "--measure-every", "3", "--threads", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "streaming_trt.cli.train", *common, "--batch", "4", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('"variant"') == 1  # one summary for the job
    train(train_runs.tiny(text, tmp_path / "one", steps=6, save_every=6, measure_every=3, batch=8), quiet=True)
    ddp, one = (files.read_rows(tmp_path / d / "log.csv") for d in ("ddp", "one"))
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in one]
    for a, b in zip(ddp, one):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4, (a, b)
