"""Every RayJob of every sweep through KubeRay's own reconcilers (ray-operator v1.6.2; tests/operator harness).

For each ``jobs/*.yaml`` (and ``jobs/local/*.yaml`` over its base), plain and with ``job.queueName`` set (the
harness then plays Kueue's admission), the RayJob and RayCluster reconcilers run until the operator has made
the RayCluster, head and worker Pods, Services and the submitter Job. The tests check those objects, not a
description of them: restricted Pod Security on every container the operator wrote (injected ones too),
unique port names and numbers, Services that select the head pod, schema validity, the submitter's command
carrying the point's entrypoint as one command, and a Kueue ClusterQueue that covers every resource any of
these pods requests, with a quota that admits one point of every sweep.
"""
from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path

import pytest
import yaml

from tests.fixtures.operator import (
    admission_problems,
    made_for,
    name_problems,
    port_problems,
    restricted_pss_violations,
    run_harness,
)

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mzsane.sweep import render  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.33.0"
QUEUE = "mzsane"


def _sweeps() -> list[tuple[str, list[str]]]:
    out = [(os.path.basename(p), [p]) for p in sorted(glob.glob(str(ROOT / "jobs" / "*.yaml")))]
    for local in sorted(glob.glob(str(ROOT / "jobs" / "local" / "*.yaml"))):
        base = ROOT / "jobs" / os.path.basename(local)
        out.append((f"local/{os.path.basename(local)}", ([str(base)] if base.exists() else []) + [local]))
    return out


SWEEPS = _sweeps()
CASES = [(i, f, q) for i, f in SWEEPS for q in (False, True)]


@pytest.fixture(scope="module")
def reconciled(kuberay_harness, tmp_path_factory):
    """Every case in one harness run (one API server start), each case in a namespace of its own; returns
    ``(files, queued) -> result`` with that namespace's objects and status sequences, keyed ``mzsane/NAME``.
    Queued cases get "Kueue"'s admission; the others are never suspended, so admission does not touch them."""
    cases, docs = {}, []
    for k, (_, files, queued) in enumerate(CASES):
        namespace = f"mzsane-{k}"
        rendered = render(list(files), release="sweep1", namespace=namespace,
                          sets=[f"job.queueName={QUEUE}"] if queued else [])
        cases[(tuple(files), queued)] = (namespace, rendered)
        docs += rendered
    result = run_harness(kuberay_harness, "reconcile", docs, tmp_path_factory.mktemp("reconciled"), admit=True,
                         timeout_s=900)
    assert result["returncode"] == 0, result["log"][-3000:]

    def view(files, queued=False) -> dict:
        namespace, rendered = cases[(tuple(files), queued)]
        return {"rendered": rendered,
                "objects": [o for o in result["objects"] if o["metadata"].get("namespace") == namespace],
                "status": {f"mzsane/{key.split('/', 1)[1]}": seq for key, seq in result["status"].items()
                           if key.startswith(namespace + "/")}}
    return view


def _rayjob_names(result: dict) -> list[str]:
    return [d["metadata"]["name"] for d in result["rendered"] if d["kind"] == "RayJob"]


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.mark.parametrize("files,queued", [(f, q) for _, f, q in CASES],
                         ids=[f"{i}{'+queue' if q else ''}" for i, _, q in CASES])
def test_every_rayjob_goes_through_the_reconcilers_and_is_admitted(reconciled, files, queued):
    result = reconciled(files, queued)
    names = _rayjob_names(result)
    assert names
    for name in names:
        made = made_for(result, name)
        steps = [s["jobDeploymentStatus"] for s in result["status"][f"mzsane/{name}"]]
        assert steps[0] == "" and steps[-1] == "Running", steps
        assert ("Suspended" in steps) == queued, steps  # queued: the operator holds it until "Kueue" admits it
        spec = made["rayjob"]["spec"]["rayClusterSpec"]
        assert len(made["pods"]) == 1 + sum(g.get("replicas", 0) for g in spec.get("workerGroupSpecs", []))
        assert admission_problems(made, _validate) == [], name
    for pod in (d for d in result["rendered"] if d["kind"] == "Pod"):  # the helm test hook, same namespace
        assert restricted_pss_violations(pod["spec"]) + port_problems(pod) == []
        assert name_problems("Pod", pod["metadata"]["name"]) == []


def _submitted_command(made: dict) -> tuple[list[str], str]:
    """The tokens `ray job submit ... --` hands to Ray, as bash parses the submitter's `bash -ce` string."""
    container = made["submitter"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/bash", "-ce", "--"], container["command"]
    script = container["args"][0]
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = next(i for i in range(len(tokens) - 2) if tokens[i:i + 3] == ["ray", "job", "submit"])
    sep = tokens.index("--", start)
    end = next((i for i in range(sep + 1, len(tokens)) if tokens[i] in (";", "&&", "||", "|", "&")), len(tokens))
    return tokens[start:end], tokens[end] if end < len(tokens) else ""


@pytest.mark.parametrize("files", [f for _, f in SWEEPS], ids=[i for i, _ in SWEEPS])
def test_submitter_hands_the_whole_point_to_ray_as_one_command(reconciled, files):
    """KubeRay pastes spec.entrypoint unquoted into `bash -ce` (common/job.go): whatever bash reads after
    `--` up to the first control operator is all Ray runs. That must be the whole entrypoint, and the
    operator's `; fi` must be what ends it, or a stage runs in the submitter pod instead of the Ray job."""
    result = reconciled(files)
    for name in _rayjob_names(result):
        made = made_for(result, name)
        submit, ended_by = _submitted_command(made)
        sep = submit.index("--")
        assert submit[submit.index("--submission-id") + 1] == made["rayjob"]["status"]["jobId"]
        entrypoint = made["rayjob"]["spec"]["entrypoint"]
        assert submit[sep + 1:] == shlex.split(entrypoint) and ended_by == ";", (
            f"{name}: bash ends Ray's command at {ended_by!r}: Ray runs {shlex.join(submit[sep + 1:])!r}")


def _quantity(text) -> float:
    units = {"m": 1e-3, "k": 1e3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "M": 1e6, "G": 1e9}
    text = str(text)
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _pod_requests(pod: dict) -> dict[str, float]:
    """What Kueue counts for a pod: per resource, max(sum of containers, largest init container)."""
    spec = pod["spec"]

    def requests(c):
        return {r: _quantity(v) for r, v in ((c.get("resources") or {}).get("requests") or {}).items()}
    need: dict[str, float] = {}
    for c in spec["containers"]:
        for r, v in requests(c).items():
            need[r] = need.get(r, 0.0) + v
    for c in spec.get("initContainers", []):
        for r, v in requests(c).items():
            need[r] = max(need.get(r, 0.0), v)
    return need


def test_kueue_queue_covers_every_requested_resource_and_admits_one_point_of_every_sweep(reconciled):
    """Kueue blocks a workload asking for a resource its ClusterQueue does not cover: the resources come
    from the pods the operator made (head, workers, init containers, submitter), so a new one cannot slip by."""
    queue = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "kueue" / "queues.yaml").read_text())
                 if d and d["kind"] == "ClusterQueue")
    covered = {r for g in queue["spec"]["resourceGroups"] for r in g["coveredResources"]}
    quota = {r["name"]: _quantity(r["nominalQuota"]) for g in queue["spec"]["resourceGroups"]
             for f in g["flavors"] for r in f["resources"]}
    requested: dict[str, set[str]] = {}
    for sweep, files in SWEEPS:
        result = reconciled(files, True)
        biggest: dict[str, float] = {}
        for name in _rayjob_names(result):
            made = made_for(result, name)
            point: dict[str, float] = {}
            for pod in made["pods"] + [made["submitter_pod"]]:
                for r, v in _pod_requests(pod).items():
                    point[r] = point.get(r, 0.0) + v
                    requested.setdefault(r, set()).add(f"{sweep}:{pod['metadata']['name']}")
            biggest = {r: max(biggest.get(r, 0.0), point.get(r, 0.0)) for r in set(biggest) | set(point)}
        over = {r: (v, quota.get(r, 0.0)) for r, v in biggest.items() if v > quota.get(r, 0.0)}
        assert not over, f"{sweep}: one point needs more than the ClusterQueue's quota: {over}"
    uncovered = {r: sorted(where)[:3] for r, where in requested.items() if r not in covered}
    assert not uncovered, f"resources requested but not covered by the ClusterQueue: {uncovered}"
