"""The import graph points one way: contract <- kernels <- runtime <- {hf, export, engine} <- serving <- apps.

Two checks. Statically, every ``import`` in the package (function-local ones included) is mapped to
the layer of the module it names, and no module may import a layer above its own, nor its sibling
(``streaming_trt.hf``, ``streaming_trt.export`` and ``streaming_trt.engine`` know nothing of each other). Dynamically, each
layer is imported in a fresh interpreter and must not have pulled in a module of a higher layer
(``streaming_trt/__init__.py`` resolves its public names lazily, so importing ``streaming_trt.kernels``
runs no runtime code). The layers are drawn in README.md.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {package: ROOT / folder for package, folder in  # pyproject.toml's package-dir
           tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}
APPS = {"streaming_trt.generate", "streaming_trt.build", "streaming_trt.serve"}  # command lines on top of all
RANK = {"contract": 0, "kernels": 1, "runtime": 2, "hf": 3, "export": 3, "engine": 3, "serving": 4, "apps": 5}


def layer(module: str) -> str:
    """The layer of a module of this package."""
    if module == "streaming_trt.contract":
        return "contract"
    for prefix, name in (("streaming_trt.kernels", "kernels"), ("streaming_trt.export", "export"),
                         ("streaming_trt.hf", "hf"), ("streaming_trt.engine", "engine"),
                         ("streaming_trt.serving", "serving")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module == "streaming_trt.client":  # the serving protocol's client side (the gateway uses it)
        return "serving"
    return "apps" if module in APPS else "runtime"


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__``)."""
    found = {}
    for package, folder in FOLDERS.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if package == "streaming_trt" and parts[0] in ("kernels", "export"):
                continue  # not inside this folder in an install
            if "templates" in parts:  # files copied into a Triton repository, not modules of the package
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = file
    return found


def imported(name: str, file: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``file`` (module ``name``) imports anywhere in its body."""
    base = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import streaming_trt.kernels.decode` names its parents too
                t = t.rpartition(".")[0]
            if t and t != "streaming_trt" and t != name:
                out.add(t)
    return out


def upward_imports() -> list[str]:
    mods = modules()
    bad = []
    for name, file in sorted(mods.items()):
        here = layer(name)
        for target in sorted(imported(name, file, set(mods))):
            there = layer(target)
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and there != here):
                bad.append(f"{name} ({here}) imports {target} ({there})")
    return bad


def test_no_layer_imports_upward():
    assert upward_imports() == []


def test_the_package_imports_no_benchmark_or_test_code():
    """bench/ and tests/ sit on top of the package and ship with no install: nothing below imports them."""
    bad = []
    for name, file in sorted(modules().items()):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("bench", "tests")]
    assert bad == []


def test_the_check_sees_every_module():
    names = set(modules())
    for must in ("streaming_trt.contract", "streaming_trt.kernels.decode", "streaming_trt.model",
                 "streaming_trt.hf.attention", "streaming_trt.export.settings", "streaming_trt.serving",
                 "streaming_trt.engine.runner"):
        assert must in names, must
    assert layer("streaming_trt.kernels.reference") == "kernels" and layer("streaming_trt.session") == "runtime"


def _loaded_after(code: str) -> list[str]:
    """The package's modules loaded by ``code`` in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules if m == 'streaming_trt' or m.startswith('streaming_trt.'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT / "tests",
                         timeout=120, env=None)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_import_only_the_contract():
    code = "import streaming_trt.kernels, streaming_trt.kernels.reference"
    try:
        import triton  # noqa: F401

        code += ", streaming_trt.kernels._common, streaming_trt.kernels.decode"  # the Triton kernels too
    except ImportError:
        pass
    loaded = _loaded_after(code)
    assert [m for m in loaded if layer(m) != "kernels" and m not in ("streaming_trt", "streaming_trt.contract")] == []
    assert "streaming_trt.kernels.reference" in loaded


@pytest.mark.parametrize("top, above", [
    ("streaming_trt.session, streaming_trt.generation, streaming_trt.cli", ("hf", "export", "engine", "serving", "apps")),
    ("streaming_trt.hf", ("export", "engine", "serving", "apps")),
    ("streaming_trt.engine", ("hf", "export", "serving", "apps")),
    ("streaming_trt.export, streaming_trt.export.onnx", ("hf", "engine", "serving", "apps")),
])
def test_a_layer_does_not_pull_the_ones_above(top, above):
    loaded = _loaded_after(f"import {top}")
    assert [m for m in loaded if layer(m) in above] == []


def test_readme_draws_the_layers_and_links_only_files_in_the_repo():
    import re

    text = (ROOT / "README.md").read_text()
    assert "streaming_trt.contract" in text and "tests/test_layers.py" in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links {target}, not a file of this repository"
