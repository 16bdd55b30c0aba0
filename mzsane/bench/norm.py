"""``mzsane bench norm``: the loss-normalization ablation on a ResNet zoo, as numbers and as the Figure-2 plot.

Trains one backbone per ``loss.norm_mode`` (none, layer, token_unmasked, token, each averaged over valid
entries, plus layer and token averaged per token first: ``loss.reduction``; same data, seed and budget, no
Ray) on ``{storage.root}/zoos/mnist-resnet_mini`` (built with the demo recipe when absent), reconstructs
the zoo's held-out models (never in the backbones' training selection) without noise, and writes
``{storage.root}/bench/norm/figure2.png`` (per-layer histograms, original vs reconstructed) and
``results.json``: per variant the relative error per layer kind (conv, BN weight, BN bias, linear) and the
test accuracy of the reconstructions after BN re-estimation. Finished runs are reused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any

MODES = ("none", "layer", "token_unmasked", "token")
# (label, loss.norm_mode, loss.reduction): the four statistics averaged over valid entries, and the two masked
# ones averaged per token first (what token_unmasked does implicitly: its padded std scales a token with n
# valid entries by ~288/n, so every token weighs about the same)
VARIANTS = (*((m, m, "entry") for m in MODES), ("layer/token-mean", "layer", "token"),
            ("token/token-mean", "token", "token"),
            # between the two (issue 25.3): token weight n^0.5 (loss.token_weight_alpha's default), every layer alike
            ("token/n^0.5", "token", "token_power"), ("token/layer-mean", "token", "layer"))
ZOO = "mnist-resnet_mini"


def _zoo(cfg: Any, zoos_url: str) -> str:
    from mzsane import storage
    from mzsane.zoo.build import build_zoos

    url = storage.join(zoos_url, ZOO)
    if not storage.exists(storage.join(url, "zoo.json")):
        zc = copy.deepcopy(cfg.zoo)
        zc.recipe, zc.datasets, zc.extra_zoos = "demo", [], ["mnist:resnet_mini"]
        build_zoos(zc, zoos_url, show_progress=False)
    return url


def run(args: Any) -> dict:
    import torch

    from mzsane import storage
    from mzsane.evaluate import reconstruction as rec
    from mzsane.model.backbone import condition_bn, load_backbone
    from mzsane.sample.anchors import seen_models, usable_records
    from mzsane.sample.generate import build_kwargs, conditioning_images
    from mzsane.shards.manifest import MANIFEST
    from mzsane.shards.writer import build_shards
    from mzsane.train.checkpoint import latest_checkpoint_url, step_of
    from mzsane.train.launch import train
    from mzsane.zoo.datasets import load_dataset
    from mzsane.zoo.evaluation import evaluate_models
    from mzsane.zoo.store import open_zoo

    quick = bool(getattr(args, "quick", False))
    cfg = copy.deepcopy(args.cfg)
    cfg.storage.root = storage.absolute(cfg.storage.root)
    bench_url = storage.join(cfg.storage.root, "bench", "norm")
    zoo_url = _zoo(cfg, storage.join(cfg.storage.root, "zoos"))
    shards_url = storage.join(bench_url, "shards")
    if not storage.exists(storage.join(shards_url, MANIFEST)):
        build_shards([zoo_url], shards_url, cfg.tokens, cfg.shards, progress=False)
    cfg.data.shards_url = shards_url
    cfg.train.lr, cfg.metrics.enabled = 1e-3, False
    cfg.train.num_steps = 150 if quick else 800
    cfg.train.checkpoint_every_n_steps = cfg.train.eval_every_n_steps = cfg.train.num_steps
    out: dict[str, Any] = {"zoo": zoo_url, "num_steps": cfg.train.num_steps, "modes": {}}
    reader = open_zoo(zoo_url)
    records = usable_records(reader)
    epoch = min(max(r.checkpoint_epochs or [e["epoch"] for e in r.epochs]) for r in records)
    reconstructions, originals = {}, None
    dataset = load_dataset(reader.info.dataset)
    for label, mode, reduction in VARIANTS:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.loss.norm_mode, run_cfg.loss.reduction = mode, reduction
        key = [mode, run_cfg.train.num_steps, run_cfg.train.seed, run_cfg.model.d_model]
        key += [reduction] if reduction != "entry" else []  # entry-mean runs keep their earlier names
        key += [run_cfg.loss.token_weight_alpha] if reduction == "token_power" else []
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
        run_cfg.run_name = f"bench-norm-{mode}{'-' + reduction if reduction != 'entry' else ''}-{digest}"
        run_url = storage.join(cfg.storage.root, "runs", run_cfg.run_name)
        t0 = time.time()
        latest = latest_checkpoint_url(run_url)
        if latest is None or step_of(latest) < run_cfg.train.num_steps:
            train(run_cfg, no_ray=True)
        train_s = time.time() - t0
        model, saved_cfg = load_backbone(run_url)
        seen = seen_models(saved_cfg, reader.info.zoo) or set()
        held_out = [r.model_id for r in records if r.model_id not in seen]
        if originals is None:
            originals = [reader.load_checkpoint(m, epoch) for m in held_out]
        t0 = time.time()
        recon = rec.reconstruct(model, originals, saved_cfg.tokens, cfg.sample.halo_window, cfg.sample.halo_size)
        kwargs = build_kwargs(reader.info.architecture, dict(reader.info.arch_kwargs or {}), records[0].hparams)
        images = conditioning_images(dataset, cfg.sample.bn_iterations * cfg.sample.bn_batch_size, cfg.sample.seed)
        conditioned = condition_bn(kwargs, recon, images, cfg.sample.bn_iterations, cfg.sample.bn_batch_size,
                                   cfg.sample.seed)
        accs = [float(a) for _, a in evaluate_models(kwargs, conditioned, dataset.test.x, dataset.test.y, 1000)]
        errors = rec.layer_errors(originals, recon)
        reconstructions[label] = recon
        out["modes"][label] = {"norm_mode": mode, "reduction": reduction, "run": run_url,
                               "train_s": round(train_s, 1), "reconstruct_s": round(time.time() - t0, 1),
                               "held_out_models": held_out, "rel_error_by_kind": errors["kinds"],
                              "test_acc_reconstructed": accs, "layers": errors["layers"]}
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    orig_accs = [float(a) for _, a in evaluate_models(
        build_kwargs(reader.info.architecture, dict(reader.info.arch_kwargs or {}), records[0].hparams),
        originals, dataset.test.x, dataset.test.y, 1000)]
    out["test_acc_original"] = orig_accs
    out["figure"] = rec.figure(originals, reconstructions, storage.join(bench_url, "figure2.png"),
                               f"{ZOO}: held-out models, original vs decode(encode(m))")
    storage.write_text(storage.join(bench_url, "results.json"), json.dumps(out, indent=2))
    return {k: v for k, v in out.items() if k != "modes"} | {
        "modes": {m: {k: v for k, v in d.items() if k != "layers"} for m, d in out["modes"].items()}}
