"""The house in floors: imports point down only, and only the toy world's floor reads the gold reward.

Floors, lowest first: ``versioning`` (shared by serving and training) → ``gateway`` (serving)
→ ``trainer`` → ``toyworld`` (the toy world and the loop's evaluation) → ``loadtest``. A
module may import its own floor and the floors below it, never one above. The check reads
every import statement with ``ast`` (those inside functions and ``TYPE_CHECKING`` blocks
too), so it is static: it does not depend on which code a test happens to run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("versioning", "gateway", "trainer", "toyworld", "loadtest")
GOLD = "toyworld.gold"
GOLD_READERS = ("toyworld", "tests.toyworld")
"""Where the gold reward may be imported: the toy world's floor (its builders and the loop's evaluation) and its tests."""


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; ``from a import b`` yields ``a`` and ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def upward_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    found: dict[tuple[str, int, str], str] = {}  # one finding per statement and floor
    for path in files:
        where = str(path.relative_to(root))
        floor = FLOORS.index(path.relative_to(root).parts[0])
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in FLOORS and FLOORS.index(top) > floor:
                found.setdefault((where, line, top), f"{where}:{line} imports {name} (floor {top} is above)")
    return sorted(found.values())


def gold_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    found: list[str] = []
    for path in files:
        name = module_name(path, root)
        if any(name == r or name.startswith(f"{r}.") for r in GOLD_READERS):
            continue
        found.extend(f"{path.relative_to(root)}:{line} imports {m}" for line, m in imports(path) if m == GOLD)
    return sorted(set(found))


def plant(root: Path, package: str, code: str) -> Path:
    """A module of ``package`` in a scratch tree under ``root`` (the real tree is never written)."""
    path = root / package / "planted.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code)
    return path


def test_every_floor_exists() -> None:
    for package in FLOORS:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_imports_point_down_only() -> None:
    assert upward_imports(sources(*FLOORS)) == []


def test_only_the_toy_worlds_floor_imports_the_gold_reward() -> None:
    assert gold_imports(sources(*FLOORS, "tests")) == []


@pytest.mark.parametrize(
    ("package", "code", "expected"),
    [
        ("gateway", "from trainer.round import run\n", "imports trainer.round"),
        ("versioning", "def f() -> None:\n    import gateway.app\n", "imports gateway.app"),
        ("trainer", "from toyworld import bootstrap\n", "imports toyworld"),
        ("toyworld", "import loadtest.bench\n", "imports loadtest.bench"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path: Path, package: str, code: str, expected: str) -> None:
    """The check on a planted module: each of these would fail the suite."""
    found = upward_imports([plant(tmp_path, package, code)], root=tmp_path)
    assert len(found) == 1
    assert expected in found[0]
    assert upward_imports([plant(tmp_path, "loadtest", code)], root=tmp_path) == []  # the top floor may import them all


@pytest.mark.parametrize(
    "code", ["from toyworld.gold import gold_reward\n", "from toyworld import gold\n", "import toyworld.gold\n"]
)
def test_the_check_catches_a_gold_import_outside_evaluation(tmp_path: Path, code: str) -> None:
    assert len(gold_imports([plant(tmp_path, "trainer", code)], root=tmp_path)) == 1
    assert len(gold_imports([plant(tmp_path, "tests/gateway", code)], root=tmp_path)) == 1
    assert gold_imports([plant(tmp_path, "toyworld/loop", code)], root=tmp_path) == []
