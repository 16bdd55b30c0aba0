"""Sweeps on Kubernetes: render the Helm chart, submit and watch its RayJobs, collect the results.

Why this shape: a sweep *is* the chart in ``helm/mzsane`` (one ``ray.io/v1`` RayJob per point), so
``render`` goes through Helm's own Go SDK (helm-python-sdk) instead of re-implementing templating, and
``submit``/``status`` only talk to the Kubernetes API with the official client. ``report`` needs no
cluster at all: it reads ``{sweep}/{point}/evaluate/results.json`` through ``mzsane.storage`` and draws
the paper's Figure-3 view (zero-shot accuracy vs zoo size, one line per composition).
This is the only module importing ``kubernetes`` and ``helm_python`` (both lazily, so ``report`` and the
RayJob's ``record-point`` step stay light).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mzsane import storage
from mzsane.errors import ClusterError, ConfigError, DataError, MzsaneError

CHART_DIR = os.environ.get("MZSANE_CHART", str(Path(__file__).resolve().parent.parent / "helm" / "mzsane"))
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
SWEEP_LABEL, POINT_LABEL = "mzsane.io/sweep", "mzsane.io/point"
ZERO_SHOT_METHOD = "generated"


# ----------------------------------------------------------------------------------------- render


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Later values files win; maps merge, lists and scalars replace, ``null`` is kept (Helm drops the key)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_values(values_files: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in values_files:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"values file '{path}' does not exist; pass e.g. -f jobs/zoo-size.yaml") from None
        except yaml.YAMLError:
            raise ConfigError(f"values file '{path}' is not valid YAML; fix its syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"values file '{path}' must hold a mapping such as 'sweep: {{name: ...}}'")
        values = _deep_merge(values, data)
    return values


def render(values_files: list[str], release: str = "mzsane", namespace: str = "mzsane",
           chart_dir: str = CHART_DIR) -> list[dict[str, Any]]:
    """The sweep's Kubernetes objects (ConfigMaps first, then RayJobs, then any PodMonitor), via Helm."""
    import helm_python

    values = load_values(values_files)
    try:
        chart = helm_python.Chart.load(chart_dir)
        rendered = chart.render(values, name=release, namespace=namespace)
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
    objects = render(args.values, args.release, args.namespace)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))


# --------------------------------------------------------------------------------- Kubernetes API


def _api_client(api_client: Any = None) -> Any:
    """An ApiClient from kubeconfig (``KUBECONFIG``/~/.kube/config) or the in-cluster service account."""
    if api_client is not None:
        return api_client
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        # KUBECONFIG is read here, not at import time (the client's default is frozen when it is imported)
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    except Exception:  # noqa: BLE001 - any kubeconfig problem falls through to the in-cluster config
        try:
            config.load_incluster_config(client_configuration=cfg)
        except Exception:  # noqa: BLE001
            raise ClusterError("no Kubernetes config found; set KUBECONFIG to a kubeconfig file or run inside "
                               "a pod with a service account") from None
    cfg.retries = 0  # fail fast: one line, not a minute of urllib3 retries
    return client.ApiClient(cfg)


def _cluster_error(err: Exception, action: str, namespace: str, host: str) -> ClusterError:
    """One line for any Kubernetes client failure: unreachable API, 403, missing CRD, bad object."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        try:
            reason = str(json.loads(err.body or "{}").get("message", ""))
        except (TypeError, ValueError, AttributeError):
            reason = str(err.body or "")[:200]
        if err.status == 403:
            return ClusterError(f"Kubernetes API at {host} refused to {action} in namespace '{namespace}' "
                                f"(403 Forbidden: {reason}); grant your user RBAC on rayjobs.ray.io and configmaps")
        if err.status == 404:
            return ClusterError(f"cannot {action} in namespace '{namespace}' (404: {reason or err.reason}); create the "
                                f"namespace and install the CRD's operator (KubeRay: deploy/kuberay-operator-values.yaml)")
        return ClusterError(f"Kubernetes API at {host} could not {action} ({err.status} {err.reason}: {reason})")
    return ClusterError(f"Kubernetes API at {host} is unreachable while trying to {action} "
                        f"({type(err).__name__}); check KUBECONFIG and that the cluster is up")


def _call(api_client: Any, action: str, namespace: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, _request_timeout=30, **kwargs)
    except Exception as err:  # noqa: BLE001 - translated to one ClusterError line
        raise _cluster_error(err, action, namespace, api_client.configuration.host) from None


def submit(objects: list[dict[str, Any]], namespace: str = "mzsane", api_client: Any = None) -> list[dict[str, str]]:
    """Create the rendered objects; existing ones are left alone (re-submitting a sweep is safe)."""
    from kubernetes import client

    api = _api_client(api_client)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    created: list[dict[str, str]] = []
    for obj in objects:
        kind, name = obj.get("kind", ""), obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace") or namespace
        if kind == "ConfigMap":
            exists = _exists(api, ns, f"read ConfigMap {name}", core.read_namespaced_config_map, name, ns)
            if not exists:
                _call(api, f"create ConfigMap {name}", ns, core.create_namespaced_config_map, ns, obj)
        else:
            group, version = obj["apiVersion"].split("/")
            plural = {"RayJob": PLURAL, "PodMonitor": "podmonitors"}.get(kind)
            if plural is None:
                raise ClusterError(f"the chart rendered a {kind} '{name}' that sweep submit does not know; use helm install")
            exists = _exists(api, ns, f"read {kind} {name}", custom.get_namespaced_custom_object,
                             group, version, ns, plural, name)
            if not exists:
                _call(api, f"create {kind} {name}", ns, custom.create_namespaced_custom_object,
                      group, version, ns, plural, obj)
        created.append({"kind": kind, "name": name, "action": "exists" if exists else "created"})
    return created


def _exists(api: Any, namespace: str, action: str, fn: Any, *args: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        fn(*args, _request_timeout=30)
        return True
    except ApiException as err:
        if err.status == 404:
            return False
        raise _cluster_error(err, action, namespace, api.configuration.host) from None
    except Exception as err:  # noqa: BLE001
        raise _cluster_error(err, action, namespace, api.configuration.host) from None


def submit_cli(args: argparse.Namespace) -> None:
    for row in submit(render(args.values, args.release, args.namespace), args.namespace):
        print(f"{row['kind']:<11} {row['name']:<48} {row['action']}")


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def status(sweep: str, namespace: str = "mzsane", api_client: Any = None,
           now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per RayJob of the sweep: point, job status, deployment status, duration (s), message."""
    from kubernetes import client

    api = _api_client(api_client)
    custom = client.CustomObjectsApi(api)
    listing = _call(api, f"list RayJobs of sweep '{sweep}'", namespace, custom.list_namespaced_custom_object,
                    GROUP, VERSION, namespace, PLURAL, label_selector=f"{SWEEP_LABEL}={sweep}")
    now = now or datetime.now().astimezone()
    rows = []
    for item in listing.get("items", []):
        meta, st = item.get("metadata", {}), item.get("status") or {}
        if (meta.get("labels") or {}).get(SWEEP_LABEL) != sweep:  # belt and braces on the server's selector
            continue
        start, end = _parse_time(st.get("startTime", "")), _parse_time(st.get("endTime", ""))
        duration = ((end or now) - start).total_seconds() if start else None
        rows.append({
            "point": meta.get("labels", {}).get(POINT_LABEL, ""),
            "job": meta.get("name", ""),
            "job_status": st.get("jobStatus") or "PENDING",
            "deployment": st.get("jobDeploymentStatus") or "New",
            "duration_s": round(duration, 1) if duration is not None else None,
            "message": " ".join(str(st.get("message", "")).split())[:120],
        })
    return sorted(rows, key=lambda r: r["point"])


def status_cli(args: argparse.Namespace) -> None:
    rows = status(args.sweep, args.namespace)
    if not rows:
        raise ClusterError(f"no RayJobs labelled {SWEEP_LABEL}={args.sweep} in namespace '{args.namespace}'; "
                           "check the sweep name (sweep.name in the values file) and --namespace")
    print(_format_table(rows, ["point", "job_status", "deployment", "duration_s", "job", "message"]))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["job_status"]] = counts.get(row["job_status"], 0) + 1
    print(f"{len(rows)} points: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))


# ----------------------------------------------------------------------------------------- report


def record_point(src_file: str, out_url: str) -> None:
    """Copy the point's identity (the ConfigMap's point.json) beside its results, for ``report``."""
    with open(src_file, encoding="utf-8") as fh:
        point = json.load(fh)
    storage.write_json(storage.join(out_url, "point.json"), point)


def _point_meta(point_url: str, name: str, results: dict[str, Any]) -> dict[str, Any]:
    """The point's sweep coordinates: point.json (written by the chart's RayJob), else the backbone's config."""
    meta_url = storage.join(point_url, "point.json")
    if storage.exists(meta_url):
        meta = storage.read_json(meta_url)
        return {"composition": meta.get("composition") or "+".join(meta.get("zoos", [])),
                "zoos": list(meta.get("zoos", [])), "zoo_size": int(meta.get("zoo_size", -1)),
                "axes": dict(meta.get("axes", {}))}
    backbone = str(results.get("backbone", ""))
    data: dict[str, Any] = {}
    config_url = storage.join(backbone, "config.json") if backbone else ""
    if config_url and storage.exists(config_url):  # a run dir and every checkpoint hold config.json
        data = storage.read_json(config_url).get("data", {})
    if not data and not backbone:
        raise DataError(f"point '{name}' has neither point.json nor a 'backbone' in evaluate/results.json; "
                        "re-run the point with the chart or `mzsane evaluate`")
    zoos = list(data.get("zoos", []))
    return {"composition": "+".join(zoos) or "all", "zoos": zoos,
            "zoo_size": int(data.get("num_models_per_zoo", -1)), "axes": {}}


def collect(url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (point, method) from ``{url}/{point}/evaluate/results.json``; plus points without results."""
    if not storage.isdir(url):
        raise DataError(f"sweep results folder '{url}' does not exist; pass {{storage.root}}/sweeps/{{sweep}}")
    rows, pending = [], []
    for name in storage.listdir(url):
        point_url = storage.join(url, name)
        results_url = storage.join(point_url, "evaluate", "results.json")
        if not storage.isdir(point_url):
            continue
        if not storage.exists(results_url):
            pending.append(name)
            continue
        results = storage.read_json(results_url)
        meta = _point_meta(point_url, name, results)
        for method in results.get("rows", []):
            rows.append({
                "point": name, "composition": meta["composition"], "num_zoos": len(meta["zoos"]),
                "zoos": "+".join(meta["zoos"]), "zoo_size": meta["zoo_size"],
                "axes": ",".join(f"{k}={v}" for k, v in sorted(meta["axes"].items())),
                "target_zoo": results.get("target_zoo", ""), "dataset": results.get("dataset", ""),
                "in_distribution": bool(results.get("in_distribution", False)),
                "method": method.get("method", ""), "test_acc_mean": float(method.get("test_acc_mean", float("nan"))),
                "test_acc_std": float(method.get("test_acc_std", 0.0) or 0.0), "n": int(method.get("n", 0) or 0),
            })
    return rows, pending


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Figure-3 view: zero-shot test accuracy of generated models vs zoo size, one line per composition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] == ZERO_SHOT_METHOD and row["zoo_size"] > 0:
            label = row["composition"] + (f" ({row['axes']})" if row["axes"] else "")
            lines.setdefault(label, []).append(row)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in sorted(lines.items(), key=lambda kv: (kv[1][0]["num_zoos"], kv[0])):
        points.sort(key=lambda r: r["zoo_size"])
        ax.errorbar([p["zoo_size"] for p in points], [p["test_acc_mean"] for p in points],
                    yerr=[p["test_acc_std"] for p in points], marker="o", capsize=3, label=label)
    ax.set_xlabel("zoo size (models per zoo)")
    ax.set_ylabel("zero-shot test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(title="composition", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


REPORT_COLUMNS = ["point", "composition", "num_zoos", "zoos", "zoo_size", "axes", "target_zoo", "dataset",
                  "in_distribution", "method", "test_acc_mean", "test_acc_std", "n"]


def report(url: str, out: str = "") -> dict[str, Any]:
    """Collect every point's results into rows, ``sweep_results.csv`` and ``sweep_zero_shot.png`` under ``out``."""
    url = url.rstrip("/")
    rows, pending = collect(url)
    if not rows:
        raise DataError(f"no evaluate/results.json under '{url}/*/' yet ({len(pending)} points pending); "
                        "wait for `mzsane sweep status` to show SUCCEEDED")
    rows.sort(key=lambda r: (r["num_zoos"], r["composition"], r["axes"], r["zoo_size"], r["method"]))
    out = (out or url).rstrip("/")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_url, png_url = storage.join(out, "sweep_results.csv"), storage.join(out, "sweep_zero_shot.png")
    storage.write_text(csv_url, text.getvalue())
    storage.write_bytes(png_url, _plot(rows, f"sweep {url.rsplit('/', 1)[-1]}: zero-shot accuracy vs zoo size"))
    return {"rows": rows, "pending": pending, "csv": csv_url, "png": png_url}


def report_cli(args: argparse.Namespace) -> None:
    result = report(args.url, args.out)
    zero_shot = [r for r in result["rows"] if r["method"] == ZERO_SHOT_METHOD] or result["rows"]
    print(_format_table(zero_shot, ["composition", "zoo_size", "axes", "point", "method", "test_acc_mean",
                                    "test_acc_std", "n"]))
    if result["pending"]:
        print(f"pending (no results yet): {', '.join(result['pending'])}")
    print(f"wrote {result['csv']} and {result['png']}")


def main(argv: list[str] | None = None) -> int:
    """``python -m mzsane.sweep record-point SRC OUT``: the first step of every chart RayJob."""
    parser = argparse.ArgumentParser(prog="python -m mzsane.sweep")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record-point", help="copy the point's point.json beside its results")
    rec.add_argument("src")
    rec.add_argument("out")
    args = parser.parse_args(argv)
    try:
        record_point(args.src, args.out)
    except (OSError, MzsaneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
