"""One home for each shared thing, read from the source: a second place that connects to Ray, renders a figure or
defines backbone inference is how the copies that issue 27 removed come back."""
from __future__ import annotations

import re
from pathlib import Path

import mzsane

PACKAGE = Path(mzsane.__file__).parent
# a module-level import of storage, the train stage, Ray, fsspec or s3fs
MODULE_LEVEL_INFRA = (r"(?m)^(from mzsane import .*\b(storage|train)\b"
                      r"|(from|import) (mzsane\.(storage|train)|ray|fsspec|s3fs)\b)")


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


def test_backbone_inference_is_defined_in_model_only():
    defined = _places(r"(?m)^def (load_backbone|condition_bn|halo_apply|has_batchnorm)\(")
    assert defined == {"model/backbone.py": 3, "model/halo.py": 1}, defined


def test_model_stays_pure_torch_at_import():
    """Checkpoints are read through storage (fsspec): model/backbone.py imports them inside ``load_backbone``."""
    found = _places(MODULE_LEVEL_INFRA)
    assert not [path for path in found if path.startswith("model/")], found
