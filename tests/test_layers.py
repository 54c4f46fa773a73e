"""The import graph points one way, and the folders are the layers:
contract <- kernels <- runtime <- loading <- {hf, export, engine, train} <- serving <- cli.

Each layer is a folder (``streaming_trt/<layer>/``; ``kernels/src`` and ``export/src`` for the two
top-level ones), and ``streaming_trt/`` itself holds only the package's ``__init__`` and the
contract. Statically, every ``import`` in the package (function-local ones included) is mapped to
the folder of the module it names, and no module may import a layer above its own, nor a sibling
(``hf``, ``export``, ``engine`` and ``train`` know nothing of each other). Dynamically, each layer
is imported in a fresh interpreter and must not have pulled in a module of a higher layer
(``streaming_trt/__init__.py`` resolves its public names lazily, so importing
``streaming_trt.kernels`` runs no runtime code). The layers are drawn in README.md.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"contract": 0, "kernels": 1, "runtime": 2, "loading": 3, "hf": 4, "export": 4, "engine": 4, "train": 4,
        "serving": 5, "cli": 6}


def folders(root: Path = ROOT) -> dict[str, Path]:
    """pyproject.toml's package-dir: package name -> folder."""
    dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {package: root / folder for package, folder in dirs.items()}


def layer(module: str) -> str:
    """The layer of a module of this package: the folder under ``streaming_trt`` it lives in."""
    if module in ("streaming_trt", "streaming_trt.contract"):
        return "contract"
    parts = module.split(".")
    if parts[0] != "streaming_trt" or parts[1] not in RANK:
        raise AssertionError(f"{module} is in no layer folder ({', '.join(RANK)})")
    return parts[1]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package under ``root`` by its dotted name (a package by its ``__init__``)."""
    found = {}
    for package, folder in folders(root).items():
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


def upward_imports(root: Path = ROOT) -> list[str]:
    mods = modules(root)
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


def test_the_package_top_holds_only_the_contract():
    top = sorted(f.name for f in (ROOT / "streaming_trt").glob("*.py"))
    assert top == ["__init__.py", "contract.py"], f"put {top} in a layer folder"
    assert sorted(RANK) == sorted(["contract", "kernels", "export"] + [
        d.name for d in (ROOT / "streaming_trt").iterdir() if (d / "__init__.py").is_file()])


@pytest.mark.parametrize("module, line", [
    ("streaming_trt/runtime/cache.py", "from ..serving import protocol"),
    ("streaming_trt/engine/runner.py", "from ..hf import cache as hf_cache"),
    ("kernels/src/reference.py", "import streaming_trt.runtime.rope"),
    ("streaming_trt/loading/gguf.py", "    from ..cli.common import info"),
])
def test_the_check_fails_on_an_upward_import_in_a_copy_of_the_tree(tmp_path, module, line):
    """The check is by folder: one import added to a copy of the tree is caught, naming both layers."""
    for name in ("streaming_trt", "kernels", "export"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert upward_imports(tmp_path) == []
    target = tmp_path / module
    text = target.read_text()
    at = text.index("\ndef ") + 1 if line.startswith(" ") else text.index("\nfrom ") + 1
    if line.startswith(" "):
        body = text[at:].index(":\n") + 2  # the first line of the first function's body
        target.write_text(text[:at + body] + line + "\n" + text[at + body:])
    else:
        target.write_text(text[:at] + line + "\n" + text[at:])
    bad = upward_imports(tmp_path)
    assert bad and all(b.startswith(f"streaming_trt.{module.split('/')[-1].removesuffix('.py')}") or
                       module.split("/")[-1].removesuffix(".py") in b.split(" ")[0] for b in bad), bad


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
    for must in ("streaming_trt.contract", "streaming_trt.kernels.decode", "streaming_trt.runtime.model",
                 "streaming_trt.hf.attention", "streaming_trt.export.settings", "streaming_trt.serving",
                 "streaming_trt.engine.runner"):
        assert must in names, must
    assert layer("streaming_trt.kernels.reference") == "kernels" and layer("streaming_trt.runtime.session") == "runtime"


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
    ("streaming_trt.runtime.session, streaming_trt.runtime.generation, streaming_trt.runtime.chat",
     ("loading", "hf", "export", "engine", "train", "serving", "cli")),
    ("streaming_trt.loading.catalog", ("hf", "export", "engine", "train", "serving", "cli")),
    ("streaming_trt.hf", ("export", "engine", "train", "serving", "cli")),
    ("streaming_trt.engine", ("hf", "export", "train", "serving", "cli")),
    ("streaming_trt.export, streaming_trt.export.onnx", ("hf", "engine", "train", "serving", "cli")),
    ("streaming_trt.serving.client, streaming_trt.serving.protocol", ("cli",)),
])
def test_a_layer_does_not_pull_the_ones_above(top, above):
    loaded = _loaded_after(f"import {top}")
    assert [m for m in loaded if layer(m) in above] == []


def test_readme_draws_the_layers_and_links_only_files_in_the_repo():
    text = (ROOT / "README.md").read_text()
    assert "streaming_trt.contract" in text and "tests/test_layers.py" in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links {target}, not a file of this repository"
