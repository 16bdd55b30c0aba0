"""What a sweep's points read before they start: the zoos under ``{root}/zoos`` and the shard dataset.

Why ``sweep run`` builds them: on a cluster the zoos and shards are made once, by hand, before any
RayJob (deploy/README.md step 5); on one machine the user asks a question ("does a bigger zoo help?")
and should need one command. So the local runner derives, from every point's own rendered config, which
zoos must exist, how many *train* models each needs (the largest ``data.num_models_per_zoo`` of any point
reading it), and which zoos the shard dataset must hold, then calls the same stage functions the demo
uses (``build_zoos``, ``build_shards``), which resume and skip what exists. Zoo recipes draw members in a
fixed order, so growing a zoo keeps its first models; a zoo sharded with too few models is re-sharded.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mzsane import storage
from mzsane.config import Config
from mzsane.errors import ConfigError, DataError


@dataclass
class ZooNeed:
    """One zoo the sweep reads: how many train models its points select (-1 = any), and for which points."""

    zoo: str
    train_models: int = 0
    sharded: bool = False  # read from the shard dataset (training), not only as a sampling target
    points: list[str] = field(default_factory=list)
    cfg: Config | None = None  # the config of the first point needing it: zoo, tokens and shards settings


def targets_of(point: str, cfg: Config, extra_targets: dict[str, list[str]] | None = None) -> list[str]:
    """Every zoo a point samples and evaluates: its ``sample.target_zoo``, then the chart's extraTargetZoos."""
    return list(dict.fromkeys([cfg.sample.target_zoo, *((extra_targets or {}).get(point) or [])]))


def needs(configs: dict[str, Config], extra_targets: dict[str, list[str]] | None = None
          ) -> tuple[str, str, dict[str, ZooNeed]]:
    """(zoos URL, shards URL, zoo -> need) for the points' configs (point name -> its config; ``extra_targets``:
    point name -> the further zoos it samples, the chart's ``sweep.extraTargetZoos``)."""
    roots = {storage.absolute(c.storage.root) for c in configs.values()}
    shard_urls = {storage.absolute(c.data.shards_url or storage.join(c.storage.root, "shards", "default"))
                  for c in configs.values()}
    if len(roots) != 1 or len(shard_urls) != 1:
        raise ConfigError(f"the sweep's points use several storage roots or shard datasets "
                          f"({sorted(roots | shard_urls)}); give every point the same storage.root and "
                          "storage.shardsUrl")
    out: dict[str, ZooNeed] = {}
    for point, cfg in configs.items():
        if not cfg.data.zoos:
            raise ConfigError(f"sweep point '{point}' trains on every zoo of the shard dataset (data.zoos empty); "
                              "list its zoos in the sweep's grid so sweep run knows what to build")
        for zoo in dict.fromkeys([*cfg.data.zoos, *targets_of(point, cfg, extra_targets)]):
            need = out.setdefault(zoo, ZooNeed(zoo, cfg=cfg))
            _check_same_build(need, point, cfg)
            need.points.append(point)
            if zoo in cfg.data.zoos:
                need.sharded = True
                need.train_models = max(need.train_models, int(cfg.data.num_models_per_zoo), 1)
    return storage.join(roots.pop(), "zoos"), shard_urls.pop(), out


def _check_same_build(need: ZooNeed, point: str, cfg: Config) -> None:
    """One zoo name is one folder under the sweep's root, built once: points may not ask it of another recipe
    or seed (an axis on ``zoo.seed`` would otherwise train every point on the first seed's zoo)."""
    assert need.cfg is not None
    for key in ("seed", "recipe"):
        first, here = getattr(need.cfg.zoo, key), getattr(cfg.zoo, key)
        if first != here:
            raise ConfigError(f"sweep points {need.points[0]} and {point} ask for zoo {need.zoo} with zoo.{key} "
                              f"{first} and {here}, but a sweep builds one zoo per name under its storage root; "
                              f"run one sweep per zoo.{key}, each with its own --storage")


def models_for_train(need: int, cfg: Config, zoo: str) -> int:
    """The fewest models a zoo needs so that the shards' seeded split gives it ``need`` train models.

    Linear: each candidate size costs O(1) (``split_counts``), and the train share grows by about
    ``split_fractions[0]`` per model, so the scan from ``need`` takes about need x (1/fraction - 1) steps (it once
    drew a split per candidate: quadratic, ~2 h for a zoo size of 100,000)."""
    n = max(need, 1)
    while models_in_train(n, cfg, zoo) < need:
        n += 1
    return n


def check_anchor_pools(configs: dict[str, Config], extra_targets: dict[str, list[str]] | None = None) -> None:
    """Refuse, before anything is built or trained, a point whose held-out anchor pool (target-zoo models outside
    its backbone's training selection) will hold fewer than ``sample.num_anchors`` models: otherwise the
    point fails at its sample stage after the whole training. Counted from the zoo size the sweep will build,
    for every target the point samples."""
    _, _, wanted = needs(configs, extra_targets)
    for point, cfg in configs.items():
        for target in targets_of(point, cfg, extra_targets):
            if cfg.sample.anchor_pool != "held_out" or target not in wanted:
                continue
            need = wanted[target]
            zoo_cfg = _zoo_config(need) if need.sharded else None
            if zoo_cfg is None:
                continue  # an out-of-distribution target: every model is held out, built at the recipe's size
            total = zoo_cfg.num_models
            seen = 0
            if target in cfg.data.zoos:
                train = models_in_train(total, cfg, target)
                seen = train if cfg.data.num_models_per_zoo < 0 else min(int(cfg.data.num_models_per_zoo), train)
            if total - seen < cfg.sample.num_anchors:
                raise ConfigError(f"sweep point '{point}': sample.num_anchors={cfg.sample.num_anchors} but only "
                                  f"{total - seen} of {target}'s {total} models stay outside its backbone's training "
                                  f"selection (sample.anchor_pool=held_out); set sample.num_anchors <= "
                                  f"{total - seen}, a smaller zoo size, or zoo.num_models larger")


def models_in_train(num_models: int, cfg: Config, zoo: str) -> int:
    """How many of a zoo's first ``num_models`` models the shards' seeded split puts in train."""
    from mzsane.shards.writer import split_counts

    return split_counts(num_models, list(cfg.shards.split_fractions))[0]  # the counts do not depend on the seed


def _zoo_models(zoos_url: str, zoo: str) -> int:
    """Finished models of a zoo on storage (0 if it does not exist)."""
    from mzsane.zoo.store import open_zoo

    url = storage.join(zoos_url, zoo)
    if not storage.exists(storage.join(url, "zoo.json")):
        return 0
    return sum(1 for m in open_zoo(url).models() if m.status == "ok")


def _zoo_config(need: ZooNeed) -> Any:
    """The point's zoo settings narrowed to this one zoo, sized for the train models its points select."""
    assert need.cfg is not None
    dataset, _, architecture = need.zoo.rpartition("-")
    if not dataset or not architecture:
        raise ConfigError(f"zoo '{need.zoo}' is not named dataset-architecture (e.g. mnist-cnn_s); "
                          "fix the sweep's zoos")
    zoo_cfg = copy.deepcopy(need.cfg.zoo)
    zoo_cfg.datasets, zoo_cfg.architecture, zoo_cfg.extra_zoos = [dataset], architecture, []
    if need.sharded:  # the recipe's own size (0 = its default) unless the points select more train models
        from mzsane.zoo.recipes import get_recipe, resolve_sizes

        default = resolve_sizes(zoo_cfg.recipe, architecture, {"num_models": zoo_cfg.num_models})["num_models"]
        limit = get_recipe(zoo_cfg.recipe).max_models
        if limit and need.train_models > models_in_train(limit, need.cfg, need.zoo):
            points = ", ".join(need.points[:3]) + (" ..." if len(need.points) > 3 else "")
            raise ConfigError(f"zoo size {need.train_models:,} of zoo {need.zoo} (points {points}) is beyond what "
                              f"recipe '{zoo_cfg.recipe}' can build ({limit:,} models, "
                              f"{models_in_train(limit, need.cfg, need.zoo):,} of them in train); lower the sweep's "
                              f"zooSize(s) or choose another sweep.config.zoo.recipe")
        zoo_cfg.num_models = max(default, models_for_train(need.train_models, need.cfg, need.zoo))
    return zoo_cfg


def _train_models(shards_url: str) -> dict[str, int]:
    """Train models per zoo in the shard dataset (empty if it does not exist yet)."""
    from mzsane.shards.manifest import read_manifest

    if not storage.exists(storage.join(shards_url, "manifest.json")):
        return {}
    manifest = read_manifest(shards_url)  # ids only, from the model index: not every model entry
    return {zoo: n for zoo in manifest.zoos if (n := len(manifest.model_ids(zoo, "train")))}


def ensure(configs: dict[str, Config], log: Callable[[str], None] = print,
           extra_targets: dict[str, list[str]] | None = None) -> list[str]:
    """Build or grow the zoos and (re-)shard what the points need; returns what was done, one line each."""
    from mzsane.shards import manifest as mf
    from mzsane.shards.writer import build_shards
    from mzsane.zoo.build import build_zoos

    zoos_url, shards_url, wanted = needs(configs, extra_targets)
    done = []
    for need in wanted.values():
        zoo_cfg = _zoo_config(need)
        have = _zoo_models(zoos_url, need.zoo)
        if have < (zoo_cfg.num_models if need.sharded else 1):
            points = ", ".join(need.points[:4]) + (" ..." if len(need.points) > 4 else "")
            log(f"building zoo {need.zoo}: {zoo_cfg.num_models or 'recipe default'} models ({have} exist), "
                f"recipe {zoo_cfg.recipe}, for points {points}")
            build_zoos(zoo_cfg, zoos_url, show_progress=False)
            done.append(f"zoo {need.zoo}")
    sharded = _train_models(shards_url)
    todo = [n for n in wanted.values() if n.sharded and sharded.get(n.zoo, 0) < n.train_models]
    for need in todo:
        if need.zoo in sharded:  # sharded before with fewer models: its part is dropped and written again
            log(f"re-sharding {need.zoo}: {sharded[need.zoo]} train models in {shards_url}, {need.train_models} needed")
            storage.remove(storage.join(shards_url, mf.PARTS_DIR, f"{need.zoo}.json"))
    if todo:
        cfg = todo[0].cfg
        assert cfg is not None
        log(f"sharding {', '.join(n.zoo for n in todo)} into {shards_url}")
        build_shards([storage.join(zoos_url, n.zoo) for n in todo], shards_url, cfg.tokens, cfg.shards,
                     max_positions=cfg.model.max_positions, progress=False)
        done += [f"shards of {n.zoo}" for n in todo]
    short = {z: c for z, c in _train_models(shards_url).items() if z in wanted and c < wanted[z].train_models}
    if short:
        zoo, count = next(iter(short.items()))
        raise DataError(f"zoo {zoo} has {count} shardable train models, {wanted[zoo].train_models} needed (diverged or "
                        f"dropped models); raise sweep.config.zoo.num_models or lower the sweep's zoo sizes")
    return done
