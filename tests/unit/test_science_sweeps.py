"""The science sweeps of issues 25 and 26 render the points their questions need, and nothing else differs
between the settings a comparison pairs (rendered with the chart, placed locally, nothing run)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("helm_python")

from mzsane.sweep import chart, local, prerequisites
from mzsane.sweep.point import rendered_points
from tests.fixtures.results_scripts import load_results_script

ROOT = Path(__file__).resolve().parents[2]


def _configs(tmp_path: Path, *files: str, sets: tuple[str, ...] = ()) -> dict:
    paths = [str(ROOT / "jobs" / f) for f in files]
    return {p.name: local.place(p, str(tmp_path / "data"), str(tmp_path / "s"), write=False).cfg
            for p in rendered_points(chart.render(paths, sets=list(sets)))}


def _without(cfg, *paths: str) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("run_name", None)
    for path in paths:
        section, key = path.split(".")
        out[section].pop(key, None)
    return out


@pytest.mark.parametrize("name", ["norm-weighting", "norm-weighting-resnet18"])
def test_norm_weighting_sweeps_cover_every_weighting_at_three_seeds(tmp_path, name):
    cfgs = _configs(tmp_path, f"{name}.yaml", f"local/{name}.yaml")
    settings = {}
    for cfg in cfgs.values():
        key = (cfg.loss.norm_mode, cfg.loss.reduction,
               cfg.loss.token_weight_alpha if cfg.loss.reduction == "token_power" else None)
        settings.setdefault(key, set()).add((cfg.data.seed, cfg.train.seed, cfg.sample.seed, cfg.evaluate.seed))
    want = {("token", "token_power", a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)} | {("token", "layer", None)}
    assert set(settings) == want
    assert all(seeds == {(s, s, s, s) for s in (0, 1, 2)} for seeds in settings.values())
    # the settings differ in the loss weighting alone: a seed's points are otherwise one config
    by_seed = {}
    for cfg in cfgs.values():
        by_seed.setdefault(cfg.train.seed, []).append(_without(cfg, "loss.reduction", "loss.token_weight_alpha"))
    assert all(all(c == group[0] for c in group) for group in by_seed.values())
    prerequisites.check_anchor_pools(cfgs)


def test_norm_weighting_matches_the_norm_ablation_token_points_but_for_the_weighting(tmp_path):
    """Its alpha-1 points are the norm-ablation sweep's masked-token points (per-entry weighting, identical
    loss), so the two sweeps' figures can be read side by side."""
    weighting = _configs(tmp_path, "norm-weighting.yaml", "local/norm-weighting.yaml")
    ablation = _configs(tmp_path, "norm-ablation.yaml", "local/norm-ablation.yaml")
    alpha1 = {c.train.seed: _without(c, "loss.reduction", "loss.token_weight_alpha") for c in weighting.values()
              if c.loss.reduction == "token_power" and c.loss.token_weight_alpha == 1.0}
    token = {c.train.seed: _without(c, "loss.reduction", "loss.token_weight_alpha") for c in ablation.values()
             if c.loss.norm_mode == "token"}
    assert alpha1 == token and len(token) == 3


def test_the_composition_control_differs_from_the_composition_sweep_only_in_its_budget(tmp_path):
    base = ("composition.yaml", "local/composition.yaml")
    passes = _configs(tmp_path, *base)
    steps = _configs(tmp_path, *base, "local/composition-equal-steps.yaml")
    assert set(passes) == set(steps) and len(steps) == 12
    for name, cfg in steps.items():
        assert cfg.train.num_epochs == 0 and cfg.train.num_steps == 1200
        assert cfg.evaluate.finetune_epochs == 0 and cfg.evaluate.hypernet_steps == 0
        assert _without(cfg, "train.num_epochs", "train.num_steps", "evaluate.finetune_epochs",
                        "evaluate.hypernet_steps") == _without(passes[name], "train.num_epochs", "train.num_steps",
                                                               "evaluate.finetune_epochs", "evaluate.hypernet_steps")
    # its mnist point is the zoo-size control's size-8 point: one config, the same seeds
    size = _configs(tmp_path, "zoo-size.yaml", "local/zoo-size.yaml", "local/zoo-size-equal-steps.yaml")
    mnist = {c.train.seed: _without(c, "data.zoos") for c in steps.values() if c.data.zoos == ["mnist-cnn_s"]}
    size8 = {c.train.seed: _without(c, "data.zoos") for c in size.values() if c.data.num_models_per_zoo == 8}
    assert mnist == size8 and len(mnist) == 3


def _flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, sec in dataclasses.asdict(cfg).items() if isinstance(sec, dict)
            for k, v in sec.items()}


def test_the_cause_table_changes_one_thing_per_row_against_the_baseline(tmp_path):
    cfgs = _configs(tmp_path, "causes.yaml", "local/causes.yaml")
    base = {c.train.seed: _flat(c) for n, c in cfgs.items() if n.startswith("n32-mnist-")}
    assert sorted(base) == [0, 1, 2] and base[0]["train.num_epochs"] == 300
    changed = {}
    for name, cfg in cfgs.items():
        flat = _flat(cfg)
        diff = {k for k in flat if flat[k] != base[cfg.train.seed][k]}
        changed.setdefault(name.rsplit("-", 1)[0], set()).add(frozenset(diff))
    changed.pop("n32-mnist")
    assert {row: {tuple(sorted(d)) for d in diffs} for row, diffs in changed.items()} == {
        "latent128": {("model.latent_dim",)}, "dmodel256": {("model.d_model",)},
        "norm-unmasked": {("loss.norm_mode",)}, "bf16": {("train.precision",)}}
    # the baseline as measured, whatever the defaults are now
    assert base[0]["model.latent_dim"] == 32 and base[0]["train.precision"] == "fp32"
    prerequisites.check_anchor_pools(cfgs)
    aligned = _configs(tmp_path, "causes.yaml", "local/causes.yaml", "local/causes-aligned.yaml")
    assert sorted(aligned) == ["n32-mnist-0", "n32-mnist-1", "n32-mnist-2"]
    for name, cfg in aligned.items():
        diff = {k for k, v in _flat(cfg).items() if v != _flat(cfgs[name])[k]}
        assert diff == {"shards.align_to_reference", "data.shards_url"} and cfg.shards.align_to_reference


def test_the_gpu_paper_recipe_renders_the_paper_scale_backbone_on_the_seed_zoo(tmp_path):
    cfgs = _configs(tmp_path, "gpu/paper-mnist.yaml")
    assert sorted(c.train.seed for c in cfgs.values()) == [0, 1, 2]
    for cfg in cfgs.values():
        m = cfg.model
        assert (m.d_model, m.num_heads, m.num_layers, m.latent_dim) == (1024, 8, 4, 128)
        assert cfg.train.precision == "bf16" and cfg.cluster.use_gpu and cfg.loss.norm_mode == "batch"
        assert (cfg.zoo.recipe, cfg.zoo.num_epochs, cfg.zoo.save_epochs) == ("seed", 25, [21, 22, 23, 24, 25])
        assert cfg.data.epochs == [21, 22, 23, 24, 25] and cfg.sample.target_epoch == 25
        assert cfg.data.num_models_per_zoo == 70  # the 100-model zoo's 70/15/15 train split
    prerequisites.check_anchor_pools(cfgs)


def test_the_gpu_paper_recipe_trains_at_tiny_scale_on_a_cpu(tmp_path):
    """The tiny overlay keeps the recipe (epochs 21-25 of a zoo, the paper preset's loss) and trains a few
    steps without Ray on a small zoo of random CNN-s checkpoints saved at those epochs."""

    from mzsane import storage
    from mzsane.shards.writer import build_shards
    from mzsane.train.launch import train
    from mzsane.zoo.synthetic import SyntheticZoo

    cfgs = _configs(tmp_path, "gpu/paper-mnist.yaml", "gpu/cpu-tiny.yaml")
    cfg = cfgs[sorted(cfgs)[0]]
    assert cfg.data.epochs == [21, 22, 23, 24, 25] and cfg.model.d_model == 32 and cfg.train.precision == "fp32"
    zoo = storage.join(cfg.storage.root, "zoos", "mnist-cnn_s")
    SyntheticZoo("mnist-cnn_s", "cnn_s", 8, tuple(range(21, 26))).write(zoo)
    build_shards([zoo], cfg.data.shards_url or storage.join(cfg.storage.root, "shards", "default"), cfg.tokens,
                 cfg.shards, progress=False)
    cfg.train.num_epochs, cfg.train.num_steps = 0.0, 3
    run = train(cfg, no_ray=True)
    assert storage.exists(storage.join(run, "config.json"))
    assert any(name.startswith("checkpoint_") for name in storage.listdir(run))


def test_the_sampling_causes_sample_the_baselines_backbones_with_one_knob_changed(tmp_path):
    """The cause table's sampling rows reuse each seed's baseline backbone and its files; each changes one
    ``sample.*`` path, recorded in its axes so the report pairs it by seed with that baseline."""
    knobs = load_results_script("causes_knobs")
    sweep_dir = tmp_path / "data" / "sweeps" / "causes"
    for seed in (0, 1):
        point = {"point": f"n32-mnist-{seed}", "preset": "default", "target_zoo": "mnist-cnn_s",
                 "extra_target_zoos": ["digits-cnn_s"], "axes": {"train.seed": seed, "sample.seed": seed},
                 "overrides": {"run_name": f"causes-n32-mnist-{seed}"}}
        (sweep_dir / point["point"]).mkdir(parents=True)
        (sweep_dir / point["point"] / "point.json").write_text(json.dumps(point))
    done = sweep_dir / "bw0-1-1" / "targets" / "digits-cnn_s" / "evaluate"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    commands = knobs.tasks(str(sweep_dir), [0, 1])
    assert len(commands) == 2 * (2 * len(knobs.KNOBS) * 2 - 1)  # sample + evaluate per target; one finished
    assert {tuple(k) for k in knobs.KNOBS.values()} == {("sample.num_anchors", 10), ("sample.bandwidth", 0.1),
                                                         ("sample.bandwidth", 0.4), ("sample.num_candidates", 500)}
    for argv in commands:
        where = Path(argv[argv.index("--out" if argv[3] == "sample" else "--samples") + 1])
        point = where.parents[1].name if where.parent.name == "targets" else where.name
        seed = point[-1]
        assert argv[argv.index("--config") + 1].endswith(f".run/causes/n32-mnist-{seed}/etc/overrides.yaml")
        assert argv[argv.index("--set") + 1] == "{}={}".format(*knobs.KNOBS[point[:-2]])
        if argv[3] == "sample":
            assert argv[argv.index("--backbone") + 1] == str(tmp_path / "data" / "runs" / f"causes-n32-mnist-{seed}")
    first = knobs.tasks(str(sweep_dir), [0, 1], first_target_only=True)
    assert len(first) == 2 * 2 * len(knobs.KNOBS) and not any("targets" in " ".join(a) for a in first)
    record = json.loads((sweep_dir / "cand500-1" / "point.json").read_text())
    assert record["point"] == "cand500-1"
    assert record["axes"] == {"train.seed": 1, "sample.seed": 1, "sample.num_candidates": 500}


def test_the_long_run_keeps_every_checkpoint_it_writes_and_ends_in_its_learning_curve(tmp_path):
    """Issue 26.3: the cause table's best setting (latent 128) for 60,000 steps of the table's 16 windows, and a
    curve stage over every checkpoint: one that pruned some would leave holes in the curve."""
    files = [str(ROOT / "jobs" / f) for f in ("long-run.yaml", "local/long-run.yaml")]
    (point,) = rendered_points(chart.render(files))
    cfg = local.place(point, str(tmp_path / "data"), str(tmp_path / "s"), write=False).cfg
    t = cfg.train
    assert cfg.model.latent_dim == 128 and cfg.data.num_models_per_zoo == 32 and cfg.data.num_tail_epochs == 2
    windows = t.batch_size * cfg.cluster.num_workers
    steps = t.num_epochs * 32 * 2 / windows
    assert windows == 16 and steps == 60_000
    assert t.num_checkpoints_to_keep >= steps / t.checkpoint_every_n_steps
    stages = point.stages()
    assert stages[-1].name == "curve" and stages[-1].argv[stages[-1].argv.index("--out") + 1].endswith("/curve")
    assert [s.name for s in stages].count("curve") == 1
