"""Values files stack entry by entry: runs, compositions and axes are keyed, so an overlay changes, adds or
deletes one of them and keeps the rest; list files are refused in one line, and ``sweep convert`` turns a list
stack into a keyed one that renders the same points."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

from mzsane import cli
from mzsane.errors import ConfigError
from mzsane.sweep import chart, overlay
from mzsane.sweep.point import rendered_points

SEEDS = ("data.seed", "train.seed", "sample.seed", "evaluate.seed")
BASE = {"sweep": {"name": "ov", "preset": "tiny", "targetZoo": "mnist-cnn_s",
                  "grid": {"zooSizes": [4],
                           "compositions": {"mnist": {"zoos": ["mnist-cnn_s"]},
                                            "fashion": {"zoos": ["fashion_mnist-cnn_s"]}},
                           "axes": {"loss.norm_mode": {"values": ["token", "layer"]}}},
                  "runs": {f"wide-{i}": {"zooSize": 4, "zoos": ["mnist-cnn_s"],
                                         "set": {"model.d_model": 64, **dict.fromkeys(SEEDS, i)}} for i in range(3)}},
        "worker": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}}}


def _write(tmp_path: Path, values: dict) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _points(files: list[str], sets: list[str] | None = None) -> dict[str, dict]:
    """Point name -> its ConfigMap's overrides, in rendered order."""
    return {p.name: p.overrides for p in rendered_points(chart.render(files, sets=sets))}


def test_merge_is_helms_merge_maps_merge_lists_and_scalars_replace_null_stays():
    base = {"a": {"b": 1, "c": [1, 2], "m": {"x": 1}}, "s": "x"}
    assert overlay.merge(base, {"a": {"c": [3], "m": None, "n": {"y": 2}}, "s": {"t": 1}}) == {
        "a": {"b": 1, "c": [3], "m": None, "n": {"y": 2}}, "s": {"t": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2], "m": {"x": 1}}, "s": "x"}  # inputs untouched


def test_an_overlay_changing_one_runs_set_keeps_the_other_runs(tmp_path):
    base = _write(tmp_path, BASE)
    before = _points([base])
    after = _points([base, _write(tmp_path, {"sweep": {"runs": {"wide-1": {"set": {"model.d_model": 128}}}}})])
    assert list(after) == list(before)  # same points, same names, same order: a half-run sweep resumes
    assert after["wide-1"]["model"]["d_model"] == 128
    assert after["wide-1"]["data"]["seed"] == after["wide-1"]["train"]["seed"] == 1  # the rest of its set stays
    assert {k: v for k, v in after.items() if k != "wide-1"} == {k: v for k, v in before.items() if k != "wide-1"}


def test_an_overlay_adds_a_run_and_an_axis_value_set_beside_the_base_ones(tmp_path):
    base = _write(tmp_path, BASE)
    added = _points([base, _write(tmp_path, {"sweep": {
        "runs": {"deep": {"zooSize": 4, "zoos": ["mnist-cnn_s"], "set": {"model.num_layers": 2}}},
        "grid": {"axes": {"seed": {"values": [0, 1]}}}}})])
    assert list(added) == [f"n4-{c}-{m}-{s}" for c in ("fashion", "mnist") for m in ("token", "layer") for s in (0, 1)
                           ] + ["deep", "wide-0", "wide-1", "wide-2"]  # runs in name order, after the grid
    assert added["n4-mnist-layer-1"]["loss"]["norm_mode"] == "layer" and added["n4-mnist-layer-1"]["train"]["seed"] == 1


def test_null_deletes_an_entry_from_a_file_or_a_set(tmp_path):
    base = _write(tmp_path, BASE)
    kept = _points([base, _write(tmp_path, {"sweep": {"runs": {"wide-0": None},
                                                      "grid": {"compositions": {"fashion": None},
                                                               "axes": {"loss.norm_mode": None}}}})],
                   sets=["sweep.runs.wide-2=null"])
    assert list(kept) == ["n4-mnist", "wide-1"]
    # a deleted entry can come back in a later file, as any Helm map key
    back = _points([base, _write(tmp_path, {"sweep": {"runs": {"wide-0": None}}}),
                    _write(tmp_path, {"sweep": {"runs": {"wide-0": {"zooSize": 4, "zoos": ["mnist-cnn_s"]}}}})])
    assert "wide-0" in back and "model" not in back["wide-0"]
    # and `runs: null` deletes them all
    assert not [n for n in _points([base, _write(tmp_path, {"sweep": {"runs": None}})]) if n.startswith("wide")]


def test_axes_are_crossed_and_named_by_order_then_path(tmp_path):
    base = _write(tmp_path, BASE)
    axes = {"train.lr": {"values": [0.01]}, "loss.norm_mode": {"values": ["token"]}}
    first = _write(tmp_path, {"sweep": {"runs": None, "grid": {"axes": axes}}})
    assert list(_points([base, first])) == ["n4-fashion-token-0-01", "n4-mnist-token-0-01"]  # loss.* < train.*
    axes["loss.norm_mode"]["order"] = 1
    last = _write(tmp_path, {"sweep": {"runs": None, "grid": {"axes": axes}}})
    assert list(_points([base, last])) == ["n4-fashion-0-01-token", "n4-mnist-0-01-token"]


@pytest.mark.parametrize("section,old", [
    ("sweep.runs", {"sweep": {"runs": [{"name": "r", "zooSize": 4, "zoos": ["mnist-cnn_s"]}]}}),
    ("sweep.grid.compositions", {"sweep": {"grid": {"compositions": [{"name": "m", "zoos": ["mnist-cnn_s"]}]}}}),
    ("sweep.grid.axes", {"sweep": {"grid": {"axes": [{"path": "seed", "values": [0]}]}}}),
])
def test_a_list_file_is_refused_in_one_line_naming_the_converter(section, old, tmp_path):
    path = _write(tmp_path, old)
    with pytest.raises(ConfigError) as err:
        chart.render([_write(tmp_path, BASE), path])
    message = str(err.value)
    assert "\n" not in message and f"'{path}': {section} is a list" in message
    assert f"mzsane sweep convert -f {path}" in message
    with pytest.raises(ConfigError, match=r"--set 'sweep.grid.axes\[0\].path=seed'.*sweep.grid.axes.NAME"):
        chart.load_values([], ["sweep.grid.axes[0].path=seed"])


def test_convert_turns_a_list_stack_into_keyed_files_with_the_same_points(tmp_path, capsys):
    """The old stack: the overlay's lists replaced the base's. Expected points written out by hand from the
    list semantics: grid x the overlay's axes in its order (train.lr before loss.norm_mode), then its one run."""
    base = _write(tmp_path, {"sweep": {**BASE["sweep"], "grid": {
        "zooSizes": [4], "compositions": [{"zoos": ["mnist-cnn_s", "digits-cnn_s"]}],
        "axes": [{"path": "seed", "values": [0, 1]}]},
        "runs": [{"name": "a", "zooSize": 4, "zoos": ["mnist-cnn_s"]}, {"name": "b", "zooSize": 4,
                                                                        "zoos": ["mnist-cnn_s"]}]},
        "worker": BASE["worker"]})
    over = _write(tmp_path, {"sweep": {"grid": {"axes": [{"path": "train.lr", "values": [0.01]},
                                                          {"path": "loss.norm_mode", "values": ["token"]}]},
                                       "runs": [{"name": "c", "zooSize": 4, "zoos": ["fashion_mnist-cnn_s"],
                                                 "composition": "f"}]}})
    assert cli.main(["sweep", "convert", "-f", base, "-f", over]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    keyed = [_write(tmp_path, doc) for doc in docs]
    points = rendered_points(chart.render(keyed))
    assert [p.name for p in points] == ["n4-mnist-cnn-s-digits-cnn-s-0-01-token", "c"]
    record = json.loads(points[0].files["point.json"])
    assert record["composition"] == "mnist-cnn_s+digits-cnn_s"  # a nameless composition's old label
    assert record["axes"] == {"train.lr": 0.01, "loss.norm_mode": "token"}
    assert docs[1]["sweep"]["runs"] == {"c": {"zooSize": 4, "zoos": ["fashion_mnist-cnn_s"], "composition": "f"},
                                        "a": None, "b": None}
    assert docs[1]["sweep"]["grid"]["axes"]["seed"] is None
