"""``mzsane zoo build``: train one zoo per (dataset, architecture), batched, resumable, local or s3://.

Why it is shaped like this: a zoo build is hours of CPU on real sizes, so it must survive interruption.
Every model is written checkpoints-first and its ``model.json`` (or modelzoos.cc ``result.json``) last;
a re-run lists what is finished and trains only the rest, with the same hyper-parameters (recipes are
deterministic in the zoo seed). Models are trained in populations of ``zoo.population_batch`` that
share activation, dropout and batch size (one batched structure), see ``population.py``. A diverged
model is written with ``status: "diverged"`` and the reason, and listed in the summary; a population
that crashes is listed as failed and retried on the next run.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mzsane import storage
from mzsane.config import ZooConfig
from mzsane.errors import ConfigError, DataError, MzsaneError
from mzsane.zoo import store
from mzsane.zoo.architectures import get_architecture
from mzsane.zoo.datasets import ImageDataset, load_dataset
from mzsane.zoo.modelzoos import write_modelzoos_model
from mzsane.zoo.population import train_chunk_size, train_population
from mzsane.zoo.recipes import get_recipe, resolve_sizes
from mzsane.zoo.records import ModelRecord, ZooInfo


@dataclass
class ZooPlan:
    """One zoo to build: where its models come from and how big it is."""

    name: str
    dataset: str
    architecture: str
    sizes: dict
    members: list[tuple[str, dict]]  # (model_id, hparams)


def _parse_extra(spec: str) -> tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"zoo.extra_zoos entry '{spec}' must be dataset:architecture[:num_models], "
                          "e.g. mnist:resnet_mini:8")
    try:
        count = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ConfigError(f"zoo.extra_zoos entry '{spec}': num_models '{parts[2]}' is not an integer") from None
    return parts[0], parts[1], count


def plan_zoos(cfg: ZooConfig) -> list[ZooPlan]:
    """The zoos ``cfg`` asks for, each with its deterministic list of (model_id, hparams)."""
    recipe = get_recipe(cfg.recipe)
    overrides = {k: getattr(cfg, k) for k in ("num_models", "num_epochs", "batch_size", "max_train_images",
                                              "max_eval_images")}
    wanted = [(d, cfg.architecture, overrides) for d in cfg.datasets]
    for spec in cfg.extra_zoos:
        dataset, arch, count = _parse_extra(spec)
        wanted.append((dataset, arch, {**overrides, "num_models": count}))
    plans = []
    for dataset, arch, over in wanted:
        entry = get_architecture(arch)
        sizes = resolve_sizes(cfg.recipe, arch, over)
        members = recipe.members(sizes["num_models"], cfg.seed, arch, sizes["batch_size"])
        for hp in members:
            hp["activation"] = hp["activation"] or entry.default_activation
        plans.append(ZooPlan(f"{dataset}-{arch}", dataset, arch, sizes,
                             [(f"m{i:05d}", hp) for i, hp in enumerate(members)]))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError(f"zoo names repeat ({', '.join(names)}); list each dataset:architecture once")
    return plans


def _save_epochs(cfg: ZooConfig, num_epochs: int) -> list[int]:
    epochs = sorted(set(cfg.save_epochs)) if cfg.save_epochs else list(range(num_epochs + 1))
    bad = [e for e in epochs if e < 0 or e > num_epochs]
    if bad:
        raise ConfigError(f"zoo.save_epochs {bad} are outside 0..{num_epochs}; choose epochs within the training")
    return epochs


def _finished(zoo_url: str, layout: str, writer: store.ZooWriter | None) -> set[str]:
    if layout == "mzsane":
        return writer.finished_models()
    if not storage.exists(zoo_url):
        return set()
    return {m for m in storage.listdir(zoo_url) if storage.exists(storage.join(zoo_url, m, "result.json"))}


def _groups(todo: list[tuple[str, dict]], spec: dict, population_batch: int) -> list[list[tuple[str, dict]]]:
    """Chunks of models sharing activation, dropout and batch size, sized by ``train_chunk_size``."""
    by_key: dict[tuple, list] = {}
    for model_id, hp in todo:
        by_key.setdefault((hp["activation"], hp["dropout"], hp["batch_size"]), []).append((model_id, hp))
    chunks = []
    for (act, drop, batch), members in by_key.items():
        size = train_chunk_size({**spec, "activation": act, "dropout": drop}, batch, population_batch)
        size = math.ceil(len(members) / math.ceil(len(members) / size))  # even chunks
        for start in range(0, len(members), size):
            chunks.append(members[start:start + size])
    return chunks


def _final_stats(zoo_url: str) -> dict:
    records = store.open_zoo(zoo_url).models()
    ok = [r for r in records if r.status == "ok" and r.epochs]
    accs = [float(r.epochs[-1].get("test_acc", math.nan)) for r in ok]
    accs = [a for a in accs if math.isfinite(a)]
    stats = {"num_models": len(records), "num_ok": len(ok),
             "diverged": sorted(r.model_id for r in records if r.status == "diverged")}
    if accs:
        stats.update(test_acc_mean=statistics.fmean(accs), test_acc_std=statistics.pstdev(accs),
                     test_acc_min=min(accs), test_acc_max=max(accs))
    return stats


def _advance(bar: tqdm, amount: float) -> None:
    """Fractional steps (models / steps per epoch) sum with float error: never run past the total."""
    bar.update(max(0.0, min(amount, (bar.total or 0) - bar.n)))


def _build_one(plan: ZooPlan, data: ImageDataset, cfg: ZooConfig, zoo_url: str, bar: tqdm) -> dict:
    sizes = plan.sizes
    shared = {"architecture": plan.architecture, **data.arch_kwargs()}
    acts = {hp["activation"] for _, hp in plan.members}
    drops = {hp["dropout"] for _, hp in plan.members}
    zoo_kwargs = {**data.arch_kwargs(), **({"activation": acts.pop()} if len(acts) == 1 else {}),
                  **({"dropout": drops.pop()} if len(drops) == 1 else {})}
    info = ZooInfo(zoo=plan.name, dataset=plan.dataset, architecture=plan.architecture,
                   arch_kwargs=zoo_kwargs, recipe=cfg.recipe, num_models=len(plan.members), seed=int(cfg.seed))
    writer = store.ZooWriter(zoo_url, info) if cfg.layout == "mzsane" else None
    done = _finished(zoo_url, cfg.layout, writer)
    todo = [(mid, hp) for mid, hp in plan.members if mid not in done]
    bar.total = (bar.total or 0) - (len(plan.members) - len(todo)) * sizes["num_epochs"]
    bar.refresh()
    train = data.train.subset(sizes["max_train_images"], seed=cfg.seed)
    evals = {"val": data.val.subset(sizes["max_eval_images"], seed=0),
             "test": data.test.subset(sizes["max_eval_images"], seed=0)}
    save = _save_epochs(cfg, sizes["num_epochs"])
    if done and todo and cfg.layout == "mzsane":
        _check_same_training(zoo_url, sorted(done)[0], sizes["num_epochs"], len(train), save)
    failed: dict[str, str] = {}
    for chunk in _groups(todo, shared, cfg.population_batch):
        bar.set_description(f"{plan.name} ({len(chunk)} models)")
        try:
            results = train_population(shared, [hp for _, hp in chunk], data, sizes["num_epochs"], save,
                                       train=train, eval_splits=evals, seed=cfg.seed,
                                       progress=functools.partial(_advance, bar),
                                       epoch0_train_images=len(evals["test"]))
        except (RuntimeError, ValueError) as err:  # a crashed population is reported, retried next run
            for mid, _ in chunk:
                failed[mid] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        for (model_id, hp), res in zip(chunk, results):
            kwargs = {**data.arch_kwargs(), "activation": hp["activation"], "dropout": hp["dropout"]}
            record = ModelRecord(
                zoo=plan.name, model_id=model_id, dataset=plan.dataset, architecture=plan.architecture,
                arch_kwargs=kwargs, status=res.status, error=res.error, epochs=res.epochs,
                hparams={**hp, "recipe": cfg.recipe, "num_epochs": sizes["num_epochs"],
                         "max_train_images": len(train), "eval_images": len(evals["test"])})
            if cfg.layout == "mzsane":
                writer.write_model(record, res.checkpoints)
            else:
                write_modelzoos_model(zoo_url, record, res.checkpoints)
            if res.status != "ok":
                tqdm.write(f"{plan.name}/{model_id}: {res.status}: {res.error}")
    stats = _final_stats(zoo_url) if (todo or done) and storage.exists(zoo_url) else {}
    return {"zoo": plan.name, "url": zoo_url, "dataset": plan.dataset, "architecture": plan.architecture,
            "sizes": sizes, "trained": len(todo) - len(failed), "skipped_finished": len(done),
            "failed": failed, **stats}


def _check_same_training(zoo_url: str, model_id: str, num_epochs: int, train_images: int, save: list[int]) -> None:
    """Growing a zoo must train the new members as the finished ones were trained: a zoo whose models differ in
    their epochs, training images or saved epochs is two populations under one name (zoo.json records the
    recipe and seed; the budget is in every model's record)."""
    record = store.open_zoo(zoo_url).record(model_id)
    hp = record.hparams
    asked = {"num_epochs": num_epochs, "max_train_images": train_images}
    for key, value in asked.items():
        if key in hp and int(hp[key]) != int(value):
            raise DataError(f"zoo '{zoo_url}' holds models trained with {key}={hp[key]} (e.g. {model_id}); this build "
                            f"asks for {value}: set zoo.{key}={hp[key]} to grow it, or write to another folder")
    if record.status == "ok" and record.checkpoint_epochs and list(record.checkpoint_epochs) != list(save):
        raise DataError(f"zoo '{zoo_url}' holds models saved at epochs {list(record.checkpoint_epochs)} (e.g. "
                        f"{model_id}); this build saves {save}: set zoo.save_epochs to match, or write to another "
                        "folder")


def build_zoos(zoo_cfg: ZooConfig, out_url: str, *, show_progress: bool = True) -> dict:
    """Build (or resume) every zoo of ``zoo_cfg`` under ``out_url``; returns a JSON-able summary."""
    if zoo_cfg.layout not in ("mzsane", "modelzoos"):
        raise ConfigError(f"zoo.layout '{zoo_cfg.layout}' is unknown; use mzsane or modelzoos")
    threads = torch.get_num_threads()
    if zoo_cfg.num_threads > 0:
        torch.set_num_threads(zoo_cfg.num_threads)
    try:  # the thread count is the build's own setting: later stages in this process get theirs back
        return _build_all(zoo_cfg, out_url, show_progress)
    finally:
        torch.set_num_threads(threads)


def _build_all(zoo_cfg: ZooConfig, out_url: str, show_progress: bool) -> dict:
    plans = plan_zoos(zoo_cfg)
    datasets = {p.dataset: load_dataset(p.dataset) for p in plans}  # fail fast on a missing dataset
    try:
        storage.write_text(storage.join(out_url, ".mzsane-write-check"), "ok\n")
        storage.remove(storage.join(out_url, ".mzsane-write-check"))
    except MzsaneError:
        raise
    except Exception as err:  # anything storage did not translate still becomes one line
        raise DataError(f"cannot write to zoo destination '{out_url}' ({type(err).__name__}); "
                        "pass a writable local path or s3://bucket/prefix") from None
    start = time.time()
    total = sum(len(p.members) * p.sizes["num_epochs"] for p in plans)
    zoos = []
    with tqdm(total=total, unit="model-epoch", disable=not show_progress, dynamic_ncols=True,
              bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]") as bar:
        for plan in plans:
            zoos.append(_build_one(plan, datasets[plan.dataset], zoo_cfg, storage.join(out_url, plan.name), bar))
    return {"out": out_url, "recipe": zoo_cfg.recipe, "layout": zoo_cfg.layout, "wall_s": round(time.time() - start, 2),
            "zoos": zoos}


def build_zoos_cli(args) -> dict:
    """``mzsane zoo build [--out URL]``: builds into ``--out`` or ``{storage.root}/zoos``; prints the summary."""
    import json

    cfg = args.cfg
    out_url = getattr(args, "out", "") or storage.join(cfg.storage.root, "zoos")
    summary = build_zoos(cfg.zoo, out_url)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


__all__ = ["ZooPlan", "build_zoos", "build_zoos_cli", "plan_zoos"]
