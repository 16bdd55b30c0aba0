"""``mzsane demo``: the whole pipeline on the embedded default, ending in the comparison table.

Stages (each a plain function call, no subprocess): build the zoos -> shard the training zoos -> train a
single-zoo and a multi-zoo backbone (local Ray) -> sample for an in-distribution target (mnist-cnn_s,
in both backbones' data) and an out-of-distribution target (animal_mnist-cnn_s, a zoo neither backbone
saw) -> evaluate each against random init, the anchors and anchor soups -> print one table.

Re-running reuses finished stages: every stage writes a marker ``{root}/demo[-quick]/stages/<stage>.json``
LAST, holding the config it ran with; a stage whose marker exists with the same config is skipped, so an
interrupted demo resumes where it stopped and a changed setting re-runs only what depends on it.
Its settings are the ``demo`` preset (``mzsane.presets``); ``--quick`` is the ``demo_quick`` preset, which shrinks
every stage to run in a few minutes (results under ``demo-quick``).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

from mzsane import config as config_mod
from mzsane import storage
from mzsane.config import Config

ID_TARGET = "mnist-cnn_s"
OOD_TARGET = "animal_mnist-cnn_s"
SINGLE_ZOOS = [ID_TARGET]
MULTI_ZOOS = [ID_TARGET, "fashion_mnist-cnn_s", "mnist-resnet_mini"]
# the comparison table's columns: the selected figure beside the unselected one and the reconstruction ceiling,
# anchors beside the best k of the anchor pool by val (selection on equal footing); see evaluate/report.py
METHODS = ("generated", "generated_unselected", "reconstruction", "anchors", "anchors_selected", "soup_aligned",
           "random")
LABELS = {"generated": "top-k gen", "generated_unselected": "unselected", "reconstruction": "ceiling",
          "anchors": "anchors", "anchors_selected": "best-k anch", "soup_aligned": "al. soup", "random": "random"}
# further targets of the multi-zoo backbone (ID or OOD as its data says) so the fine-tuning comparison (SANE,
# HyperNetwork, random, anchors, soups) covers every dataset with a zoo; skipped where no zoo was built (--quick)
FINETUNE_TARGETS = ["fashion_mnist-cnn_s", "digits-cnn_s"]


class Stages:
    """Markers of finished stages under ``{demo}/stages``: run a stage once per config."""

    def __init__(self, demo_url: str):
        self.url = storage.join(demo_url, "stages")

    def run(self, name: str, settings: Any, fn: Callable[[], Any]) -> Any:
        marker = storage.join(self.url, f"{name}.json")
        key = json.loads(json.dumps(settings, default=str, sort_keys=True))
        if storage.exists(marker):
            saved = storage.read_json(marker)
            if saved.get("settings") == key:
                print(f"[demo] {name}: done before, reusing ({marker})", flush=True)
                return saved.get("result")
        print(f"[demo] {name}: running", flush=True)
        start = time.time()
        result = fn()
        storage.write_json(marker, {"settings": key, "result": result, "wall_s": round(time.time() - start, 1)})
        print(f"[demo] {name}: finished in {time.time() - start:.0f} s", flush=True)
        return result


def _sections(cfg: Config, *names: str) -> dict:
    return {n: config_mod.to_dict(getattr(cfg, n)) for n in names}


def demo(cfg: Config, quick: bool = False, out_url: str = "") -> dict:
    """Run (or resume) the demo with ``cfg`` (the ``demo`` preset, or ``demo_quick`` with ``quick``, which only
    names the output folder).

    Returns the summary (also written to ``{demo}/summary.json``).
    """
    from mzsane.evaluate.report import evaluate
    from mzsane.sample.generate import sample
    from mzsane.shards.writer import build_shards
    from mzsane.train.launch import train
    from mzsane.zoo.build import build_zoos

    cfg = copy.deepcopy(cfg)
    root = out_url or cfg.storage.root
    cfg.storage.root = root
    demo_url = storage.join(root, "demo-quick" if quick else "demo")
    zoos_url = storage.join(root, "zoos")
    shards_url = storage.join(demo_url, "shards")
    stages = Stages(demo_url)
    t0 = time.time()

    zoo_settings = _sections(cfg, "zoo")
    stages.run("zoos", zoo_settings, lambda: [z["zoo"] for z in build_zoos(cfg.zoo, zoos_url)["zoos"]])
    train_zoos = sorted({z for z in SINGLE_ZOOS + MULTI_ZOOS if storage.exists(storage.join(zoos_url, z, "zoo.json"))})
    if OOD_TARGET in train_zoos:
        raise AssertionError("the OOD target must never be sharded for training")
    shard_settings = {**zoo_settings, **_sections(cfg, "tokens", "shards"), "zoos": train_zoos}
    dataset_positions = stages.run("shards", shard_settings,
                                   lambda: build_shards([storage.join(zoos_url, z) for z in train_zoos], shards_url,
                                                        cfg.tokens, cfg.shards, progress=False).max_positions)

    runs = {}
    for name, zoos in (("single", SINGLE_ZOOS), ("multi", [z for z in MULTI_ZOOS if z in train_zoos])):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.data.shards_url, run_cfg.data.zoos = shards_url, zoos
        # both backbones get position tables for every sharded zoo (training sizes them for its own zoos
        # only): the probe stage encodes all of them with each backbone, the single-zoo one included
        run_cfg.model.max_positions = list(cfg.model.max_positions or dataset_positions)
        settings = {**_sections(run_cfg, "data", "model", "loss", "augment", "train", "tokens"),
                    "shards_stage": stages.url}
        # same settings -> same run (an interrupted training resumes); changed settings -> a new run
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        run_cfg.run_name = f"demo{'-quick' if quick else ''}-{name}-{digest}"
        runs[name] = stages.run(f"train-{name}", settings, lambda c=run_cfg: _train(train, c))

    rows, tables = [], []
    for backbone, run_url in runs.items():
        extra = [("", t) for t in FINETUNE_TARGETS  # one backbone is enough for the across-datasets view
                 if backbone == "multi" and storage.exists(storage.join(zoos_url, t, "zoo.json"))]
        for kind, target in [("ID", ID_TARGET), ("OOD", OOD_TARGET), *extra]:
            out = storage.join(demo_url, "samples", f"{backbone}-{target}")
            zoo_url = storage.join(zoos_url, target)
            settings = {"run": run_url, **_sections(cfg, "sample")}
            stages.run(f"sample-{backbone}-{target}", settings,
                       lambda r=run_url, z=zoo_url, o=out: _brief(sample(r, z, o, cfg.sample, progress=False)))
            res = stages.run(f"evaluate-{backbone}-{target}", {**settings, **_sections(cfg, "evaluate")},
                             lambda z=zoo_url, o=out: _summary(evaluate(o, z, cfg.evaluate)))
            tables.append(res["table"])
            kind = kind or ("ID" if res.get("in_distribution") else "OOD")
            results = [res]
            if res.get("in_distribution"):  # the paper's protocol beside ours: anchors the backbone trained on
                results.append(_seen_anchors(stages, cfg, run_url, zoo_url, out, f"{backbone}-{target}"))
            for r in (r for one in results for r in _pool_rows(one)):
                rows.append({"target": target, "kind": kind, "backbone": backbone, **r})
    finetune_rows, finetune_table = _finetune(demo_url, sorted({(r["backbone"], r["target"]) for r in rows}))
    probes = {}
    for b, run_url in runs.items():  # property probes of each backbone on every zoo of the shards
        probe_url = storage.join(demo_url, "probe", b)
        probes[b] = stages.run(f"probe-{b}", {"run": run_url, "zoos": train_zoos},
                               lambda r=run_url, o=probe_url: _probe(r, shards_url, train_zoos, o))
    summary = {"root": root, "demo": demo_url, "rows": rows, "wall_s": round(time.time() - t0, 1),
               "plots": {f"{b}-{t}": storage.join(demo_url, "samples", f"{b}-{t}", "evaluate")
                         for b in runs for t in (ID_TARGET, OOD_TARGET)},
               "finetune": finetune_rows, "probe": {b: p["rows"] for b, p in probes.items()}}
    storage.write_json(storage.join(demo_url, "summary.json"), summary)
    storage.write_text(storage.join(demo_url, "summary.csv"), _csv(rows))
    for table in tables:
        print(table)
    print(comparison_table(rows))
    print(finetune_table)
    for p in probes.values():
        print(p["table"])
    print(f"plots and results: {storage.join(demo_url, 'samples')}/<backbone>-<target>/evaluate/ "
          f"(accuracy.png, finetune.png, soup.png, results.json); summary: {storage.join(demo_url, 'summary.csv')}")
    print(f"demo took {summary['wall_s']:.0f} s (this invocation)")
    return summary


def _seen_anchors(stages: Stages, cfg: Config, run_url: str, zoo_url: str, out: str, name: str) -> dict:
    """Sample and evaluate ``name`` again under the paper's protocol (``mzsane.sample.protocol``: seen anchors,
    no fine-tuning or HyperNetwork arms) into ``{out}/anchors-seen``."""
    from mzsane.evaluate.report import evaluate
    from mzsane.sample.generate import sample
    from mzsane.sample.protocol import SEEN_ANCHORS_FOLDER, seen_overrides

    seen_cfg = copy.deepcopy(cfg)
    for key, value in seen_overrides(cfg.sample.num_anchors, cfg.data.num_models_per_zoo).items():
        config_mod.apply_override(seen_cfg, f"{key}={value}")
    seen, ev = seen_cfg.sample, seen_cfg.evaluate
    seen_out = storage.join(out, SEEN_ANCHORS_FOLDER)
    settings = {"run": run_url, "sample": config_mod.to_dict(seen)}
    stages.run(f"sample-seen-{name}", settings,
               lambda: _brief(sample(run_url, zoo_url, seen_out, seen, progress=False)))
    return stages.run(f"evaluate-seen-{name}", {**settings, "evaluate": config_mod.to_dict(ev)},
                      lambda: _summary(evaluate(seen_out, zoo_url, ev)))


def _pool_rows(res: dict) -> list[dict]:
    """An evaluation's method rows, each marked with whether its anchors were held out."""
    held = res.get("headline", {}).get("anchors_held_out")
    return [{**r, "anchors_held_out": held, "anchor_pool": "held-out" if held else "seen"} for r in res["rows"]]


def _train(train: Callable[..., str], cfg: Config) -> str:
    return train(cfg)


def _finetune(demo_url: str, pairs: list[tuple[str, str]]) -> tuple[list[dict], str]:
    """Fine-tuning curves of every (backbone, target) as one table and ``{demo}/finetune.png``."""
    from mzsane.evaluate import finetune as ft

    results = [storage.read_json(storage.join(demo_url, "samples", f"{b}-{t}", "evaluate", "results.json"))
               for b, t in pairs]
    for res, (b, _) in zip(results, pairs):
        res["backbone"] = b  # the demo's name for the run, not its URL
    rows = ft.comparison_rows(results)
    if rows:
        ft.write_comparison_plot(rows, storage.join(demo_url, "finetune.png"))
    return [{k: v for k, v in r.items() if not k.startswith("curve_")} for r in rows], ft.format_comparison(rows)


def _probe(run_url: str, shards_url: str, zoos: list[str], out_url: str) -> dict:
    from mzsane.probe.report import format_table, probe

    results = probe(run_url, zoos, shards_url, out_url)
    return {"rows": results["rows"], "table": format_table(results, out_url.rstrip("/").split("/")[-1])}


def _brief(results: dict) -> dict:
    return {k: results[k] for k in ("target_zoo", "in_distribution", "generated", "timings", "peak_rss_bytes")}


def _summary(results: dict) -> dict:
    from mzsane.evaluate.report import format_table

    return {"rows": results["rows"], "table": format_table(results), "novelty": results["novelty"]["summary"],
            "in_distribution": results["in_distribution"], "headline": results.get("headline", {}),
            "verdict": results["novelty"].get("matched", {}).get("verdict", ""),
            "finetune": results["finetune"]}


def comparison_table(rows: list[dict]) -> str:
    """ID/OOD x single/multi rows, one column per method: mean +- std test accuracy. The headline is "top-k gen"
    on rows whose anchors are held out (never in that backbone's training selection); rows with seen anchors
    are marked, since decoding a trained-on anchor measures memorization, not generation."""
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["target"], r["backbone"], not r.get("anchors_held_out")), {})[r["method"]] = r
    head = f"{'target':<24}{'backbone':<9}{'anchors':<9}" + "".join(f"{LABELS[m]:>13}" for m in METHODS)
    lines = ["", "zero-shot test accuracy (mean +- std over models; top-k gen = best k of the candidates by val, "
             "unselected = the first k candidates, ceiling = decode(encode(anchor)) without noise, best-k anch = "
             "best k of the anchor pool by val)", head, "-" * len(head)]
    order = sorted(by.items(), key=lambda kv: (kv[0][0] != "ID", kv[0][2], kv[0][3]))
    for (kind, target, backbone, seen), cells in order:
        held = not seen
        vals = "".join(f"{cells[m]['test_acc_mean']:>8.3f}+-{cells[m]['test_acc_std']:.2f}" if m in cells
                       else f"{'-':>13}" for m in METHODS)
        lines.append(f"{kind + ' ' + target:<24}{backbone:<9}{'held-out' if held else 'SEEN':<9}{vals}")
    lines.append("details and the paper's findings measured: docs/results.md")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["kind", "target", "backbone", "anchor_pool", "method", "test_acc_mean",
                                        "test_acc_std", "n"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in w.fieldnames})
    return buf.getvalue()


def demo_cli(args: Any) -> dict:
    """``mzsane demo [--quick] [--out URL]``: ``args.cfg`` is the demo preset (``--quick``: demo_quick) with the
    config files and ``--set`` overrides applied."""
    cfg, quick = args.cfg, args.preset == "demo_quick"
    out_url = getattr(args, "out", "") or ""
    if not storage.is_remote(out_url or cfg.storage.root):
        # local data: nothing may leave the machine, not even the AWS SDK's instance-metadata lookup (Ray
        # workers inherit this environment)
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return demo(cfg, quick=quick, out_url=out_url)
