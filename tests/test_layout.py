"""The package layout is the architecture: arrows point down, nothing below imports above.

cli -> api / cluster -> engine -> model. `config` and `tokenizer` are shared (they import only
`model`; `config_flags`, the serve flags over `config`, only it); `launch` and `__main__` are
entry points; `loadtest` imports nothing else of pd_local.
`cluster` may import `api` (the router implements `api.backend.Backend`), never the reverse.
Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pd_local"

# What each part of the package may import from pd_local (besides itself).
ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "config": {"model"},
    "config_flags": {"config"},
    "tokenizer": set(),
    "engine": {"model", "config"},
    "api": {"engine", "model", "config", "tokenizer"},
    "cluster": {"api", "engine", "model", "config", "tokenizer"},
    "cli": {"api", "cluster", "engine", "model", "config", "config_flags", "tokenizer", "loadtest"},
    "launch": {"cluster", "config", "config_flags"},
    "__main__": set(),  # imports its sub-commands by name, lazily
    "__init__": set(),
    "loadtest": set(),
}


def _part(module: str) -> str:
    """'pd_local.engine.scheduler' -> 'engine'; 'pd_local.config' -> 'config'."""
    return module.split(".")[1]


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "pd_local":  # `from pd_local import x`
                names += [f"pd_local.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("pd_local.")]


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above(path: Path) -> None:
    rel = path.relative_to(ROOT)
    part = rel.parts[0].removesuffix(".py")
    bad = [m for m in _imports(path) if _part(m) != part and _part(m) not in ALLOWED[part]]
    assert not bad, f"pd_local/{rel} ({part}) imports {bad}; {part} may import only {sorted(ALLOWED[part])}"


def test_top_level_shows_the_roles() -> None:
    top = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith("__pycache__"))
    assert top == ["__init__.py", "__main__.py", "api", "cli", "cluster", "config.py", "config_flags.py", "engine",
                   "launch.py", "loadtest", "model", "tokenizer.py"]


@pytest.mark.parametrize("package", ["api", "cli", "cluster", "engine", "loadtest", "model"])
def test_every_package_says_what_it_owns(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc.splitlines()) >= 3, f"pd_local/{package}/__init__.py needs a docstring"
    for module in sorted((ROOT / package).glob("*.py")):
        if module.name != "__init__.py":
            assert f"`{module.stem}" in doc, f"pd_local/{package}/__init__.py does not list {module.name}"


MAX_LINES = 450


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_is_longer_than_450_lines(path: Path) -> None:
    """A longer file holds a second concept: split it there. No exemptions."""
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"pd_local/{path.relative_to(ROOT)}: {lines} lines (limit {MAX_LINES})"


MAX_DOC_LINES = 15


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_state_a_contract_in_at_most_15_lines(path: Path) -> None:
    """An essay belongs in docs/; a package __init__'s module table is the one exception."""
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if path.name == "__init__.py" and isinstance(node, ast.Module):
            continue
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                n = first.end_lineno - first.lineno + 1
                if n > MAX_DOC_LINES:
                    long.append(f"{getattr(node, 'name', '<module>')}: {n} lines")
    assert not long, f"pd_local/{path.relative_to(ROOT)}: {long}"


MAX_PROSE_SHARE = 0.12


def _prose_lines(source: str) -> tuple[int, int]:
    """(comment-only + docstring lines, non-blank lines) of one file."""
    lines = source.splitlines()
    prose = {i for i, line in enumerate(lines, 1) if line.strip().startswith("#")}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                prose |= {i for i in range(first.lineno, first.end_lineno + 1) if lines[i - 1].strip()}
    return len(prose), sum(1 for line in lines if line.strip())


def test_prose_is_at_most_12_percent_of_the_package() -> None:
    """Comments and docstrings state contracts and shapes; the reasons and figures live in docs/."""
    counts = [_prose_lines(p.read_text()) for p in SOURCES]
    prose, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert prose / total <= MAX_PROSE_SHARE, (
        f"{prose} of {total} non-blank lines in pd_local are comments or docstrings "
        f"({prose / total:.1%}, limit {MAX_PROSE_SHARE:.0%}): move the essay to docs/")


def test_prose_count_sees_comments_and_docstrings() -> None:
    src = '"""Module.\n\nMore."""\n\nx = 1  # trailing: code\n# a comment\n\ndef f():\n    """Doc."""\n    return x\n'
    assert _prose_lines(src) == (4, 7)
