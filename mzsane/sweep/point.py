"""A sweep point: its identity record, the stages it runs, and the point as the chart rendered it.

Why the stages live here and not in the chart: KubeRay pastes a RayJob's ``spec.entrypoint`` unquoted into
the submitter's ``bash -ce`` command line (``ray job submit ... -- ENTRYPOINT ;``), so an ``A && B`` chain
sends only ``A`` to Ray and runs the rest in the submitter pod, and any Helm value written into the
entrypoint reaches a shell. The chart's entrypoint is therefore one fixed command, ``python -m mzsane.sweep
run-point /etc/mzsane/point.json``: every location and name a stage needs is read from the mounted point
file (no value is on a command line), the stages run here one after the other as argv lists (no shell),
and the first stage that fails ends the point with its exit status, which Ray reports as the job's.
``sweep run`` plans the same stages from the same files, so a local run executes what the cluster would.
This module stays light (no Helm, no Kubernetes, no Ray): it runs in every RayJob.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from mzsane import storage
from mzsane.errors import ConfigError, MzsaneError
from mzsane.sample.protocol import SEEN_ANCHORS_FOLDER, section_overrides, seen_overrides

SWEEP_LABEL, POINT_LABEL, RESULTS_ANNOTATION = "mzsane.io/sweep", "mzsane.io/point", "mzsane.io/results"
OVERRIDES_FILE, POINT_FILE = "overrides.yaml", "point.json"
RUN_POINT = ("python", "-m", "mzsane.sweep", "run-point")
PROGRESS_FILE = "run-point.json"  # {results}/: the stages an earlier attempt of this point finished


def record_point(src_file: str, out_url: str) -> None:
    """Copy the point's identity (the ConfigMap's point.json) beside its results, for ``report``."""
    with open(src_file, encoding="utf-8") as fh:
        point = json.load(fh)
    storage.write_json(storage.join(out_url, "point.json"), point)


@dataclass(frozen=True)
class Stage:
    """One step of a point: a name for logs and resume, and the argv it runs (never through a shell)."""

    name: str
    argv: list[str]


def _text(record: dict[str, Any], *keys: str) -> str:
    node: Any = record
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, str) or not node:
        raise ConfigError(f"point file lacks {'.'.join(keys)}; render it with the mzsane chart (helm/mzsane)")
    return node


def results_url(record: dict[str, Any]) -> str:
    """``{storage.root}/sweeps/{sweep}/{point}``: where every stage of the point writes."""
    root = _text(record, "overrides", "storage", "root").rstrip("/")
    return storage.join(root, "sweeps", _text(record, "sweep"), _text(record, "point"))


def plan(point_file: str, record: dict[str, Any], python: str = "") -> list[Stage]:
    """The stages of the point described by ``record`` (the parsed ``point_file``): record the point, train,
    sample and evaluate the target zoo (held-out anchors, then seen ones for a zoo it trained on), probe, then the same
    for every extra target zoo, and with ``learning_curve`` the first target at every kept checkpoint.

    Everything comes from the point file and the ``overrides.yaml`` beside it, the files the ConfigMap
    mounts; ``python`` is the interpreter the stages run with (default: this one)."""
    python = python or sys.executable
    root = _text(record, "overrides", "storage", "root").rstrip("/")
    run = storage.join(root, "runs", _text(record, "overrides", "run_name"))
    out = results_url(record)
    target = _text(record, "target_zoo")
    cfg = ["--preset", _text(record, "preset"), "--config", os.path.join(os.path.dirname(point_file), OVERRIDES_FILE)]
    mz = [python, "-m", "mzsane"]
    trained_on = {str(z) for z in (record.get("zoos") or [])}
    zoo_size = int(record.get("zoo_size") or 0)
    seen = seen_overrides(_num_anchors(record), zoo_size) if zoo_size > 0 else {}

    def sets(section: str) -> list[str]:
        return [arg for k, v in section_overrides(seen, section).items() for arg in ("--set", f"{k}={v}")]

    def target_stages(zoo_name: str, zoo_out: str) -> list[Stage]:
        """Held-out anchors (ours), then, for a zoo the backbone trained on, seen anchors (the paper's protocol,
        ``mzsane.sample.protocol``) into ``anchors-seen/``."""
        zoo = storage.join(root, "zoos", zoo_name)
        held_out = [Stage("sample", [*mz, "sample", *cfg, "--backbone", run, "--zoo", zoo, "--out", zoo_out]),
                    Stage("evaluate", [*mz, "evaluate", *cfg, "--samples", zoo_out, "--zoo", zoo])]
        if zoo_name not in trained_on or not seen:
            return held_out
        seen_out = storage.join(zoo_out, SEEN_ANCHORS_FOLDER)
        return [*held_out,
                Stage("sample-seen", [*mz, "sample", *cfg, *sets("sample"), "--backbone", run, "--zoo", zoo,
                                      "--out", seen_out]),
                Stage("evaluate-seen", [*mz, "evaluate", *cfg, *sets("evaluate"), "--samples", seen_out, "--zoo", zoo])]

    stages = [
        Stage("record-point", [python, "-m", "mzsane.sweep", "record-point", point_file, out]),
        Stage("train", [*mz, "train", *cfg]),
        *target_stages(target, out),
        Stage("probe", [*mz, "probe", "--backbone", run, "--zoo", target, "--out", storage.join(out, "probe")]),
    ]
    for extra in record.get("extra_target_zoos") or []:
        stages += target_stages(str(extra), storage.join(out, "targets", str(extra)))
    if record.get("learning_curve"):  # last: the first target at every kept checkpoint (sweep.learningCurve)
        target_url = storage.join(root, "zoos", target)
        stages.append(Stage("curve", [*mz, "curve", *cfg, "--backbone", run, "--zoo", target_url, "--out",
                                      storage.join(out, "curve")]))
    return stages


def _num_anchors(record: dict[str, Any]) -> int:
    """The point's ``sample.num_anchors`` (its overrides over its preset), which the seen protocol caps at the
    zoo size."""
    from mzsane import config, presets

    try:
        cfg = config.from_dict(record.get("overrides") or {}, base=presets.PRESETS[str(record.get("preset"))]())
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"point file: its overrides do not load ({err}); render it with the mzsane chart") from None
    return int(cfg.sample.num_anchors)


def read_point_file(point_file: str) -> dict[str, Any]:
    try:
        with open(point_file, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the point file {point_file} ({err}); "
                          "is the point's ConfigMap mounted there?") from None
    if not isinstance(record, dict):
        raise ConfigError(f"point file {point_file} is not a JSON object; render it with the mzsane chart")
    return record


def run_point(point_file: str, python: str = "", log=print) -> int:
    """The RayJob's entrypoint: run the point's stages in order; the first failure's exit status is the
    point's. A retried job skips the stages an earlier attempt finished with the same point file."""
    record = read_point_file(point_file)
    stages = plan(point_file, record, python)
    progress_url = storage.join(results_url(record), PROGRESS_FILE)
    with open(point_file, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    done: list[str] = []
    if storage.exists(progress_url):
        saved = storage.read_json(progress_url)
        keys = [f"{i}-{s.name}" for i, s in enumerate(stages)]
        if saved.get("digest") == digest and saved.get("done") == keys[:len(saved.get("done") or [])]:
            done = list(saved["done"])
    for index, stage in enumerate(stages):
        key = f"{index}-{stage.name}"
        if key in done:
            log(f"[point {record.get('point')}] {stage.name} ({index + 1}/{len(stages)}): finished before, skipped")
            continue
        log(f"[point {record.get('point')}] {stage.name} ({index + 1}/{len(stages)}): {shlex.join(stage.argv)}",
            flush=True)
        rc = subprocess.run(stage.argv, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            log(f"error: point {record.get('point')}: stage {stage.name} exited with {rc}; the point failed",
                file=sys.stderr)
            return rc if rc > 0 else 128 - rc
        done.append(key)
        storage.write_json(progress_url, {"digest": digest, "done": done})
    return 0


@dataclass
class RenderedPoint:
    """One point as rendered: what its RayJob runs, the ConfigMap files it mounts, and where."""

    sweep: str
    name: str
    job: str
    results_url: str
    entrypoint: str
    mount_path: str  # where the RayJob mounts the ConfigMap (/etc/mzsane)
    files: dict[str, str]  # the ConfigMap's data
    overrides: dict[str, Any] = field(default_factory=dict)  # overrides.yaml, parsed
    preset: str = "default"
    extra_target_zoos: list[str] = field(default_factory=list)  # sampled and evaluated after the first target

    @property
    def digest(self) -> str:
        """Identity of what the point runs: a changed entrypoint or config is a different point."""
        blob = json.dumps({"entrypoint": self.entrypoint, "files": self.files}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def runs_point_file(self) -> bool:
        """Whether the entrypoint is the chart's ``run-point`` on its mounted point file."""
        try:
            argv = shlex.split(self.entrypoint)
        except ValueError:
            return False
        return tuple(argv[:4]) == RUN_POINT and argv[4:] == [f"{self.mount_path}/{POINT_FILE}"]

    def stages(self, mount_dir: str = "", python: str = "") -> list[Stage]:
        """The point's stages with its files at ``mount_dir`` (default: where the pod mounts them); an
        entrypoint that is not the chart's ``run-point`` runs as one ``bash -c`` stage, as written."""
        if not self.runs_point_file:
            return [Stage("entrypoint", ["bash", "-c", self.entrypoint])]
        point_file = os.path.join(mount_dir or self.mount_path, POINT_FILE)
        return plan(point_file, json.loads(self.files[POINT_FILE]), python)


def _mounted_config_map(job: dict[str, Any]) -> tuple[str, str]:
    """(ConfigMap name, mount path) of the RayJob's head container: where the chart puts the point's files."""
    pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v}
    for container in pod.get("containers", []):
        for mount in container.get("volumeMounts", []):
            if mount["name"] in volumes:
                return volumes[mount["name"]], mount["mountPath"].rstrip("/")
    raise ConfigError(f"RayJob '{job['metadata']['name']}' mounts no ConfigMap; render the mzsane chart")


def rendered_points(objects: list[dict[str, Any]]) -> list[RenderedPoint]:
    """Every RayJob of the rendered chart as a ``RenderedPoint``, with its mounted ConfigMap's files."""
    config_maps = {o["metadata"]["name"]: o.get("data") or {} for o in objects if o.get("kind") == "ConfigMap"}
    points = []
    for job in (o for o in objects if o.get("kind") == "RayJob"):
        meta = job["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        cm_name, mount = _mounted_config_map(job)
        if cm_name not in config_maps:
            raise ConfigError(f"RayJob '{meta['name']}' mounts ConfigMap '{cm_name}', which the chart did not render")
        files = dict(config_maps[cm_name])
        record = json.loads(files.get(POINT_FILE, "{}"))
        points.append(RenderedPoint(
            sweep=labels.get(SWEEP_LABEL, record.get("sweep", "")), name=labels.get(POINT_LABEL, meta["name"]),
            job=meta["name"], results_url=annotations.get(RESULTS_ANNOTATION, ""),
            entrypoint=str(job["spec"]["entrypoint"]), mount_path=mount, files=files,
            overrides=yaml.safe_load(files.get(OVERRIDES_FILE, "")) or {}, preset=str(record.get("preset", "default")),
            extra_target_zoos=[str(z) for z in record.get("extra_target_zoos") or []]))
    return points


def main(argv: list[str] | None = None) -> int:
    """``python -m mzsane.sweep run-point FILE`` (every chart RayJob's entrypoint), ``record-point SRC OUT``."""
    parser = argparse.ArgumentParser(prog="python -m mzsane.sweep")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-point", help="run a sweep point's stages from its mounted point file")
    run.add_argument("point_file")
    rec = sub.add_parser("record-point", help="copy the point's point.json beside its results")
    rec.add_argument("src")
    rec.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.command == "run-point":
            return run_point(args.point_file)
        record_point(args.src, args.out)
    except (OSError, MzsaneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
