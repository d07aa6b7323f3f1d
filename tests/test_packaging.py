"""Packaging and layering rules that reviews would otherwise have to catch by eye."""

from __future__ import annotations

import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _packages_on_disk() -> set[str]:
    found = set()
    for top, dotted in (("graphopt", "graphopt"), ("passes", "graphopt.passes")):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in folder:
                rel = os.path.relpath(folder, os.path.join(ROOT, top))
                found.add(dotted if rel == "." else dotted + "." + rel.replace(os.sep, "."))
    return found


def test_every_subpackage_is_installed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_passes_install_as_graphopt_passes():
    import graphopt.passes

    assert os.path.samefile(os.path.dirname(graphopt.passes.__file__), os.path.join(ROOT, "passes"))
    assert "passes" not in _pyproject()["tool"]["setuptools"]["packages"]


def _imports(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_passes_use_only_the_public_api():
    private = re.compile(r"^graphopt(\.\w+)*\._")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "passes")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                # The library's own private helpers are fine; graphopt's internals are not.
                offenders += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _imports(path)
                              if private.match(m) and not m.startswith("graphopt.passes.")]
    assert not offenders, "passes/ must use graphopt's public API only:\n" + "\n".join(offenders)


def test_layers_import_only_lower_layers():
    order = ["ir", "rewrite", "pipeline", "analysis", "runtime"]
    allowed = {
        "ir": {"ir"},
        "rewrite": {"ir", "rewrite", "pipeline"},  # rule sets become passes
        "pipeline": {"ir", "pipeline", "runtime", "analysis"},  # instruments verify numerically
        "analysis": {"ir", "analysis"},
        "runtime": {"ir", "runtime", "analysis"},
    }
    problems = []
    for layer in order:
        for folder, _, files in os.walk(os.path.join(ROOT, "graphopt", layer)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                for mod in _imports(path):
                    m = re.match(r"^graphopt\.(\w+)", mod)
                    if m and m.group(1) in order and m.group(1) not in allowed[layer]:
                        problems.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
    assert not problems, "\n".join(problems)
