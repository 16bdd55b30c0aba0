"""The sweep's Kubernetes objects, rendered by Helm itself.

Why this shape: a sweep *is* the chart in ``helm/mzsane`` (one ``ray.io/v1`` RayJob per point), so
``render`` goes through Helm's own Go SDK (helm-python-sdk) instead of re-implementing templating. Both
the cluster path (``sweep submit``) and the local path (``sweep run``) start from these objects, so the
two cannot drift. ``--set`` follows ``helm install --set`` (see ``parse_set``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from mzsane.config import read_yaml_file
from mzsane.errors import ConfigError
from mzsane.sweep import overlay

CHART_DIR = os.environ.get("MZSANE_CHART", str(Path(__file__).resolve().parents[2] / "helm" / "mzsane"))


def load_values(values_files: list[str], sets: list[str] | None = None) -> dict[str, Any]:
    """Values as ``helm install -f A -f B --set X`` merges them: files in order, then each ``--set`` on top."""
    values: dict[str, Any] = {}
    for path in values_files:
        values = overlay.merge(values, overlay.refuse_lists(read_values_file(path), path))
    for expression in sets or []:
        values = overlay.merge(values, overlay.refuse_lists(parse_set(expression), f"--set '{expression}'"))
    return values


def read_values_file(path: str) -> dict[str, Any]:
    """One values file's mapping, or a one-line error naming the file (the same lines as a config file's)."""
    return read_yaml_file(path, "values file", "-f", "a mapping such as 'sweep: {name: ...}'")


def parse_set(expression: str) -> dict[str, Any]:
    """One ``--set`` expression parsed by Helm's own strvals parser (types, lists and escapes as helm does)."""
    import helm_python

    try:
        return helm_python.parse_set_string(expression)
    except helm_python.HelmError as err:
        raise ConfigError(f"--set '{expression}' is not a Helm --set expression ({err}); "
                          "write it as path.to.key=value, e.g. --set sweep.grid.zooSizes={4,8}") from None


def render(values_files: list[str], release: str = "mzsane", namespace: str = "mzsane",
           chart_dir: str = CHART_DIR, sets: list[str] | None = None) -> list[dict[str, Any]]:
    """The sweep's Kubernetes objects (ConfigMaps first, then RayJobs, then any PodMonitor), via Helm."""
    import helm_python

    values = load_values(values_files, sets)
    try:
        chart = helm_python.Chart.load(chart_dir)
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmChartLoadError as err:
        raise ConfigError(f"cannot load the chart at '{chart_dir}' ({err}); set MZSANE_CHART to helm/mzsane") from None
    except helm_python.HelmError as err:
        detail = " ".join(str(err).replace("values don't meet the specifications of the schema(s) in the "
                                           "following chart(s):", "").split())
        raise ConfigError(f"values {', '.join(values_files) or '(chart defaults)'} rejected: {detail}") from None
    order = {"ConfigMap": 0, "RayJob": 1}
    objects = [doc for key, text in sorted(rendered.items()) if key.endswith((".yaml", ".yml"))
               for doc in yaml.safe_load_all(text) if doc]
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and "overrides.yaml" in obj.get("data", {}):
            _check_overrides(obj)
    return sorted(objects, key=lambda o: order.get(o.get("kind", ""), 2))


def is_test_hook(obj: dict[str, Any]) -> bool:
    """``helm test`` pods: rendered like ``helm template`` does, never created by ``helm install``."""
    hooks = str(((obj.get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook", ""))
    return bool(hooks) and all(h.strip() in ("test", "test-success") for h in hooks.split(","))


def _check_overrides(config_map: dict[str, Any]) -> None:
    """Load a point's overrides into a real Config now, so a typo in a config path fails before submission."""
    from mzsane import config, presets

    point = json.loads(config_map["data"].get("point.json", "{}"))
    try:
        config.from_dict(yaml.safe_load(config_map["data"]["overrides.yaml"]) or {},
                         base=presets.PRESETS[point.get("preset", "default")]())
    except ConfigError as err:
        raise ConfigError(f"sweep point '{point.get('point', config_map['metadata']['name'])}': {err}") from None



def render_cli(args: argparse.Namespace) -> None:
    objects = render(args.values, args.release, args.namespace, sets=getattr(args, "sets", None) or [])
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
