"""The docs name every module that exists: docs/architecture.md's module map and the README's layout.

A module added without a word in either is how docs drift from the code; this fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["pipellm_daemon", "client/pipellm_client", "bench"]


def _modules() -> list[Path]:
    found: list[Path] = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.suffix not in (".py", ".cu") or path.name == "__init__.py" or "_gen" in path.parts:
                continue
            found.append(path)
    return found


def _module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("## Module map")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    return text[start : text.index("```", text.index("```", start) + 3)]


MODULES = _modules()


def test_there_are_modules_to_check() -> None:
    assert len(MODULES) > 80  # the walk itself works (a broken glob would pass everything below)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_architecture_module_map_names_it(path: Path) -> None:
    assert f"`{path.name}`" in _module_map(), f"docs/architecture.md's module map does not name {path.name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_readme_layout_names_it(path: Path) -> None:
    name = path.name if path.suffix == ".cu" else path.stem
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", _layout()), f"README's layout does not name {name}"
