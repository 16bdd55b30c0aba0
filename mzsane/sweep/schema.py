"""The config parts of the Helm chart's ``values.schema.json``, generated from ``mzsane/config.py``.

Why generated: a typo in ``sweep.config`` (``train.num_step``), a grid axis path or a run's ``set`` must fail
at ``helm install`` time, before a Ray cluster is up, and the schema that rejects it must be the same one
``mzsane train`` checks. ``config.json_schema()`` is that one declaration; this module turns it into the
chart's definitions and rewrites only those in the committed file (the rest of the schema is written by
hand). ``tests/integration/test_values_schema.py`` fails when the committed file and this output differ.

    python -m mzsane.sweep.schema --write      # after changing mzsane/config.py or the zoo registries
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "helm" / "mzsane" / "values.schema.json"

# Config paths the chart sets itself from other values (the sweep's grid, worker group, metrics): a user
# value there would be silently overwritten, so the schema rejects them in sweep.config, axes and runs.
CHART_SET_PATHS = (
    "run_name", "storage.root", "data.zoos", "data.num_models_per_zoo", "sample.target_zoo",
    "cluster.address", "cluster.num_workers", "cluster.cpus_per_worker", "cluster.use_gpu",
    "metrics.enabled", "metrics.port", "metrics.host",
)
# Chart definitions this module owns; everything else in values.schema.json is hand-written.
GENERATED = ("config", "configSet", "axes", "zooName")
# A grid axis ``path: seed`` sets every per-run seed of a point at once (the zoos are prerequisites shared by
# all points, so zoo.seed is not among them): seeds of one setting then differ in everything random. The
# chart's mzsane.points expands it to these paths, and ``sweep report`` averages over it.
SEED_AXIS, SEED_PATHS = "seed", ("data.seed", "train.seed", "sample.seed", "evaluate.seed")
# replicates rather than settings in a report: the seed axis's paths, and the read-time split (an axis of its own,
# crossed with ``seed``, varies which models are held out)
REPLICATE_PATHS = (*SEED_PATHS, "data.split_seed")


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def _leaves(section: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted path -> schema of every leaf field of a config section schema."""
    out: dict[str, dict[str, Any]] = {}
    for name, sub in section["properties"].items():
        path = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub:
            out.update(_leaves(sub, path + "."))
        else:
            out[path] = sub
    return out


def _without(section: dict[str, Any], paths: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """The section schema with the given leaf paths removed (so additionalProperties: false rejects them)."""
    out = dict(section)
    out["properties"] = {}
    for name, sub in section["properties"].items():
        path = f"{prefix}{name}"
        if path in paths:
            continue
        if sub.get("type") == "object" and "properties" in sub:
            sub = _without(sub, paths, path + ".")
        out["properties"][name] = sub
    return out


def buildable_zoo_pattern() -> str:
    """A pattern of the zoo names ``{dataset}-{architecture}`` that ``mzsane zoo build`` can make: every
    registered dataset (1 x 28 x 28 images once loaded) with every architecture whose input is 1 x 28 x 28.
    A pattern rather than an enum so that Helm's error message names the rejected value."""
    from mzsane.zoo.architectures import ARCHITECTURES
    from mzsane.zoo.datasets import DATASETS

    archs = sorted(name for name, arch in ARCHITECTURES.items()
                   if arch.defaults.get("channels_in") == 1 and arch.defaults.get("image_size") == 28)
    return f"^({'|'.join(sorted(DATASETS))})-({'|'.join(archs)})$"


def definitions() -> dict[str, Any]:
    """The generated chart definitions, keyed as in values.schema.json's ``definitions``."""
    from mzsane import config

    full = _strip_defaults(config.json_schema())
    section = {k: v for k, v in full.items() if k not in ("$schema", "title")}
    leaves = {p: s for p, s in _leaves(section).items() if p not in CHART_SET_PATHS}
    paths = sorted(leaves)
    items = {**leaves, SEED_AXIS: leaves[SEED_PATHS[0]]}  # an axis's values are checked as its path's values
    axis_entries = {p: {"type": ["object", "null"], "additionalProperties": False, "required": ["values"],
                        "properties": {"values": {"type": "array", "minItems": 1, "items": items[p]},
                                       "order": {"$ref": "#/definitions/axisOrder"}}}
                    for p in [*paths, SEED_AXIS]}
    axis_entries[SEED_AXIS]["description"] = "every seed of the point: " + ", ".join(SEED_PATHS)
    return {
        "config": {
            "description": "config overrides shared by every point (mzsane/config.py sections; the chart "
                           "sets " + ", ".join(CHART_SET_PATHS) + " itself)",
            **_without(section, CHART_SET_PATHS),
        },
        "configSet": {"description": "dotted config path -> value", "type": "object",
                      "additionalProperties": False, "properties": leaves},
        "axes": {"description": "config path -> {values, order}; null: an axis an overlay deleted; a list (the old "
                                "format) passes here so that the chart refuses it in one line saying how to convert",
                 "type": ["object", "null", "array"], "additionalProperties": False, "properties": axis_entries},
        "zooName": {"description": "a zoo mzsane zoo build can make: {dataset}-{architecture}", "type": "string",
                    "pattern": buildable_zoo_pattern()},
    }


def generate(current: dict[str, Any]) -> dict[str, Any]:
    """``current`` (the committed schema) with its generated definitions replaced by fresh ones."""
    out = copy.deepcopy(current)
    out.setdefault("definitions", {}).update(definitions())
    return out


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mzsane.sweep.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_FILE} in place")
    args = parser.parse_args(argv)
    text = dumps(generate(json.loads(SCHEMA_FILE.read_text())))
    if args.write:
        SCHEMA_FILE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
