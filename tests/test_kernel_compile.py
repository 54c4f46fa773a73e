"""Every kernel variant the wrappers can launch compiles for sm_80 (A100) and sm_90 (H100), and fits.

No GPU is needed: ``triton.compile`` builds real cubins with the ptxas shipped in the triton wheel.
This catches what the CPU interpreter cannot (tl.dot shapes, layouts, shared memory over the
target's limit). The list of variants is each kernel module's ``launch_configs()``, which the host
wrappers build their launches from.

Compiling needs the real ``@triton.jit`` functions, while conftest.py turns on the interpreter in
this process, so both targets compile in two child processes (in parallel) without
TRITON_INTERPRET; each reports per variant whether it compiled, its shared memory, registers and
register spills (from cuobjdump, when the wheel has it; spills only warn).

Run directly to see the table: ``python tests/test_kernel_compile.py --arch 90``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

if __name__ == "__main__":
    # The test's child process: compile for real, never interpret.
    os.environ.pop("TRITON_INTERPRET", None)

import pytest

pytest.importorskip("triton")

TARGETS = {80: 163 * 1024, 90: 227 * 1024}  # usable shared memory per block (A100, H100)
KERNEL_MODULES = ("decode", "prefill", "write", "recall_triton")


def all_configs():
    import importlib

    configs = []
    for name in KERNEL_MODULES:
        configs += importlib.import_module(f"streaming_trt.kernels.{name}").launch_configs()
    return configs


def _resources(cubin: bytes) -> dict:
    """Registers and stack frame (where ptxas spills registers) per thread, from cuobjdump (empty
    if the wheel lacks it)."""
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(exe), "-res-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    for line in text.splitlines():
        for item in line.split():
            key, _, value = item.partition(":")
            if key in ("REG", "STACK") and value.isdigit():
                out[key.lower()] = int(value)
    return out


def compile_all(arch: int) -> dict:
    """Compile every launch config for ``cuda:arch``; name -> result dict."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for cfg in all_configs():
        sig, attrs = cfg.signature()
        try:
            kernel = triton.compile(
                ASTSource(cfg.fn, sig, cfg.constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            )
            results[cfg.name] = dict(ok=True, shared=kernel.metadata.shared, **_resources(kernel.asm["cubin"]))
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            results[cfg.name] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[-3000:]}")
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Results per arch, from one child process per target, run side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    folder = tmp_path_factory.mktemp("compile")
    procs = {}
    for arch in TARGETS:
        out = folder / f"sm{arch}.json"
        procs[arch] = (out, subprocess.Popen([sys.executable, __file__, "--arch", str(arch), "--json", str(out)], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for arch, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"compile worker for sm_{arch} failed:\n{log[-5000:]}"
        results[arch] = json.loads(out.read_text())
    return results


CONFIG_NAMES = [cfg.name for cfg in all_configs()]


def test_every_wrapper_config_is_listed():
    """The wrappers only launch what launch_configs() lists (head dims / dtypes they accept)."""
    import torch

    from streaming_trt.kernels import _common, decode, prefill, write

    names = set(CONFIG_NAMES)
    for dtype in _common.KERNEL_DTYPES:
        for head_dim in range(2, _common.MAX_HEAD_DIM + 1, 2):
            assert decode._main_config(dtype, head_dim).name in names
            assert decode._reduce_config(dtype, head_dim).name in names
            assert prefill._config(dtype, head_dim).name in names
            assert write._config(dtype.itemsize, head_dim).name in names
    assert len(names) == len(CONFIG_NAMES)
    assert torch.bfloat16 in _common.KERNEL_DTYPES


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_compiles_and_fits(compiled, arch, name):
    r = compiled[arch][name]
    assert r["ok"], f"{name} does not compile for sm_{arch}:\n{r['error']}"
    assert r["shared"] <= TARGETS[arch], f"{name} needs {r['shared']} B of shared memory, sm_{arch} has {TARGETS[arch]}"
    if r.get("stack", 0) > 0:
        warnings.warn(f"{name} on sm_{arch} spills registers: {r['stack']} B stack frame per thread, {r.get('reg')} registers")


def main() -> None:
    p = argparse.ArgumentParser(description="compile every kernel launch config for one CUDA arch, without a GPU")
    p.add_argument("--arch", type=int, default=90, help="80 or 90 (default: %(default)s)")
    p.add_argument("--json", help="write the results here instead of printing a table")
    args = p.parse_args()
    results = compile_all(args.arch)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
        return
    for name, r in results.items():
        if r["ok"]:
            print(f"{name:28s} shared {r['shared']:>7d} B  regs {r.get('reg', '?'):>4}  stack (spills) {r.get('stack', '?')} B")
        else:
            print(f"{name:28s} FAILED {r['error'][-300:]}")


if __name__ == "__main__":
    main()
