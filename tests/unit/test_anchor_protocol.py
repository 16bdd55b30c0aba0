"""The paper's protocol (seen anchors) has one definition: the demo and the sweep points apply the same
overrides, including the cap at the models the backbone read of the zoo."""
from __future__ import annotations

from mzsane import demo, presets
from mzsane.sample.protocol import SEEN_ANCHORS_FOLDER, section_overrides, seen_overrides


def test_seen_protocol_draws_from_the_seen_pool_capped_at_the_models_read_without_the_finetuning_arms():
    assert seen_overrides(5, 3) == {"sample.anchor_pool": "seen", "sample.num_anchors": 3,
                                    "evaluate.finetune_epochs": 0, "evaluate.hypernet_steps": 0}
    assert seen_overrides(5, 32)["sample.num_anchors"] == 5
    assert seen_overrides(5, -1)["sample.num_anchors"] == 5  # -1 = every train model: no cap known
    assert section_overrides(seen_overrides(5, 3), "sample") == {"sample.anchor_pool": "seen",
                                                                 "sample.num_anchors": 3}


class _Recorder:
    """Stands in for the demo's stage runner: keeps the settings each stage would run with."""

    def __init__(self):
        self.settings: dict[str, dict] = {}

    def run(self, name, settings, fn):
        self.settings[name] = settings
        return {}


def test_the_demo_runs_the_seen_protocol_the_sweep_runs_capped_at_its_zoo(tmp_path):
    cfg = presets.PRESETS["demo_quick"]()
    cfg.sample.num_anchors, cfg.data.num_models_per_zoo = 5, 3
    stages = _Recorder()
    demo._seen_anchors(stages, cfg, "run", "zoo", str(tmp_path / "out"), "single-mnist")
    sample = stages.settings["sample-seen-single-mnist"]["sample"]
    evaluate = stages.settings["evaluate-seen-single-mnist"]["evaluate"]
    assert (sample["anchor_pool"], sample["num_anchors"]) == ("seen", 3)
    assert (evaluate["finetune_epochs"], evaluate["hypernet_steps"]) == (0, 0)
    assert cfg.sample.anchor_pool == "held_out" and cfg.sample.num_anchors == 5  # the held-out run's config untouched
    assert SEEN_ANCHORS_FOLDER == "anchors-seen"  # the folder sweep reports read: renaming it orphans old results
