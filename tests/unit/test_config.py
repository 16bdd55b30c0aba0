"""Config: presets, YAML files, --set overrides and strict validation."""
import dataclasses
import math

import pytest

from mzsane import config, presets
from mzsane.errors import ConfigError


def test_presets_build_and_validate():
    for name in presets.PRESETS:
        cfg = config.load(name)
        assert isinstance(cfg, config.Config)
    assert config.load("tiny").model.d_model < config.load("paper").model.d_model
    assert config.load("paper").model.max_positions == [60000, 150, 600]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_steps: 7\n  lr: 0.5\ndata:\n  zoos: [a, b]\n")
    cfg = config.load("tiny", [str(path)], ["train.lr=0.25", "data.num_models_per_zoo=50", "loss.norm_mode=batch",
                                           "data.zoos=[x]", "augment.avoid_identity=false"])
    assert cfg.train.num_steps == 7
    assert cfg.train.lr == 0.25
    assert cfg.data.num_models_per_zoo == 50
    assert cfg.loss.norm_mode == "batch"
    assert cfg.data.zoos == ["x"]
    assert cfg.augment.avoid_identity is False


def test_comma_list_override():
    cfg = config.load("default", [], ["data.zoos=mnist-cnn_s,fashion_mnist-cnn_s"])
    assert cfg.data.zoos == ["mnist-cnn_s", "fashion_mnist-cnn_s"]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load("tiny", [], ["train.num_stepz=3"])
    message = str(info.value)
    assert "train.num_stepz" in message and "num_steps" in message and "\n" not in message
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  num_steps: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*train"):
        config.load("tiny", [str(path)])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="train.num_steps' must be a int"):
        config.load("tiny", [], ["train.num_steps=many"])
    with pytest.raises(ConfigError, match="norm_mode"):
        config.load("tiny", [], ["loss.norm_mode=perlayer"])
    with pytest.raises(ConfigError, match="unknown preset"):
        config.load("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("tiny", [str(tmp_path / "missing.yaml")])
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load("tiny", [str(bad)])
    with pytest.raises(ConfigError, match="not of the form"):
        config.load("tiny", [], ["train.num_steps"])


def test_dump_roundtrip():
    cfg = config.load("tiny", [], ["run_name=r1", "train.lr=0.125"])
    again = config.loads(config.dumps(cfg))
    assert again == cfg
    assert math.isinf(again.tokens.weight_threshold)


def test_sections_are_independent_instances():
    a, b = presets.tiny(), presets.tiny()
    a.data.zoos.append("z")
    assert b.data.zoos == []
    assert all(dataclasses.is_dataclass(getattr(a, f.name)) for f in dataclasses.fields(a) if f.name != "run_name")


def test_a_file_section_merges_onto_the_preset(tmp_path):
    path = tmp_path / "point.yaml"
    path.write_text("sample:\n  target_zoo: mnist-cnn_s\ntrain:\n  num_steps: 7\n")
    cfg = config.load("tiny", [str(path)])
    tiny = presets.tiny()
    assert cfg.sample.target_zoo == "mnist-cnn_s" and cfg.train.num_steps == 7
    assert cfg.sample.num_anchors == tiny.sample.num_anchors != config.SampleConfig().num_anchors
    assert cfg.train.batch_size == tiny.train.batch_size
