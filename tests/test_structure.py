"""The shape of the code (DESIGN.md, "Packages"), read with ``ast``: no Ray, no imports of it.

* No module uses another project module's private names: neither ``from <module> import
  _name`` nor ``<module alias>._name`` nor ``<imported class>._name`` (dunder names are not
  private; attributes of instances, ``self._x``, and of third-party modules, ``os._exit``,
  are not checked).
* No file in ``jobs/`` is longer than ``MAX_JOB_LINES``.
* The layering: ``storage/`` and ``embedding/`` import neither each other nor
  ``indexing/``/``jobs/``; ``indexing/`` does not import ``jobs/``; only ``jobs/``,
  ``benchmarks/`` and ``tests/`` import ``ray``.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("embedding", "indexing", "jobs", "storage", "benchmarks", "tests")
#: top-level names of the modules in tests/ (conftest puts tests/ on sys.path: ``from conftest import ...``)
TEST_TOP_LEVEL = tuple(p.stem for p in (REPO / "tests").glob("*.py") if p.stem != "__init__")
MAX_JOB_LINES = 450
#: package → project packages it must not import
FORBIDDEN = {
    "storage": ("embedding", "indexing", "jobs"),
    "embedding": ("storage", "indexing", "jobs"),
    "indexing": ("jobs",),
}
RAY_ALLOWED = ("jobs", "benchmarks", "tests")


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def canonical(name: str) -> str:
    """``conftest`` → ``tests.conftest`` (the same file under its package name)."""
    head = name.split(".")[0]
    return f"tests.{name}" if head in TEST_TOP_LEVEL else name


def is_project(name: str) -> bool:
    return canonical(name).split(".")[0] in PACKAGES


@lru_cache(maxsize=None)
def is_module(name: str) -> bool:
    """Whether dotted ``name`` is a project module or package (a file or folder in the checkout)."""
    name = canonical(name)
    if not is_project(name):
        return False
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve_from(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module of ``from <module> import ...`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, top-level or inside a function."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve_from(node, path)
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names if is_module(f"{module}.{a.name}")]
    return out


def module_aliases(path: Path, tree: ast.Module) -> dict[str, str]:
    """Local name → dotted project name, for every name an import binds to a project module
    or to an object (class, function) of one."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if is_project(a.name):
                    # ``import a.b as c`` binds ``c`` to ``a.b``; ``import a.b`` binds ``a``
                    head = a.name.split(".")[0]
                    aliases[a.asname or head] = a.name if a.asname else head
        elif isinstance(node, ast.ImportFrom):
            module = resolve_from(node, path)
            for a in node.names:
                if is_project(module) and a.name != "*":
                    aliases[a.asname or a.name] = f"{module}.{a.name}"
    return aliases


def dotted(node: ast.expr) -> "list[str] | None":
    """``a.b.c`` → ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def private_uses(path: Path, tree: "ast.Module | None" = None) -> list[str]:
    """Private names of other project modules this file (``tree``: its source) imports or reads."""
    tree = tree or parse(path)
    own = canonical(module_name(path))
    found = []
    aliases = module_aliases(path, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = resolve_from(node, path)
            if is_project(module) and canonical(module) != own:
                found += [f"{rel(path)}:{node.lineno}: from {module} import {a.name}"
                          for a in node.names if private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{rel(path)}:{node.lineno}: import {a.name}" for a in node.names
                      if is_project(a.name) and any(private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            chain = dotted(node.value)
            if not chain or chain[0] not in aliases:
                continue
            target = ".".join([aliases[chain[0]]] + chain[1:])
            if is_project(target) and canonical(target) != own and not canonical(target).startswith(own + "."):
                found.append(f"{rel(path)}:{node.lineno}: {'.'.join(chain)}.{node.attr} ({target})")
    return found


# ---- the checks ---------------------------------------------------------------------------------
def test_no_module_uses_another_modules_private_names():
    found = [f for path in project_files() for f in private_uses(path)]
    assert not found, f"{len(found)} use(s) of another module's private name:\n" + "\n".join(found)


def test_no_job_file_is_too_long():
    long = {rel(p): n for p in (REPO / "jobs").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_JOB_LINES}
    assert not long, f"files in jobs/ over {MAX_JOB_LINES} lines: {long}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    found = [f"{rel(path)}:{line}: imports {module}"
             for path in sorted((REPO / package).rglob("*.py"))
             for line, module in imported_modules(path)
             if canonical(module).split(".")[0] in FORBIDDEN[package]]
    assert not found, f"{package}/ must not import {', '.join(FORBIDDEN[package])}:\n" + "\n".join(found)


def test_only_jobs_benchmarks_and_tests_import_ray():
    found = [f"{rel(path)}:{line}: imports {module}"
             for path in project_files() if rel(path).split("/")[0] not in RAY_ALLOWED
             for line, module in imported_modules(path) if module.split(".")[0] == "ray"]
    assert not found, "\n".join(found)


# ---- the checker itself ---------------------------------------------------------------------------
def test_the_private_name_check_sees_both_forms():
    tree = ast.parse("from storage.manifest import _json_default, Artifact\n"
                     "from storage import manifest as mf\n"
                     "import storage.layout\n"
                     "import os\n"
                     "def f(self):\n"
                     "    return (mf._json_default, storage.layout._NAME_RE, Artifact._version_dirs, os._exit,\n"
                     "            self._x, mf.__name__, Artifact(1, 2, 3)._version_dirs)\n")
    found = private_uses(REPO / "jobs" / "probe.py", tree)
    assert sorted(f.split(": ", 1)[1] for f in found) == [
        "Artifact._version_dirs (storage.manifest.Artifact)",
        "from storage.manifest import _json_default",
        "mf._json_default (storage.manifest)",
        "storage.layout._NAME_RE (storage.layout)",
    ]


def test_ruff_is_clean():
    """The lint the project configures in pyproject.toml ([tool.ruff]) passes on the whole tree."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    done = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(REPO)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
