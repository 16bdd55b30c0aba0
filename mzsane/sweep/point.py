"""A sweep point: its identity record, and the point as the chart rendered it (RayJob + ConfigMap).

Why one module: the chart's RayJob writes ``{sweep}/{point}/point.json`` as its first step (``python -m
mzsane.sweep record-point``) so ``sweep report`` knows a point's coordinates (zoos, zoo size, axes)
without the cluster; ``sweep run`` reads every point back out of the *rendered* objects (entrypoint,
ConfigMap files, where they are mounted) instead of rebuilding them, so a local run executes exactly
what the cluster would. This module stays light (no Helm, no Kubernetes, no Ray): it runs in every RayJob.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from mzsane import storage
from mzsane.errors import ConfigError, MzsaneError

SWEEP_LABEL, POINT_LABEL, RESULTS_ANNOTATION = "mzsane.io/sweep", "mzsane.io/point", "mzsane.io/results"
OVERRIDES_FILE, POINT_FILE = "overrides.yaml", "point.json"


def record_point(src_file: str, out_url: str) -> None:
    """Copy the point's identity (the ConfigMap's point.json) beside its results, for ``report``."""
    with open(src_file, encoding="utf-8") as fh:
        point = json.load(fh)
    storage.write_json(storage.join(out_url, "point.json"), point)


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

    def stages(self) -> list[list[str]]:
        """The entrypoint's ``A && B && C`` chain as argv lists (one stage each), or one ``bash -c`` stage.

        Running the parts one by one with stop-on-failure is what ``&&`` means; splitting lets a resumed
        run skip the stages that finished. Anything but a plain ``&&`` chain runs as one shell command."""
        lexer = shlex.shlex(self.entrypoint, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            return [["bash", "-c", self.entrypoint]]
        operators = {t for t in tokens if t and all(c in "();<>|&" for c in t)}
        if operators - {"&&"}:
            return [["bash", "-c", self.entrypoint]]
        stages, current = [], []
        for token in [*tokens, "&&"]:
            if token == "&&":
                if current:
                    stages.append(current)
                current = []
            else:
                current.append(token)
        return stages


def stage_name(argv: list[str]) -> str:
    """``mzsane train ...`` -> train; ``python -m mzsane.sweep record-point ...`` -> record-point."""
    words = [w for w in argv if not w.startswith("-")]
    if "-m" in argv and len(argv) > argv.index("-m") + 2:
        return argv[argv.index("-m") + 2]
    if words and words[0].rsplit("/", 1)[-1] == "mzsane" and len(words) > 1:
        return words[1]
    return argv[0].rsplit("/", 1)[-1] if argv else "?"


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
