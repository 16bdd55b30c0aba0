"""Every RayJob of every sweep through KubeRay's own reconcilers (ray-operator v1.6.2; tests/operator harness),
and every queued one through Kueue's own controllers (sigs.k8s.io/kueue v0.19.1; tests/kueue).

For each ``jobs/*.yaml`` (and ``jobs/local/*.yaml`` over its base), plain and with ``job.queueName`` set, the
RayJob and RayCluster reconcilers run against a real kube-apiserver (Pod Security "restricted" on every
namespace) until the operator has made the RayCluster, head and worker Pods, Services and the submitter Job,
each accepted by that server. Queued, each RayJob is created suspended and Kueue's manager, running beside
the reconcilers with deploy/kueue/queues.yaml applied, makes its Workload and admits (unsuspends) as many
points as the ClusterQueue's quota holds; the rest stay suspended with Kueue's own reason. The tests check
those objects, not a description of them: restricted Pod Security on every container the operator wrote
(injected ones too), unique port names and numbers, Services that select the head pod, schema validity, the
submitter's command carrying the point's entrypoint as one command, a ClusterQueue that covers every
resource any of these pods requests, and Kueue's admissions against the quota and the operator-made pods.
"""
from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path

import pytest
import yaml

from tests.fixtures.operator import (
    QUEUES,
    admission_problems,
    condition,
    made_for,
    name_problems,
    port_problems,
    restricted_pss_violations,
    run_harness,
    workload_of,
)
from tests.fixtures.sweeps import stack_of

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mzsane.sweep import render  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.33.0"
QUEUE = "mzsane"


def _sweeps() -> list[tuple[str, list[str]]]:
    out = [(os.path.basename(p), [p]) for p in sorted(glob.glob(str(ROOT / "jobs" / "*.yaml")))]
    for local in sorted(glob.glob(str(ROOT / "jobs" / "local" / "*.yaml"))):  # on the files its header names
        out.append((f"local/{os.path.basename(local)}", stack_of(Path(local))))
    return out


SWEEPS = _sweeps()
CASES = [(i, f, q) for i, f in SWEEPS for q in (False, True)]


@pytest.fixture(scope="module")
def reconciled(kuberay_harness, tmp_path_factory):
    """Every case in one harness run (one API server start), each case in a namespace of its own; returns
    ``(files, queued) -> result`` with that namespace's objects and status sequences, keyed ``mzsane/NAME``.
    Kueue runs with deploy/kueue/queues.yaml; each namespace gets its own copy of the ClusterQueue (the
    harness names it mzsane-NAMESPACE), so every queued sweep is admitted as if alone on its cluster. The
    plain cases carry no queue label and are never suspended: Kueue leaves them alone."""
    cases, docs = {}, []
    for k, (_, files, queued) in enumerate(CASES):
        namespace = f"mzsane-{k}"
        rendered = render(list(files), release="sweep1", namespace=namespace,
                          sets=[f"job.queueName={QUEUE}"] if queued else [])
        cases[(tuple(files), queued)] = (namespace, rendered)
        docs += rendered
    result = run_harness(kuberay_harness, "reconcile", docs, tmp_path_factory.mktemp("reconciled"), queues=QUEUES,
                         timeout_s=900)
    assert result["returncode"] == 0, result["log"][-3000:]

    def view(files, queued=False) -> dict:
        namespace, rendered = cases[(tuple(files), queued)]
        return {"rendered": rendered, "namespace": namespace,
                "objects": [o for o in result["objects"] if o["metadata"].get("namespace") == namespace
                            or (o["kind"] == "ClusterQueue" and o["metadata"]["name"] == f"{QUEUE}-{namespace}")],
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
    """Plain, every point runs; queued, the points Kueue admitted run and the others wait suspended (how many
    of each: test_kueue_admits_as_many_points_as_the_quota_allows)."""
    result = reconciled(files, queued)
    names = _rayjob_names(result)
    assert names
    admitted = [n for n in names if not queued or _admitted(result, n)]
    assert admitted, "Kueue admitted no point of this sweep"
    for name in names:
        steps = [s["jobDeploymentStatus"] for s in result["status"][f"mzsane/{name}"]]
        assert ("Suspended" in steps) == queued, steps  # queued: the operator holds it until Kueue admits it
        assert steps[0] == "" and steps[-1] == ("Running" if name in admitted else "Suspended"), steps
        if name not in admitted:
            continue
        made = made_for(result, name)
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


def _point_need(made: dict) -> dict[str, float]:
    """What one point asks of its queue: the requests of every pod the operator made for it."""
    need: dict[str, float] = {}
    for pod in made["pods"] + [made["submitter_pod"]]:
        for r, v in _pod_requests(pod).items():
            need[r] = need.get(r, 0.0) + v
    return need


def _quota(path: Path) -> tuple[set[str], dict[str, float]]:
    queue = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ClusterQueue")
    covered = {r for g in queue["spec"]["resourceGroups"] for r in g["coveredResources"]}
    quota = {r["name"]: _quantity(r["nominalQuota"]) for g in queue["spec"]["resourceGroups"]
             for f in g["flavors"] for r in f["resources"]}
    return covered, quota


def _admitted(result: dict, rayjob: str) -> bool:
    """Kueue admitted the RayJob's Workload (its own Admitted condition)."""
    workload = workload_of(result, rayjob)
    assert workload is not None, f"Kueue made no Workload for {rayjob}"
    return (condition(workload, "Admitted") or {}).get("status") == "True"


def test_kueue_queue_covers_every_requested_resource_and_admits_one_point_of_every_sweep(reconciled):
    """Kueue blocks a workload asking for a resource its ClusterQueue does not cover: the resources come
    from the pods the operator made (head, workers, init containers, submitter), so a new one cannot slip by."""
    covered, quota = _quota(QUEUES)
    requested: dict[str, set[str]] = {}
    for sweep, files in SWEEPS:
        result = reconciled(files)  # plain: the operator made every point's pods
        biggest: dict[str, float] = {}
        for name in _rayjob_names(result):
            made = made_for(result, name)
            for pod in made["pods"] + [made["submitter_pod"]]:
                for r in _pod_requests(pod):
                    requested.setdefault(r, set()).add(f"{sweep}:{pod['metadata']['name']}")
            point = _point_need(made)
            biggest = {r: max(biggest.get(r, 0.0), point.get(r, 0.0)) for r in set(biggest) | set(point)}
        over = {r: (v, quota.get(r, 0.0)) for r, v in biggest.items() if v > quota.get(r, 0.0)}
        assert not over, f"{sweep}: one point needs more than the ClusterQueue's quota: {over}"
    uncovered = {r: sorted(where)[:3] for r, where in requested.items() if r not in covered}
    assert not uncovered, f"resources requested but not covered by the ClusterQueue: {uncovered}"


@pytest.mark.parametrize("files", [f for _, f in SWEEPS], ids=[i for i, _ in SWEEPS])
def test_kueue_admits_as_many_points_as_the_quota_allows(reconciled, files):
    """Kueue's scheduler, not the harness, decides: every queued point gets a Workload; those admitted are
    unsuspended and run, and together fit the quota; each one left waiting is suspended, has no Ray cluster,
    and would not fit in what the admitted ones leave (Kueue's own "Pending" reason). The points' needs come
    from the pods the operator made for the plain sweep, and Kueue's charge for each admitted point must
    equal them, so Kueue counts exactly what the operator will create."""
    _, quota = _quota(QUEUES)
    plain, queued = reconciled(files), reconciled(files, True)
    need = {name: _point_need(made_for(plain, name)) for name in _rayjob_names(plain)}
    admitted = [n for n in need if _admitted(queued, n)]
    waiting = [n for n in need if n not in admitted]
    used = {r: sum(need[n].get(r, 0.0) for n in admitted) for r in quota}
    assert all(used[r] <= quota[r] for r in quota), (used, quota)
    for name in admitted:
        workload = workload_of(queued, name)
        charged: dict[str, float] = {}
        for assignment in workload["status"]["admission"]["podSetAssignments"]:
            for r, v in assignment["resourceUsage"].items():
                charged[r] = charged.get(r, 0.0) + _quantity(v)
        assert charged == pytest.approx(need[name]), name
        job = next(o for o in queued["objects"] if o["kind"] == "RayJob" and o["metadata"]["name"] == name)
        assert job["spec"].get("suspend") is not True
    owners = {r["name"] for o in queued["objects"] if o["kind"] == "RayCluster"
              for r in o["metadata"].get("ownerReferences", []) if r["kind"] == "RayJob"}
    reasons = []  # Kueue sets "Pending" on the workloads its scheduler tried, not on every one behind them
    for name in waiting:
        reserved = condition(workload_of(queued, name), "QuotaReserved")
        if reserved is not None:
            assert reserved["status"] == "False" and reserved["reason"] == "Pending", reserved
            reasons.append(reserved["message"])
        assert any(used[r] + need[name].get(r, 0.0) > quota[r] for r in quota), (name, used, need[name])
        job = next(o for o in queued["objects"] if o["kind"] == "RayJob" and o["metadata"]["name"] == name)
        assert job["spec"]["suspend"] is True and name not in owners  # no Ray cluster made for it
    assert all("insufficient unused quota" in m for m in reasons) and bool(reasons) == bool(waiting), reasons
    cq = next(o for o in queued["objects"] if o["kind"] == "ClusterQueue")["status"]
    assert (cq["admittedWorkloads"], cq["pendingWorkloads"]) == (len(admitted), len(waiting)), cq
    assert len(admitted) == min(len(need), min(int(quota[r] // v) for r, v in need[admitted[0]].items() if v))


def _queue_file(tmp: Path, edit) -> Path:
    docs = [d for d in yaml.safe_load_all(QUEUES.read_text()) if d]
    edit(next(d for d in docs if d["kind"] == "ClusterQueue")["spec"]["resourceGroups"][0])
    path = tmp / "queues.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _drop_ephemeral_storage(group: dict) -> None:  # issue 24 item 2: the queue as it was
    group["coveredResources"].remove("ephemeral-storage")
    for flavor in group["flavors"]:
        flavor["resources"] = [r for r in flavor["resources"] if r["name"] != "ephemeral-storage"]


def _quota_under_one_point(group: dict) -> None:
    for flavor in group["flavors"]:
        for r in flavor["resources"]:
            if r["name"] == "cpu":
                r["nominalQuota"] = 2  # the smoke point needs 2.5 CPUs (head 1, worker 1, submitter 0.5)


@pytest.mark.parametrize("edit,message", [
    (_drop_ephemeral_storage, "resource ephemeral-storage unavailable in ClusterQueue"),
    (_quota_under_one_point, "insufficient quota for cpu")],
                         ids=["uncovered-ephemeral-storage", "quota-under-one-point"])
def test_kueue_admits_nothing_from_a_queue_that_cannot_hold_a_point(kuberay_harness, tmp_path, edit, message):
    """The failures the queue must not have, shown by Kueue itself: a ClusterQueue that does not cover a
    resource the pods request, or whose quota is under one point, leaves every Workload pending with Kueue's
    reason, every RayJob suspended and no Ray cluster made."""
    docs = render([str(ROOT / "jobs" / "smoke.yaml")], release="sweep1", namespace="mzsane",
                  sets=[f"job.queueName={QUEUE}"])
    result = run_harness(kuberay_harness, "reconcile", docs, tmp_path, queues=_queue_file(tmp_path, edit))
    assert result["returncode"] == 0, result["log"][-3000:]
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"]
    assert names and not any(o["kind"] == "RayCluster" for o in result["objects"])
    for name in names:
        reserved = condition(workload_of(result, name), "QuotaReserved")
        assert reserved["status"] == "False" and reserved["reason"] == "Pending", reserved
        assert message in reserved["message"], reserved["message"]
        assert [s["jobDeploymentStatus"] for s in result["status"][f"mzsane/{name}"]][-1] == "Suspended"
