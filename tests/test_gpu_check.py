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
    for name in ("tests", "kernels", "latency", "endless"):
        assert f"PASS {name} " in summary, summary
    assert (tmp_path / "missing_wheels.txt").is_file()
    assert list(tmp_path.glob("latency/*.csv")) and list(tmp_path.glob("latency/*.png"))
    assert list(tmp_path.glob("endless/*.csv")) and list(tmp_path.glob("kernels/*.csv"))
