"""The anchor protocols a target is evaluated under: ours (held-out anchors) and the paper's (seen anchors).

Why one home: the demo and every sweep point run the paper's protocol beside the held-out headline, and the
sweep report reads both back. Written twice, the two drifted: only the sweep capped the seen pool's anchor
count at the models the backbone read, so a demo with a small zoo would have failed where a sweep point ran.
Here the protocol is a set of dotted overrides that each caller applies its own way (``--set`` on a stage's
command line, or onto a config), plus the folder its results sit in beside the held-out ones.

This module is light on purpose (no torch): ``sweep run-point`` plans its stages with it inside every RayJob.
"""
from __future__ import annotations

from typing import Any

SEEN_ANCHORS_FOLDER = "anchors-seen"  # beside a target's held-out samples; the sweep report reads it as "seen"


def seen_overrides(num_anchors: int, train_models: int = 0) -> dict[str, Any]:
    """Dotted settings that turn a held-out sample + evaluate pair into the paper's protocol.

    The anchors come from the models the backbone trained on (``sample.anchor_pool=seen``), at most as many as it
    read of that zoo (``train_models``; 0 = not known, no cap): a 4-model backbone has 4 seen anchors, not the
    preset's 5. Fine-tuning and the HyperNetwork start are left out: they measure the starts the held-out run
    already compares, and would double its cost."""
    count = min(int(num_anchors), int(train_models)) if train_models > 0 else int(num_anchors)
    return {"sample.anchor_pool": "seen", "sample.num_anchors": count,
            "evaluate.finetune_epochs": 0, "evaluate.hypernet_steps": 0}


def section_overrides(overrides: dict[str, Any], section: str) -> dict[str, Any]:
    """The overrides of one config section (``sample`` or ``evaluate``): each stage gets only its own."""
    return {k: v for k, v in overrides.items() if k.split(".", 1)[0] == section}
