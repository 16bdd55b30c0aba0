"""The chart's values.schema.json agrees with mzsane/config.py: its config parts (sweep.config, grid axis
paths and values, runs[].set, zoo names) are what ``python -m mzsane.sweep.schema`` generates now, so a
config field added, renamed or constrained in Python cannot be forgotten in the chart."""
from __future__ import annotations

import json

import pytest

from mzsane import config
from mzsane.sweep import schema

pytestmark = pytest.mark.integration


def test_committed_values_schema_equals_the_generated_one():
    committed = json.loads(schema.SCHEMA_FILE.read_text())
    assert schema.generate(committed) == committed, (
        "helm/mzsane/values.schema.json is out of date with mzsane/config.py: run "
        "`.venv/bin/python -m mzsane.sweep.schema --write`")
    assert schema.dumps(committed) == schema.SCHEMA_FILE.read_text()  # and written as the generator writes it


def test_every_config_field_is_settable_or_set_by_the_chart():
    committed = json.loads(schema.SCHEMA_FILE.read_text())["definitions"]
    settable = set(committed["configSet"]["properties"])
    leaves = set(schema._leaves({k: v for k, v in config.json_schema().items() if k == "properties"}))
    assert leaves == settable | set(schema.CHART_SET_PATHS)
    assert not settable & set(schema.CHART_SET_PATHS)
    assert committed["configSet"]["properties"]["loss.norm_mode"]["enum"] == \
        config.json_schema()["properties"]["loss"]["properties"]["norm_mode"]["enum"]
