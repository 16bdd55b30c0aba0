"""The sampling rows of the cause table (issue 26): each knob on the causes sweep's baseline backbones, no retraining.

Usage: .venv/bin/python docs/results/causes_knobs.py mzsane-data/sweeps/causes [--parallel 2]
then:  mzsane sweep report mzsane-data/sweeps/causes --baseline 'mnist n=32'

Why not sweep points: a point trains its own backbone, and a sampling knob changes nothing before sampling, so
a knob point would retrain the baseline's backbone bit for bit (1,200 steps per seed). Here every knob x seed
samples and evaluates with the baseline point's own files (``.run/causes/{point}/etc/overrides.yaml``) plus the
knob, from the baseline's backbone, into a point folder of the sweep (``{sweep}/{knob}-{seed}/``) whose
``point.json`` is the baseline's with the knob added to its axes: ``sweep report`` then pairs it by seed with
the baseline it shares a backbone with. Held-out anchors, in distribution and out (the extra target zoos); the
seen-anchor protocol is the baseline's alone. A finished target (its ``evaluate/results.json``) is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

KNOBS = {  # row name -> (config path, value): jobs/causes.yaml's sampling causes
    "anchors10": ("sample.num_anchors", 10),
    "bw0-1": ("sample.bandwidth", 0.1),
    "bw0-4": ("sample.bandwidth", 0.4),
    "cand500": ("sample.num_candidates", 500),
}
BASELINE = "n32-mnist-{seed}"


def tasks(sweep_dir: str, seeds: list[int], first_target_only: bool = False) -> list[list[str]]:
    """The ``mzsane sample`` + ``evaluate`` commands still to run, writing each knob point's point.json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sweep_dir)))
    sweep = os.path.basename(os.path.abspath(sweep_dir))
    mz = [sys.executable, "-m", "mzsane"]
    out = []
    for seed in seeds:
        base = BASELINE.format(seed=seed)
        with open(os.path.join(sweep_dir, base, "point.json"), encoding="utf-8") as fh:
            record = json.load(fh)
        overrides = os.path.join(root, "sweeps", ".run", sweep, base, "etc", "overrides.yaml")
        backbone = os.path.join(root, "runs", record["overrides"]["run_name"])
        for knob, (path, value) in KNOBS.items():
            name = f"{knob}-{seed}"
            point = os.path.join(sweep_dir, name)
            os.makedirs(point, exist_ok=True)
            knob_record = {**record, "point": name, "axes": {**record["axes"], path: value}}
            with open(os.path.join(point, "point.json"), "w", encoding="utf-8") as fh:
                json.dump(knob_record, fh, indent=2, sort_keys=True)
            cfg = ["--preset", record["preset"], "--config", overrides, "--set", f"{path}={value}"]
            extra = [] if first_target_only else list(record.get("extra_target_zoos", []))
            for zoo in [record["target_zoo"], *extra]:
                where = point if zoo == record["target_zoo"] else os.path.join(point, "targets", zoo)
                if os.path.exists(os.path.join(where, "evaluate", "results.json")):
                    continue
                zoo_url = os.path.join(root, "zoos", zoo)
                out.append([*mz, "sample", *cfg, "--backbone", backbone, "--zoo", zoo_url, "--out", where])
                out.append([*mz, "evaluate", *cfg, "--samples", where, "--zoo", zoo_url])
    return out


def _run_pair(pair: list[list[str]]) -> int:
    for argv in pair:
        print(" ".join(argv), flush=True)
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL).returncode
        if rc:
            return rc
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="{storage.root}/sweeps/causes, after `mzsane sweep run` of jobs/causes.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="targets sampled at once (one core each)")
    parser.add_argument("--first-target-only", action="store_true",
                        help="only the sweep's target zoo (in distribution), not its extra target zoos")
    args = parser.parse_args()
    if args.parallel > 1:  # one core per target, as a local sweep point has
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    commands = tasks(args.sweep_dir, args.seeds, args.first_target_only)
    pairs = [commands[i:i + 2] for i in range(0, len(commands), 2)]  # sample, then evaluate, per target
    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        failed = sum(1 for rc in pool.map(_run_pair, pairs) if rc)
    print(f"{len(pairs) - failed} of {len(pairs)} knob targets done, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
