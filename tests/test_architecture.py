"""The shape of the house: one installed namespace, no import cycles, a serving path free of evaluation code.

The import graph is read from the source (every import statement, module level or inside a function, except
those under ``if TYPE_CHECKING:``), so a cycle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

FOLDERS = {"models": "pathguard.models", "service": "pathguard.service"}
EVALUATION_LIBRARIES = ("art", "matplotlib")
SERVING_LIBRARIES = ("fastapi", "starlette", "uvicorn", "redis", "prometheus_client")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names imported anywhere in ``tree`` (``from a.b import c`` yields ``a.b`` and ``a.b.c``)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(edges between the package's own modules, every imported name per module)."""
    sources = _sources()
    edges: dict[str, set[str]] = {m: set() for m in sources}
    imported: dict[str, list[str]] = {}
    for module, path in sources.items():
        names = _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        imported[module] = names
        for name in names:
            if name in sources and name != module and not module.startswith(name + "."):
                edges[module].add(name)  # importing a module's own parent package is no edge
    return edges, imported


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_the_cycle_finder_finds_a_cycle_through_a_package_face():
    edges = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": {"p.a"}}
    assert _cycles(edges) == [["p", "p.a", "p.b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_read():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from .b import c\n"
        "def f():\n    import x.y\n"
        "if TYPE_CHECKING:\n    from z import w\n"
    )
    names = _imported_names(tree, "p.q.a", is_package=False)
    assert {"p.q.b", "p.q.b.c", "x.y"} <= set(names)
    assert "z" not in names


def test_no_import_cycle_inside_the_package():
    edges, _ = _graph()
    assert len(edges) > 40  # the whole package was read
    assert _cycles(edges) == []


def test_models_never_imports_the_service_or_serving_libraries():
    _, imported = _graph()
    bad = {
        m: sorted(n for n in names if n.split(".")[0] in SERVING_LIBRARIES or n.startswith("pathguard.service"))
        for m, names in imported.items()
        if m.startswith("pathguard.models")
    }
    assert {m: n for m, n in bad.items() if n} == {}


def test_only_evaluation_and_the_builder_reach_the_evaluation_extra():
    _, imported = _graph()
    allowed = ("pathguard.models.evaluation", "pathguard.models.builder", "pathguard.service.cli")
    bad = {
        m: sorted(
            n for n in names if n.split(".")[0] in EVALUATION_LIBRARIES or n.startswith("pathguard.models.evaluation")
        )
        for m, names in imported.items()
        if not m.startswith(allowed)
    }
    assert {m: n for m, n in bad.items() if n} == {}


def test_only_the_cluster_executor_imports_ray():
    """Ray is the cluster extra: one module imports it (lazily), so the builder and everything else run without."""
    _, imported = _graph()
    users = sorted(m for m, names in imported.items() if any(n.split(".")[0] == "ray" for n in names))
    assert users == ["pathguard.models.builder.cluster"]
    source = (ROOT / "models/builder/cluster.py").read_text()
    assert "\nimport ray" not in source and "\nfrom ray" not in source  # never at module level


def test_the_serving_path_loads_no_evaluation_code(tmp_path):
    """Start the app on the committed bundle (lifespan run) and list what was imported."""
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from pathguard.service.app import create_app\n"
        "from pathguard.service.settings import Settings\n"
        f"s = Settings(bundle={str(ROOT / 'artifacts/mnist-lenet5')!r}, warmup_rounds=1, redis_url=None,\n"
        f"             spool_path={str(tmp_path / 'spool.jsonl')!r})\n"
        "with TestClient(create_app(s)) as c:\n"
        "    assert c.get('/v2/health/ready').status_code == 200\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True
    )
    loaded = set(out.stdout.split())
    assert "pathguard.models.bundle.pipeline" in loaded  # the probe saw the serving path
    forbidden = [
        m
        for m in loaded
        if m.split(".")[0] in (*EVALUATION_LIBRARIES, "ray", "models", "service")
        or m.startswith(("pathguard.models.evaluation", "pathguard.models.builder"))
    ]
    assert forbidden == []


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}  # installed name -> folder
    expected = {_module_name(p.parent / "__init__.py") for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    assert set(config["packages"]) == expected


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps .`` of the checkout into a fresh target folder (a real wheel build)."""
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, "."]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return target


def _run_isolated(target: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Python without site processing (so no editable install), with only ``target`` and the dependencies."""
    site = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), site])}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_distribution_has_one_namespace(installed, tmp_path):
    top = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert top - {"bin"} == {"pathguard"}
    assert not (installed / "pathguard" / "__init__.py").exists()  # a namespace package
    assert (installed / "pathguard" / "models" / "effective_path" / "extractor.py").is_file()
    ok = _run_isolated(
        installed, "import pathguard.models, pathguard.service.app; print(pathguard.models.__file__)", tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith(str(installed))
    for name in ("models", "service"):
        bad = _run_isolated(installed, f"import {name}", tmp_path)
        assert bad.returncode != 0 and "ModuleNotFoundError" in bad.stderr


def test_the_installed_distribution_ships_the_page(installed):
    static = installed / "pathguard" / "service" / "static"
    index = json.loads((static / "samples" / "index.json").read_text())
    shipped = ["index.html", "page.js", "page.css", *(f"samples/{s['file']}" for s in index["samples"])]
    for name in shipped:
        assert (static / name).read_bytes() == (ROOT / "service" / "static" / name).read_bytes(), name


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_domain_errors_load_no_heavy_library():
    """``pathguard.models`` loads its parts on first use: its errors need neither torch, numba nor onnx."""
    loaded = _loaded_after("import pathguard.models.errors")
    assert "pathguard.models.errors" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("torch", "numba", "onnx", "onnxruntime")) == []
    assert "pathguard.models.bundle.loading" in _loaded_after("from pathguard.models import load_classifier")


def test_the_builder_imports_the_attacks_only_for_supervised_builds():
    loaded = _loaded_after("import pathguard.models.builder, pathguard.models.components.supervised")
    assert "pathguard.models.builder.builder" in loaded
    assert sorted(m for m in loaded if m.startswith("pathguard.models.evaluation")) == []
    for path in sorted((ROOT / "models" / "builder").glob("*.py")):  # never at module level
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = _imported_names(ast.Module(body=top, type_ignores=[]), "pathguard.models.builder.x", False)
        assert not [n for n in names if n.startswith("pathguard.models.evaluation")], path.name


def test_the_supervised_scorer_does_not_load_effective_path_trees():
    """The tree ensembles are the supervised scorer's models and live beside it in ``verdict/``."""
    loaded = _loaded_after("import pathguard.models.verdict.supervised")
    assert "pathguard.models.verdict.trees" in loaded
    assert "pathguard.models.effective_path.trees" not in loaded
    _, imported = _graph()
    assert not [n for n in imported["pathguard.models.verdict.supervised"] if n.endswith(".TreeEnsemble")
                and not n.startswith("pathguard.models.verdict.trees")]  # fmt: skip


def test_benchmarks_live_outside_the_served_package():
    """``pathguard bench`` runs from ``models/evaluation``; no module of the service is a benchmark."""
    sources = _sources()
    assert [m for m in sources if m.startswith("pathguard.service") and "bench" in m.rsplit(".", 1)[-1]] == []
    assert "pathguard.models.evaluation.bench_http" in sources
    _, imported = _graph()
    assert "pathguard.models.evaluation.bench_http" in imported["pathguard.service.cli"]
