"""scripts/gpu_check.sh, the one prepared GPU run, in its --cpu mode: the same steps on small shapes,
so that the script cannot rot between the rare runs on a lent GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script's tests set it up themselves (tests/conftest.py)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stderr[-2000:]
    assert "ALL PASSED" in summary
    for name in ("collect", "tests", "kernels", "latency", "endless"):
        assert f"PASS {name} " in summary, summary
    assert (tmp_path / "missing_wheels.txt").is_file()
    assert list(tmp_path.glob("latency/*.csv")) and list(tmp_path.glob("latency/*.png"))
    assert list(tmp_path.glob("endless/*.csv")) and list(tmp_path.glob("kernels/*.csv"))


def test_gpu_check_fails_loudly_on_a_test_id_that_no_longer_collects(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               GPU_CHECK_TESTS="tests/test_kernels.py tests/test_core.py::no_such_test")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--steps", "collect"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 1, summary
    assert "FAIL collect" in summary and "tests/test_core.py::no_such_test" in summary, summary
    assert "no longer collects" in summary and "SOME STEPS FAILED" in summary
