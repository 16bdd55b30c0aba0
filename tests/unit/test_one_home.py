"""One home for each shared thing, read from the source: a second place that connects to Ray or renders a figure
is how the copies that issue 27 removed come back."""
from __future__ import annotations

import re
from pathlib import Path

import mzsane

PACKAGE = Path(mzsane.__file__).parent


def _places(pattern: str) -> dict[str, int]:
    """Modules of ``mzsane/`` whose text matches ``pattern``, with how often (code in strings counts too: a probe
    run with ``python -c`` connects as well)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        count = len(re.findall(pattern, path.read_text(encoding="utf-8")))
        if count:
            found[path.relative_to(PACKAGE).as_posix()] = count
    return found


def test_only_the_launcher_connects_to_ray():
    assert _places(r"\bray\.init\(") == {"train/launch.py": 1}, "connect through mzsane.train.launch.connect_ray"


def test_only_storage_renders_figures():
    assert _places(r"\.savefig\(") == {"storage.py": 1}, "write figures with mzsane.storage.write_figure"
