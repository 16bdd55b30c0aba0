"""Single- vs multi-zoo backbones at equal exposure, held-out anchors, several seeds (docs/results.md, section 2).

Usage: .venv/bin/python docs/results/measure_single_vs_multi.py ROOT [--epochs E] [--seeds 0,1,2]
    [--candidates N] [--keep K]

ROOT holds the demo's zoos under ROOT/zoos (``mzsane zoo build --out ROOT/zoos``). Everything else goes under
ROOT/issue13: shards of the three training zoos (all epochs; the trained tail is chosen at read time),
one run per (backbone, seed) trained with ``train.num_epochs`` (no Ray: the same loop, one process),
``mzsane sample`` + ``mzsane evaluate`` for the ID and OOD targets with held-out anchors, and
``summary.json`` with every figure. Finished stages are reused (a marker per stage).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

from mzsane import config as config_mod
from mzsane import storage

ID_TARGET, OOD_TARGET = "mnist-cnn_s", "animal_mnist-cnn_s"
BACKBONES = {"single": ["mnist-cnn_s"], "multi": ["mnist-cnn_s", "fashion_mnist-cnn_s", "mnist-resnet_mini"]}


def _stage(marker: str, fn):
    if os.path.exists(marker):
        with open(marker) as fh:
            return json.load(fh)
    t0 = time.time()
    out = fn()
    out = {"result": out, "wall_s": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as fh:
        json.dump(out, fh, indent=1, default=str)
    return out


def main() -> None:
    from mzsane.evaluate.report import evaluate
    from mzsane.sample.generate import sample
    from mzsane.shards.writer import build_shards
    from mzsane.train.launch import train

    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--epochs", type=float, default=150)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--backbones", default="single,multi")
    a = ap.parse_args()
    root = os.path.abspath(a.root)
    work = os.path.join(root, "issue13")
    marks = os.path.join(work, "stages")
    cfg = config_mod.load("default", [], [
        "train.lr=1e-3", f"train.num_epochs={a.epochs}", "train.checkpoint_every_n_steps=-1",
        "train.eval_every_n_steps=-1", "train.log_every_n_steps=50", "metrics.enabled=false",
        f"sample.num_candidates={a.candidates}", f"sample.num_keep={a.keep}", "sample.max_val_images=2000",
        "evaluate.max_train_models=6", "evaluate.finetune_epochs=0", "evaluate.num_novelty_images=500"])
    cfg.storage.root = work
    shards = os.path.join(work, "shards")
    zoos = sorted({z for zs in BACKBONES.values() for z in zs})
    _stage(os.path.join(marks, "shards.json"), lambda: build_shards(
        [os.path.join(root, "zoos", z) for z in zoos], shards, cfg.tokens, cfg.shards, progress=False).max_positions)
    summary = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in a.backbones.split(","):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.data.shards_url, run_cfg.data.zoos = shards, BACKBONES[name]
            run_cfg.train.seed = run_cfg.data.seed = run_cfg.sample.seed = run_cfg.evaluate.seed = seed
            run_cfg.run_name = f"{name}-e{a.epochs:g}-s{seed}"
            trained = _stage(os.path.join(marks, f"train-{run_cfg.run_name}.json"),
                             lambda c=run_cfg: train(c, no_ray=True))
            run_url = trained["result"]
            exposure = storage.read_json(os.path.join(run_url, "exposure.json"))
            for kind, target in (("ID", ID_TARGET), ("OOD", OOD_TARGET)):
                out = os.path.join(work, "samples", f"{run_cfg.run_name}-{target}")
                zoo_url = os.path.join(root, "zoos", target)
                s = _stage(os.path.join(marks, f"sample-{run_cfg.run_name}-{target}.json"),
                           lambda o=out, z=zoo_url, c=run_cfg, r=run_url: {k: v for k, v in sample(
                               r, z, o, c.sample, progress=False).items() if k in ("anchors", "timings")})
                e = _stage(os.path.join(marks, f"evaluate-{run_cfg.run_name}-{target}.json"),
                           lambda o=out, z=zoo_url, c=run_cfg: _brief(evaluate(o, z, c.evaluate)))
                print(e["result"]["table"], flush=True)
                summary.append({"backbone": name, "seed": seed, "kind": kind, "target": target,
                                "train_s": trained["wall_s"], "sample_s": s["wall_s"], "evaluate_s": e["wall_s"],
                                "exposure": exposure, **{k: v for k, v in e["result"].items() if k != "table"}})
                with open(os.path.join(work, "summary.json"), "w") as fh:
                    json.dump(summary, fh, indent=1, default=str)


def _brief(res: dict) -> dict:
    from mzsane.evaluate.report import format_table

    return {"table": format_table(res), "rows": res["rows"], "headline": res["headline"],
            "candidates": res["candidates"], "anchor_provenance": res["anchor_provenance"],
            "matched": {k: v for k, v in res["novelty"]["matched"].items() if k not in ("generated", "reference")},
            "novelty_summary": res["novelty"]["summary"]}


if __name__ == "__main__":
    sys.exit(main())
