"""``mzsane sweep run``: a sweep's points on one machine (local Ray on loopback) or on an existing Ray cluster.

Why it runs the *rendered* RayJobs: the chart is rendered exactly as ``helm install`` would, and each
point runs its RayJob's own entrypoint with its own ConfigMap files, so a local sweep and a cluster sweep
cannot drift. Only locations change: the ConfigMap's mount path (``/etc/mzsane``) becomes a local folder
holding the same files, and the chart's ``storage.root`` (always ``s3://`` for pods) becomes ``--storage``,
a local folder by default.

How: the entrypoint's stages (``point.plan``: record-point, train, sample, evaluate, probe) run one by one, each as
its own process group connected to the sweep's Ray instance through ``RAY_ADDRESS`` (``cluster.address:
auto`` resolves to it, as it resolves to KubeRay's head in a submitter pod). Points run side by side while
their ``cluster.num_workers x cluster.cpus_per_worker`` fit the Ray CPUs. Every finished stage is recorded
in ``{state}/{point}/state.json``: a re-run skips finished points and finished stages, and a killed
training stage restarts from the run's last checkpoint (the run name is the point's), so nothing finished
is computed twice. The zoos and shards the points read are built first (``prerequisites``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.config import Config
from mzsane.errors import ClusterError, ConfigError, MzsaneError
from mzsane.sweep import prerequisites
from mzsane.sweep.chart import render
from mzsane.sweep.lock import SweepLock
from mzsane.sweep.point import POINT_FILE, RenderedPoint, Stage, plan, rendered_points
from mzsane.sweep.results import ZERO_SHOT_METHOD, format_table, report

STATE_FILE = "state.json"
KILL_GRACE_S = 10.0


class PointFailed(ClusterError):
    """Some points of a local sweep failed; the others finished and are kept."""


@dataclass
class LocalPoint:
    """A rendered point placed on this machine, and where it stands."""

    rendered: RenderedPoint
    cfg: Config
    results_url: str
    state_dir: str  # local folder: the ConfigMap files (etc/), stage logs and state.json
    stages: list[Stage]
    cpus: int
    status: str = "queued"  # queued | running | done | failed
    stage: int = 0
    done_stages: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started: float = 0.0
    stage_started: float = 0.0
    wall_s: float = 0.0
    error: str = ""
    files: dict[str, str] = field(default_factory=dict)  # local path -> text of the ConfigMap's files

    @property
    def name(self) -> str:
        return self.rendered.name

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def log_path(self, index: int) -> str:
        return os.path.join(self.state_dir, f"{index}-{self.stage_names[index]}.log")


# ------------------------------------------------------------------------------------------- placing


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string under the storage root ``old`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and old and old != new and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


def place(point: RenderedPoint, storage_root: str, state_root: str, write: bool = True) -> LocalPoint:
    """The point with its ConfigMap files for ``{state_root}/{sweep}/{point}/etc`` (written unless ``write`` is
    false) and only locations rewritten: the mount path, and the storage root to ``storage_root``."""
    old_root = str((point.overrides.get("storage") or {}).get("root", ""))
    new_root = storage.absolute(storage_root) if storage_root else old_root
    state_dir = os.path.join(state_root, point.sweep, point.name)
    etc = os.path.join(state_dir, "etc")
    files = {}
    for key, text in point.files.items():
        if new_root != old_root and key.endswith((".yaml", ".yml")):
            text = yaml.safe_dump(_relocate(yaml.safe_load(text), old_root, new_root), sort_keys=False)
        elif new_root != old_root and key.endswith(".json"):
            text = json.dumps(_relocate(json.loads(text), old_root, new_root), indent=2, sort_keys=True) + "\n"
        files[os.path.join(etc, key)] = text
    if point.runs_point_file:  # planned from the relocated point file, as run-point plans from the mounted one
        stages = plan(os.path.join(etc, POINT_FILE), json.loads(files[os.path.join(etc, POINT_FILE)]))
    else:  # not the chart's run-point: the whole command as one stage, locations replaced
        command = point.stages()[0].argv[2].replace(f"{point.mount_path}/", f"{etc}/")
        stages = [Stage("entrypoint", ["bash", "-c", command.replace(old_root, new_root) if old_root else command])]
    overrides = _relocate(point.overrides, old_root, new_root)
    try:
        cfg = config_mod.from_dict(overrides, base=presets.PRESETS[point.preset]())
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"sweep point '{point.name}': {err}") from None
    placed = LocalPoint(point, cfg, _relocate(point.results_url, old_root, new_root), state_dir, stages,
                        cpus=max(int(cfg.cluster.num_workers) * int(cfg.cluster.cpus_per_worker), 1), files=files)
    if write:
        materialize(placed)
    return placed


def materialize(point: LocalPoint) -> None:
    """The ConfigMap's files in the local folder that stands in for its mount."""
    for path, text in point.files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_text(path, text)


def _state_root(storage_root: str) -> str:
    """Local bookkeeping beside the results when storage is local, else under the user's cache."""
    local = storage.local_path(storage.absolute(storage_root)) if storage_root else None
    if local:
        return os.path.join(local, "sweeps", ".run")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mzsane", "sweep-run")


def _load_state(point: LocalPoint) -> None:
    """Finished stages of earlier runs of this point; a point changed since then is refused."""
    path = os.path.join(point.state_dir, STATE_FILE)
    results = storage.join(point.results_url, "evaluate", "results.json")
    saved = storage.read_json(path) if os.path.exists(path) else {}
    if saved and saved.get("digest") != point.rendered.digest:
        raise ConfigError(f"sweep point '{point.name}' ran before with other settings; delete {point.results_url} "
                          f"and {point.state_dir} to run it again, or give the sweep another sweep.name")
    names, saved_done = point.stage_names, list(saved.get("done_stages", []))
    point.wall_s = float(saved.get("wall_s", 0.0))
    if storage.exists(results) and (saved_done == names or not saved):
        point.status, point.done_stages = "done", list(names)  # finished here, or by the same RayJob elsewhere
        return
    point.done_stages = saved_done if saved_done == names[:len(saved_done)] and saved_done != names else []
    point.stage = len(point.done_stages)


def _save_state(point: LocalPoint, **extra: Any) -> None:
    storage.write_json(os.path.join(point.state_dir, STATE_FILE), {
        "point": point.name, "digest": point.rendered.digest, "stages": point.stage_names,
        "done_stages": point.done_stages, "status": point.status, "wall_s": round(point.wall_s, 1),
        "results": point.results_url, **extra})


def _with_parent_death(argv: list[str]) -> list[str]:
    """``argv`` made to get SIGTERM when ``sweep run`` dies (util-linux ``setpriv``, where there is one), so a
    killed runner leaves no stage behind writing into a point a re-run is about to redo."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv and sys.platform.startswith("linux") else argv


def _start_stage(point: LocalPoint, env: dict[str, str]) -> None:
    index = point.stage
    with open(point.log_path(index), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(point.stages[index].argv)}\n".encode())
        log.flush()
        argv = _with_parent_death(point.stages[index].argv)
        point.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env={**env, "OMP_NUM_THREADS": str(point.cpus)},
                                      start_new_session=True)  # its own process group: stopped as a whole
    point.stage_started = time.time()
    _save_state(point, running=point.stage_names[index], pid=point.proc.pid)


def _stop(point: LocalPoint) -> None:
    """SIGTERM the stage's process group, SIGKILL what is left after a grace period."""
    if point.proc is None or point.proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(point.proc.pid, sig)
        try:
            point.proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(os.path.getsize(path) - 20_000, 0))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _train_step(point: LocalPoint) -> str:
    """'120/300' from the run's log.jsonl while the train stage runs."""
    url = storage.join(point.cfg.storage.root, "runs", point.cfg.run_name, "log.jsonl")
    try:
        lines = storage.read_text(url).strip().splitlines() if storage.exists(url) else []
        step = int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (MzsaneError, ValueError):
        return ""
    return f" {step}" + ("" if point.cfg.train.num_epochs else f"/{point.cfg.train.num_steps}")


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


# ------------------------------------------------------------------------------------------ the run


class Runner:
    """Schedules the points on the Ray CPUs, advances them stage by stage, and reports progress."""

    def __init__(self, points: list[LocalPoint], capacity: float, env: dict[str, str], max_parallel: int = 0,
                 progress_every: float = 30.0, log: Callable[[str], None] = print):
        self.points, self.capacity, self.env, self.log = points, capacity, env, log
        self.max_parallel = max_parallel or len(points)
        self.progress_every, self.t0 = progress_every, time.time()

    def _say(self, text: str) -> None:
        self.log(f"[sweep {_fmt_s(time.time() - self.t0)}] {text}")

    def _fits(self, point: LocalPoint, running: list[LocalPoint]) -> bool:
        if not running:
            return True
        if len(running) >= self.max_parallel or sum(p.cpus for p in running) + point.cpus > self.capacity:
            return False
        metrics = point.cfg.metrics  # fixed metrics ports of two points on one host would collide
        return not (metrics.enabled and metrics.port and any(
            p.cfg.metrics.enabled and p.cfg.metrics.port == metrics.port for p in running))

    def _advance(self, point: LocalPoint) -> None:
        """The running stage ended: record it, start the next one or finish the point."""
        assert point.proc is not None
        rc, name = point.proc.returncode, point.stage_names[point.stage]
        point.wall_s += time.time() - point.stage_started
        point.proc = None
        if rc != 0:
            point.status = "failed"
            point.error = f"{name} exited with {rc}" + (f" (signal {-rc})" if rc < 0 else "")
            _save_state(point, error=point.error)
            self._say(f"{point.name}: FAILED in {name} (exit {rc}); log {point.log_path(point.stage)}:\n"
                      + _tail(point.log_path(point.stage)))
            return
        point.done_stages.append(name)
        point.stage += 1
        if point.stage == len(point.stages):
            point.status = "done"
            _save_state(point)
            self._say(f"{point.name}: done in {_fmt_s(point.wall_s)} -> {point.results_url}")
            return
        self._say(f"{point.name}: {name} done, {point.stage_names[point.stage]} "
                  f"({point.stage + 1}/{len(point.stages)}) starting")
        _start_stage(point, self.env)

    def status_line(self) -> str:
        counts = {s: sum(1 for p in self.points if p.status == s) for s in ("done", "running", "queued", "failed")}
        running = [f"{p.name} {p.stage_names[p.stage]}{_train_step(p) if p.stage_names[p.stage] == 'train' else ''} "
                   f"{_fmt_s(time.time() - p.stage_started)}" for p in self.points if p.status == "running"]
        return (f"{counts['done']}/{len(self.points)} done, {counts['running']} running, {counts['queued']} queued"
                + (f", {counts['failed']} failed" if counts["failed"] else "")
                + (f" | {'; '.join(running)}" if running else ""))

    def run(self) -> None:
        queue = [p for p in self.points if p.status == "queued"]
        running: list[LocalPoint] = []
        last = 0.0
        try:
            while queue or running:
                while queue and self._fits(queue[0], running):
                    point = queue.pop(0)
                    point.status, point.started = "running", time.time()
                    resumed = f", resuming after {', '.join(point.done_stages)}" if point.done_stages else ""
                    self._say(f"{point.name}: {point.stage_names[point.stage]} ({point.stage + 1}/{len(point.stages)}) "
                              f"starting on {point.cpus} CPU{'s' if point.cpus > 1 else ''}{resumed}")
                    _start_stage(point, self.env)
                    running.append(point)
                time.sleep(0.5)
                for point in list(running):
                    if point.proc is not None and point.proc.poll() is not None:
                        self._advance(point)
                    if point.status != "running":
                        running.remove(point)
                if time.time() - last >= self.progress_every:
                    last = time.time()
                    self._say(self.status_line())
        except BaseException:
            for point in running:
                _stop(point)
                point.wall_s += time.time() - point.stage_started
                point.status = "queued"
                _save_state(point, interrupted=True)
            raise


def run(values: list[str], sets: list[str] | None = None, address: str = "", storage_root: str = "",
        max_parallel: int = 0, release: str = "mzsane", progress_every: float = 30.0, state_root: str = "",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every point of the sweep the values render; returns the points and the report. One runner
    per sweep and storage root at a time: a second is refused with one line naming the first (sweep/lock.py)."""
    with contextlib.ExitStack() as held:
        return _run(values, sets, address, storage_root, max_parallel, release, progress_every, state_root, log, held)


def _run(values: list[str], sets: list[str] | None, address: str, storage_root: str, max_parallel: int, release: str,
         progress_every: float, state_root: str, log: Callable[[str], None], held: contextlib.ExitStack
         ) -> dict[str, Any]:
    t0 = time.time()
    storage_root = storage_root if storage_root or address else config_mod.Config().storage.root
    points = [place(p, storage_root, state_root or _state_root(storage_root), write=False)
              for p in rendered_points(render(values, release, sets=sets))]
    if not points:
        raise ConfigError(f"values {', '.join(values)} render no sweep point; give sweep.grid or sweep.runs")
    for point in points:
        _load_state(point)
    sweep = points[0].rendered.sweep
    sweep_url = points[0].results_url.rstrip("/").rsplit("/", 1)[0]
    held.enter_context(SweepLock(sweep_url, sweep))  # before anything of the sweep is built, run or written
    todo = [p for p in points if p.status != "done"]
    for point in todo:
        materialize(point)
    log(f"sweep {sweep}: {len(points)} points, {len(points) - len(todo)} finished before, {len(todo)} to run; "
        f"results under {sweep_url}")
    if todo:
        cpus = os.cpu_count() or 1
        widest = max(todo, key=lambda p: p.cpus)
        if not address and widest.cpus > cpus:
            raise ClusterError(f"point '{widest.name}' needs {widest.cpus} CPUs (cluster.num_workers x "
                               f"cpus_per_worker) but this machine has {cpus}; lower worker.replicas or "
                               "worker.resources.cpu, or pass --address")
        extra = {p.name: p.rendered.extra_target_zoos for p in todo}
        prerequisites.check_anchor_pools({p.name: p.cfg for p in todo}, extra)
        prerequisites.ensure({p.name: p.cfg for p in todo}, log=lambda s: log(f"prerequisites: {s}"),
                             extra_targets=extra)
        from mzsane.train.launch import ray_connection  # torch comes with it: only when points run

        bin_dir = os.path.dirname(sys.executable)
        with ray_connection(address, todo[0].cfg.cluster.node_ip, cpus) as (ray_address, capacity):
            if widest.cpus > capacity:
                raise ClusterError(f"point '{widest.name}' needs {widest.cpus} CPUs but the Ray cluster has "
                                   f"{capacity:g}; lower worker.replicas or add nodes")
            env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30",
                   "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
            Runner(todo, capacity, env, max_parallel, progress_every, log).run()
    failed = [p for p in points if p.status == "failed"]
    summary: dict[str, Any] = {"sweep": sweep, "url": sweep_url, "wall_s": round(time.time() - t0, 1),
                               "points": [{"point": p.name, "status": p.status, "wall_s": round(p.wall_s, 1),
                                           "wall": _fmt_s(p.wall_s), "error": p.error} for p in points]}
    if len(failed) < len(points):
        summary["report"] = report(sweep_url)
    if failed:
        summary["failed"] = [p.name for p in failed]
    return summary


def run_cli(args: argparse.Namespace) -> None:
    summary = run(args.values, getattr(args, "sets", None) or [], args.address, args.storage, args.max_parallel,
                  args.release)
    print(format_table(summary["points"], ["point", "status", "wall", "error"]))
    if "report" in summary:
        rows = summary["report"]["rows"]
        zero_shot = [r for r in rows if r["method"] == ZERO_SHOT_METHOD] or rows
        print(format_table(zero_shot, ["target_zoo", "composition", "zoo_size", "axes", "point", "anchor_pool",
                                       "method", "test_acc_mean", "test_acc_std", "n"]))
        print(f"wrote {summary['report']['csv']} and {summary['report']['png']}")
    print(f"sweep {summary['sweep']} took {_fmt_s(summary['wall_s'])} (this invocation)")
    if summary.get("failed"):
        raise PointFailed(f"{len(summary['failed'])} point(s) failed: {', '.join(summary['failed'])}; see the logs "
                          f"above, then re-run the same command to resume them")
