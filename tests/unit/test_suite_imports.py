"""No test module imports another test module (DESIGN section 2: fixtures are shared through fixture modules,
``tests/fixtures/`` and conftest). Importing a test module runs its module-level code and collects nothing,
ties one test's helpers to another's file, and under pytest's rootdir imports can load a second copy of it.

Scanned as text, not only as Python imports, so the scripts tests run as child processes count too.
"""
from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(?P<package>[\w.]+)[ \t]+import[ \t]+(?P<names>\([^)]*\)|[^\n#]+)"
                     r"|import[ \t]+(?P<modules>[^\n#]+))", re.MULTILINE)


def is_test_module(module: str) -> bool:
    """A module under tests/ named ``test_*`` (absolute ``tests.…`` or relative ``.…``)."""
    parts = module.lstrip(".").split(".")
    return (module.startswith(".") or parts[0] == "tests") and any(p.startswith("test_") for p in parts)


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for each test module an import line of ``source`` loads (relative ones with their dots)."""
    out = []
    for match in _IMPORT.finditer(source):
        line = source.count("\n", 0, match.start()) + 1
        if match["modules"]:
            modules = [m.split()[0] for m in match["modules"].split(",") if m.strip()]
        elif is_test_module(match["package"]):
            modules = [match["package"]]
        else:  # ``from tests.unit import test_x``: the names may be modules themselves
            package, names = match["package"], match["names"].strip("() \n")
            sep = "" if package.endswith(".") else "."
            modules = [f"{package}{sep}{n.split()[0]}" for n in re.split(r"[,\n]", names) if n.strip()]
        out += [(line, m) for m in modules if is_test_module(m)]
    return out


def imports_of_test_modules(tests: Path = TESTS) -> list[str]:
    """``path:line imports module`` for each import of a test module below ``tests``."""
    return [f"{path.relative_to(tests.parent)}:{line} imports {module}"
            for path in sorted(tests.rglob("*.py"))
            for line, module in imported_test_modules(path.read_text(encoding="utf-8"))]


def test_no_test_module_imports_another():
    found = imports_of_test_modules()
    assert not found, ("move what these share into a fixture module (tests/fixtures/) and import it from there:\n"
                       + "\n".join(found))


def test_the_scan_sees_every_way_of_importing_a_test_module():
    lines = ["from tests.unit.test_shards import make_zoo", "    from tests.unit import test_shards, test_windows",
             "import tests.unit.test_train_loop as loop", "from .test_selection import _toy_zoo",
             "from . import test_store", "from tests.unit import (\n    conftest,\n    test_halo,\n)"]
    flagged = [m for line in lines for _, m in imported_test_modules(line)]
    assert flagged == ["tests.unit.test_shards", "tests.unit.test_shards", "tests.unit.test_windows",
                       "tests.unit.test_train_loop", ".test_selection", ".test_store", "tests.unit.test_halo"]
    fine = ["from tests.fixtures.zoos import make_zoo", "from tests.conftest import requires",
            "from torch.testing import assert_close", "import pytest", "from mzsane.zoo import synthetic"]
    assert not [m for line in fine for _, m in imported_test_modules(line)]
