"""No Helm value reaches a shell or breaks out of its YAML scalar.

Every free-text value of the chart gets a payload carrying a quote, ``;``, ``$(...)``, backticks and a
newline followed by a pod-security-defeating key. For each value the chart either refuses it (one line
naming the value) or renders it so that the objects differ from a safe rendering only in leaves that hold
the payload itself (no new key such as ``hostPID``). Then the RayJob's entrypoint runs under bash the way
KubeRay's submitter runs it (``bash -ce "... -- ENTRYPOINT ;"``, with stub ``ray`` and ``python``), and the
point's stages run through ``run-point`` with a stub interpreter: no injected command may run.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("helm_python")

from mzsane.errors import ConfigError
from mzsane.sweep import chart, local
from mzsane.sweep.point import rendered_points, run_point
from mzsane.sweep.schema import SCHEMA_FILE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = [str(ROOT / "jobs" / "smoke.yaml"), str(ROOT / "jobs" / "local" / "smoke.yaml")]
MARK = "PWNED"


def payload(indent: int) -> str:
    """Shell metacharacters, then keys on new lines at ``indent`` spaces (where a pod spec's keys may sit).
    Short, so that length limits do not hide what the patterns and the quoting must stop; the mark file is
    made in the working directory of whatever runs it."""
    touch = f"touch${{IFS}}{MARK}"
    pad = " " * indent
    return f"x';{touch};echo${{IFS}}'$({touch})`{touch}`\n{pad}hostPID: true\n{pad}hostNetwork: true"


RUN = {"zooSize": 2, "zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s"]}
# schema path of each free-text value -> values that put the text there
CASES: dict[str, Any] = {
    "nameOverride": lambda t: {"nameOverride": t},
    "fullnameOverride": lambda t: {"fullnameOverride": t},
    "image.repository": lambda t: {"image": {"repository": t}},
    "image.tag": lambda t: {"image": {"tag": t}},
    "image.pullSecrets[]": lambda t: {"image": {"pullSecrets": [t]}},
    "sweep.runs.*.composition": lambda t: {"sweep": {"runs": {"smoke": {"composition": t}}}},
    "sweep.runs<key>": lambda t: {"sweep": {"runs": {"smoke": None, t: RUN}}},  # the smoke run renamed
    "sweep.grid.compositions<key>": lambda t: {"sweep": {"runs": None, "grid": {
        "zooSizes": [2], "compositions": {t: {"zoos": ["mnist-cnn_s"]}}}}},
    "sweep.config": lambda t: {"sweep": {"config": {"zoo": {"recipe": t}}}},
    "sweep.runs.*.set": lambda t: {"sweep": {"runs": {"smoke": {"set": {"cluster.node_ip": t}}}}},
    "storage.root": lambda t: {"storage": {"root": f"s3://mzsane/{t}"}},
    "storage.shardsUrl": lambda t: {"storage": {"shardsUrl": f"s3://mzsane/{t}"}},
    "storage.s3.endpoint": lambda t: {"storage": {"s3": {"endpoint": f"http://host/{t}"}}},
    "storage.s3.region": lambda t: {"storage": {"s3": {"region": t}}},
    "storage.s3.credentialsSecret.accessKeyIdKey": lambda t: {"storage": {"s3": {"credentialsSecret": {
        "accessKeyIdKey": t}}}},
    "storage.s3.credentialsSecret.secretAccessKeyKey": lambda t: {"storage": {"s3": {"credentialsSecret": {
        "secretAccessKeyKey": t}}}},
    "head.nodeSelector.*": lambda t: {"head": {"nodeSelector": {"zone": t}}},
    "head.nodeSelector<key>": lambda t: {"head": {"nodeSelector": {t: "a"}}},
    "head.tolerations[].key": lambda t: {"head": {"tolerations": [{"key": t, "operator": "Exists"}]}},
    "head.tolerations[].value": lambda t: {"head": {"tolerations": [{"key": "k", "operator": "Equal", "value": t}]}},
    "worker.nodeSelector.*": lambda t: {"worker": {"nodeSelector": {"zone": t}}},
    "worker.nodeSelector<key>": lambda t: {"worker": {"nodeSelector": {t: "a"}}},
    "worker.tolerations[].key": lambda t: {"worker": {"tolerations": [{"key": t, "operator": "Exists"}]}},
    "worker.tolerations[].value": lambda t: {"worker": {"tolerations": [{"key": "k", "operator": "Equal",
                                                                          "value": t}]}},
    "pod.labels.*": lambda t: {"pod": {"labels": {"team": t}}},
    "pod.labels<key>": lambda t: {"pod": {"labels": {t: "a"}}},
    "pod.annotations.*": lambda t: {"pod": {"annotations": {"note": t}}},
    "pod.annotations<key>": lambda t: {"pod": {"annotations": {t: "a"}}},
    "pod.env[].name": lambda t: {"pod": {"env": [{"name": t, "value": "a"}]}},
    "pod.env[].value": lambda t: {"pod": {"env": [{"name": "A", "value": t}]}},
    "pod.volumeMounts[].mountPath": lambda t: {"pod": {"volumes": [{"name": "v", "emptyDir": {}}],
                                                       "volumeMounts": [{"name": "v", "mountPath": f"/{t}"}]}},
    "pod.priorityClassName": lambda t: {"pod": {"priorityClassName": t}},
    "pod.schedulerName": lambda t: {"pod": {"schedulerName": t}},
    "job.queueName": lambda t: {"job": {"queueName": t}},
    "job.serviceAccountName": lambda t: {"job": {"serviceAccountName": t}},
    "metrics.podMonitor.interval": lambda t: {"metrics": {"podMonitor": {"enabled": True, "interval": t}}},
    "metrics.podMonitor.labels.*": lambda t: {"metrics": {"podMonitor": {"enabled": True, "labels": {"a": t}}}},
    "metrics.podMonitor.labels<key>": lambda t: {"metrics": {"podMonitor": {"enabled": True, "labels": {t: "a"}}}},
    "networkPolicy.matchLabels.*": lambda t: {"networkPolicy": {"prometheus": {"podSelector": {
        "matchLabels": {"app": t}}}}},
}


def _string_leaves(node: Any, path: str, defs: dict[str, Any], out: set[str]) -> None:
    """Schema paths of every free-text string (no enum), hand-written parts of the schema only."""
    if not isinstance(node, dict):
        return
    ref = node.get("$ref", "")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        if name in ("config", "configSet"):  # generated from config.py; land in files through toYaml
            out.add(path)
            return
        node = defs[name]
    types = node.get("type")
    if (types == "string" or (isinstance(types, list) and "string" in types)) and "enum" not in node:
        out.add(path)
    for key, sub in node.get("properties", {}).items():
        _string_leaves(sub, f"{path}.{key}".lstrip("."), defs, out)
    if isinstance(node.get("items"), dict):
        _string_leaves(node["items"], f"{path}[]", defs, out)
    if isinstance(node.get("additionalProperties"), dict):
        _string_leaves(node["additionalProperties"], f"{path}.*", defs, out)
    if isinstance(node.get("propertyNames"), dict) or (
            isinstance(node.get("additionalProperties"), dict) and "properties" not in node):
        out.add(f"{path}<key>")
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key, []):
            _string_leaves(sub, path, defs, out)


def test_every_free_text_value_of_the_schema_is_probed():
    schema = json.loads(SCHEMA_FILE.read_text())
    leaves: set[str] = set()
    _string_leaves(schema, "", schema["definitions"], leaves)
    # one representative stands for a repeated shape: head/worker groups, the label selectors
    probed = {p.replace("networkPolicy.matchLabels", "") for p in CASES}
    missing = {leaf for leaf in leaves if leaf not in CASES and not any(
        leaf.endswith(p) for p in probed if p.startswith(".")) and "matchLabels" not in leaf
               and not leaf.startswith(("sweep.grid.axes", "sweep.extraTargetZoos", "sweep.targetZoo",
                                        "sweep.grid.compositions.*.zoos", "sweep.runs.*.zoos", "sweep.name",
                                        "job.rayVersion", "pod.volumes[].name", "pod.volumeMounts[].name",
                                        "storage.s3.credentialsSecret.name", "head.resources",
                                        "worker.resources"))}
    # the excluded ones are patterned (zoo names, DNS labels, versions, quantities): no free text
    assert not missing, f"free-text values with no injection probe: {sorted(missing)}"


def _leaves(node: Any, path: str = "") -> dict[str, Any]:
    """Flattened leaves; ConfigMap file texts are parsed so their inner structure is compared too."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{path}/{key}"))
        return out or {path: {}}
    if isinstance(node, list):
        out = {}
        for i, value in enumerate(node):
            out.update(_leaves(value, f"{path}[{i}]"))
        return out or {path: []}
    if isinstance(node, str) and path.endswith((".yaml", ".json")):
        return _leaves(yaml.safe_load(node), f"{path}:")
    return {path: node}


def _render(tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    extra = tmp_path / "values.yaml"
    extra.write_text(yaml.safe_dump(values))
    return chart.render([*SMOKE, str(extra)])


def _run_like_kubeRays_submitter(entrypoint: str, tmp_path: Path, etc: Path) -> None:
    """``ray job submit ... -- ENTRYPOINT ;`` under ``bash -ce`` with stub ray (runs what follows ``--``) and
    stub python (records its arguments, the point file mapped from /etc/mzsane)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "ray").write_text('#!/bin/bash\nwhile [ "$1" != "--" ]; do shift; done; shift; "$@"\n')
    (stubs / "python").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/python-calls\n'
                                  f'[ -f "${{@: -1}}" ] || [ -f "{etc}/$(basename "${{@: -1}}")" ]\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    command = f"ray job submit --address http://head:8265 --submission-id id -- {entrypoint} ;"
    subprocess.run(["/bin/bash", "-ce", command], check=True, cwd=os.getcwd(), timeout=30,
                   env={**os.environ, "PATH": f"{stubs}:/usr/bin:/bin"})
    calls = (tmp_path / "python-calls").read_text().splitlines()
    assert calls == ["-m mzsane.sweep run-point /etc/mzsane/point.json"]  # the whole point went to Ray


@pytest.mark.parametrize("indent", [0, 2, 4, 6, 8])
@pytest.mark.parametrize("path", sorted(CASES))
def test_a_payload_in_any_value_is_refused_or_stays_inert_data(path, indent, tmp_path, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.chdir(marks)  # the shells and stages below run here: an injected touch leaves its mark
    text = payload(indent)
    assert len(text) < 128
    try:
        objects = _render(tmp_path, CASES[path](text))
    except ConfigError as err:
        assert "\n" not in str(err) and "rejected" in str(err)  # one line naming the value
        return
    safe = _render(tmp_path, CASES[path]("a"))
    got, want = _leaves(objects), _leaves(safe)
    assert not any("hostPID" in k or "hostNetwork" in k for k in got), f"{path}: the payload added keys"
    normalized = {k.replace(text, "a"): v for k, v in got.items()}
    assert set(normalized) == set(want), f"{path}: the payload changed the objects' structure"
    for key, value in normalized.items():
        if value != want[key]:
            assert text in str(value), f"{path}: {key} changed to {value!r} although it does not hold the value"
    commands = [json.dumps(c.get("command", [])) + json.dumps(c.get("args", [])) for o in objects
                for c in _containers(o)]
    assert not any("touch" in c for c in commands), f"{path}: the payload reached a container command"
    for job in (o for o in objects if o["kind"] == "RayJob"):
        assert "touch" not in job["spec"]["entrypoint"]
    (point,) = rendered_points(objects)
    placed = local.place(point, str(tmp_path / "data"), str(tmp_path / "state"))
    etc = Path(placed.state_dir) / "etc"
    _run_like_kubeRays_submitter(point.entrypoint, tmp_path, etc)
    stub = tmp_path / "stage"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/stages\n")
    stub.chmod(0o755)
    assert run_point(str(etc / "point.json"), python=str(stub), log=lambda *a, **k: None) == 0
    assert len((tmp_path / "stages").read_text().splitlines()) == len(placed.stages)
    assert not list(marks.iterdir()), f"{path}: an injected command ran"


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(v for v in value if isinstance(v, dict))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return found
