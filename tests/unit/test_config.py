"""Config: presets, YAML files, --set overrides and strict validation."""
import dataclasses
import json
import math

import jsonschema
import pytest

from mzsane import config, presets
from mzsane.errors import ConfigError
from mzsane.sweep import chart


def test_presets_build_and_validate():
    for name in presets.PRESETS:
        cfg = config.load(presets.named(name))
        assert isinstance(cfg, config.Config)
    assert config.load(presets.tiny()).model.d_model < config.load(presets.paper()).model.d_model
    assert config.load(presets.paper()).model.max_positions == [60000, 150, 600]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_steps: 7\n  lr: 0.5\ndata:\n  zoos: [a, b]\n")
    cfg = config.load(presets.tiny(), [str(path)], ["train.lr=0.25", "data.num_models_per_zoo=50",
                                                    "loss.norm_mode=batch", "data.zoos=[x]",
                                                    "augment.avoid_identity=false"])
    assert cfg.train.num_steps == 7
    assert cfg.train.lr == 0.25
    assert cfg.data.num_models_per_zoo == 50
    assert cfg.loss.norm_mode == "batch"
    assert cfg.data.zoos == ["x"]
    assert cfg.augment.avoid_identity is False


def test_comma_list_override():
    cfg = config.load(None, [], ["data.zoos=mnist-cnn_s,fashion_mnist-cnn_s"])
    assert cfg.data.zoos == ["mnist-cnn_s", "fashion_mnist-cnn_s"]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(presets.tiny(), [], ["train.num_stepz=3"])
    message = str(info.value)
    assert "train.num_stepz" in message and "num_steps" in message and "\n" not in message
    path = tmp_path / "bad.yaml"
    path.write_text("trian:\n  num_steps: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*train"):
        config.load(presets.tiny(), [str(path)])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="train.num_steps' must be an integer"):
        config.load(presets.tiny(), [], ["train.num_steps=many"])
    with pytest.raises(ConfigError, match="norm_mode"):
        config.load(presets.tiny(), [], ["loss.norm_mode=perlayer"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid presets: default, tiny"):
        presets.named("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(presets.tiny(), [str(tmp_path / "missing.yaml")])
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(presets.tiny(), [str(bad)])
    with pytest.raises(ConfigError, match="not of the form"):
        config.load(presets.tiny(), [], ["train.num_steps"])


def test_dump_roundtrip():
    cfg = config.load(presets.tiny(), [], ["run_name=r1", "train.lr=0.125"])
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
    cfg = config.load(presets.tiny(), [str(path)])
    tiny = presets.tiny()
    assert cfg.sample.target_zoo == "mnist-cnn_s" and cfg.train.num_steps == 7
    assert cfg.sample.num_anchors == tiny.sample.num_anchors != config.SampleConfig().num_anchors
    assert cfg.train.batch_size == tiny.train.batch_size


def _one_line_error(overrides, *needles):
    with pytest.raises(ConfigError) as info:
        config.load(presets.tiny(), [], overrides)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_counts_must_be_at_least_one():
    # batch_size 0 used to hang forever with growing memory; num_steps -5 exited 0 with an empty run
    _one_line_error(["train.batch_size=0"], "train.batch_size", "= 0", ">= 1")
    _one_line_error(["train.num_steps=-5"], "train.num_steps", "-5", ">= 1")
    _one_line_error(["model.num_heads=0"], "model.num_heads", ">= 1")
    _one_line_error(["model.d_model=-4"], "model.d_model", "-4")


def test_rates_must_be_positive_and_finite():
    _one_line_error(["train.lr=-1"], "train.lr", "-1.0", "> 0")
    _one_line_error(["train.lr=0"], "train.lr", "> 0")
    _one_line_error(["train.lr=.nan"], "train.lr", "nan")
    _one_line_error(["train.lr=.inf"], "train.lr", "finite")
    assert math.isinf(config.load(presets.tiny(), [], ["tokens.weight_threshold=.inf"]).tokens.weight_threshold)


def test_upper_bounds():
    _one_line_error(["loss.gamma=1.5"], "loss.gamma", "<= 1")
    _one_line_error(["model.dropout=1.0"], "model.dropout", "< 1")
    _one_line_error(["metrics.port=70000"], "metrics.port", "<= 65535")


def test_integers_are_not_truncated():
    _one_line_error(["train.num_steps=1.5"], "train.num_steps", "integer", "1.5")
    _one_line_error(["train.num_steps='1.5'"], "train.num_steps", "integer")
    assert config.load(presets.tiny(), [], ["train.num_steps=3.0"]).train.num_steps == 3  # exact, not truncated


def test_choices_and_sentinels():
    _one_line_error(["train.precision=fp8"], "train.precision", "'fp8'", "auto, fp32, bf16, fp16")
    _one_line_error(["data.num_models_per_zoo=0"], "data.num_models_per_zoo", ">= 1 or -1")
    _one_line_error(["train.checkpoint_every_n_steps=-2"], "train.checkpoint_every_n_steps", "or -1")
    assert config.load(presets.tiny(), [], ["train.checkpoint_every_n_steps=-1"]).train.checkpoint_every_n_steps == -1


def test_list_length_and_items():
    _one_line_error(["shards.split_fractions=[0.5, 0.5]"], "shards.split_fractions", "exactly 3")
    _one_line_error(["shards.split_fractions=[1.5, -0.25, -0.25]"], "shards.split_fractions[0]", "<= 1")
    _one_line_error(["evaluate.soup_sizes=[1, 0]"], "evaluate.soup_sizes[1]", ">= 1")


def test_cross_field_rules():
    _one_line_error(["model.num_heads=3"], "model.d_model=32", "model.num_heads=3")
    _one_line_error(["shards.split_fractions=[0.5, 0.25, 0.125]"], "sum to 1")
    _one_line_error(["sample.num_keep=9"], "sample.num_keep=9", "num_candidates=8")


def test_yaml_file_values_are_validated_too(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: -3\n")
    with pytest.raises(ConfigError, match=r"train.batch_size' = -3 is out of range"):
        config.load(presets.tiny(), [str(path)])


def test_config_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        config.load(presets.tiny(), [str(tmp_path)])
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("read", "what", "flag"),
                         [(lambda path: config.load(presets.tiny(), [path]), "config file", "--config"),
                          (lambda path: chart.load_values([path]), "values file", "-f")],
                         ids=["config", "sweep-values"])
def test_yaml_files_fail_in_one_line_naming_the_file_and_its_option(tmp_path, read, what, flag):
    """Config files and the sweep's values files are read by one reader: the same line for each way a file is wrong."""
    (tmp_path / "latin1.yaml").write_bytes(b"train: caf\xe9\n")
    (tmp_path / "broken.yaml").write_text("a: 1\nb: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    for name, problem in (("missing.yaml", f"does not exist; pass an existing YAML file to {flag}"),
                          ("", f"is a directory; pass a YAML file to {flag}"),
                          ("latin1.yaml", f"is not UTF-8 text; pass a YAML file to {flag}"),
                          ("broken.yaml", "is not valid YAML (line 3); fix the syntax"),
                          ("list.yaml", "must hold a mapping")):
        path = str(tmp_path / name) if name else str(tmp_path)
        with pytest.raises(ConfigError) as info:
            read(path)
        assert str(info.value).startswith(f"{what} '{path}' {problem}"), str(info.value)
        assert "\n" not in str(info.value)


def test_schema_is_draft7_and_matches_the_cli_rules():
    schema = config.json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    # the presets pass both checks
    for name in presets.PRESETS:
        values = json.loads(json.dumps(config.to_dict(config.load(presets.named(name))), allow_nan=True))
        values["tokens"].pop("weight_threshold")  # inf is not JSON
        assert not list(validator.iter_errors(values)), name
    train = schema["properties"]["train"]
    assert train["additionalProperties"] is False
    assert train["properties"]["batch_size"] == {"type": "integer", "minimum": 1, "default": 16}
    assert train["properties"]["lr"]["exclusiveMinimum"] == 0
    assert train["properties"]["precision"]["enum"] == ["auto", "fp32", "bf16", "fp16"]
    assert not validator.is_valid({"train": {"num_stepz": 3}})
    assert not validator.is_valid({"data": {"num_models_per_zoo": 0}})  # >= 1 or the sentinel -1
    assert validator.is_valid({"data": {"num_models_per_zoo": -1}})
    # every field whose schema has a bound: a value just past it is refused by the schema AND by the CLI
    checked = 0
    for section, sub in schema["properties"].items():
        for key, prop in sub.get("properties", {}).items():
            bound = prop.get("anyOf", [prop])[0]
            if "minimum" in bound:
                bad = bound["minimum"] - (1 if prop["type"] == "integer" else 0.5)
            elif "exclusiveMinimum" in bound:
                bad = bound["exclusiveMinimum"]
            else:
                continue
            if bad in prop.get("anyOf", [{}, {}])[1].get("enum", []):
                bad -= 1
            assert not validator.is_valid({section: {key: bad}}), (section, key, bad)
            with pytest.raises(ConfigError, match=f"{section}.{key}"):
                config.load(presets.tiny(), [], [f"{section}.{key}={bad}"])
            checked += 1
    assert checked > 50


# what `mzsane demo` applied as --set strings over the default preset before the demo became a preset (issue 27)
OLD_DEMO_SETTINGS = ["zoo.num_threads=2", "cluster.num_workers=2", "train.batch_size=8",
                     "zoo.extra_zoos=[mnist:resnet_mini,digits:cnn_s]", "train.lr=1e-3",
                     "train.num_epochs=150", "train.checkpoint_every_n_steps=200",
                     "train.eval_every_n_steps=200", "sample.max_val_images=2000", "evaluate.max_train_models=10"]
OLD_QUICK_SETTINGS = ["zoo.num_models=10", "zoo.num_epochs=2", "zoo.max_train_images=2000",
                      "zoo.max_eval_images=500", "zoo.extra_zoos=[]", "train.checkpoint_every_n_steps=100",
                      "train.eval_every_n_steps=100", "sample.num_candidates=40", "sample.num_keep=5",
                      "sample.num_anchors=3", "sample.candidate_batch_size=20", "evaluate.finetune_epochs=1",
                      "evaluate.finetune_max_train_images=2000", "evaluate.num_novelty_images=500",
                      "evaluate.max_train_models=6", "evaluate.num_random=3"]


def test_the_demo_presets_are_the_old_demo_settings_exactly():
    """Same values and types (150.0, not 150): the demo's stage markers and run names hash these sections."""
    assert config.dumps(presets.demo()) == config.dumps(config.load(None, [], OLD_DEMO_SETTINGS))
    old_quick = config.load(None, [], OLD_DEMO_SETTINGS + OLD_QUICK_SETTINGS)
    assert config.dumps(presets.demo_quick()) == config.dumps(old_quick)


def test_load_starts_from_a_base_config_and_leaves_it_as_it_was(tmp_path):
    base = presets.small()
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_steps: 7\n")
    cfg = config.load(base, [str(path)], ["train.lr=0.5"])
    assert (cfg.model.d_model, cfg.train.num_steps, cfg.train.lr) == (512, 7, 0.5)
    assert base == presets.small()
    assert config.load() == config.Config()


def test_config_does_not_import_presets():
    """Presets build on config's sections; config knowing the presets was an import cycle."""
    import subprocess
    import sys

    code = "import sys, mzsane.config; print('mzsane.presets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
