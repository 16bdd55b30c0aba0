"""``mzsane sweep run`` without Ray: points read from the rendered chart, placed locally, scheduled, resumed.

The runner's contract: it runs the stages the rendered RayJob's ``run-point`` entrypoint plans from the
point file, with only two locations changed (the ConfigMap mount and the storage root), runs points side
by side within the CPUs, records finished stages, and on a re-run skips what finished. Stage commands are
replaced by small Python processes here so the scheduling and resume logic runs in seconds; the real
pipeline is tests/e2e/test_sweep_run.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

from mzsane.errors import ConfigError
from mzsane.sweep import chart, local, prerequisites
from mzsane.sweep.point import Stage, rendered_points
from tests.fixtures.sweep_points import SMOKE, fake_points

ROOT = Path(__file__).resolve().parents[2]


def test_set_is_parsed_like_helm_and_applied_after_the_files():
    values = chart.load_values(SMOKE, ["sweep.name=other,worker.replicas=2", "sweep.grid.zooSizes={3,5}"])
    assert values["sweep"]["name"] == "other" and values["worker"]["replicas"] == 2
    assert values["sweep"]["grid"]["zooSizes"] == [3, 5]
    assert values["sweep"]["preset"] == "tiny"  # what --set does not touch stays as the files say
    with pytest.raises(ConfigError, match="is not a Helm --set expression"):
        chart.load_values([], ["sweep.name"])


def test_points_come_from_the_rendered_rayjobs_and_their_configmaps():
    objects = chart.render(SMOKE)
    (point,) = rendered_points(objects)
    job = next(o for o in objects if o["kind"] == "RayJob")
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    assert point.entrypoint == job["spec"]["entrypoint"] and point.files == cm["data"]
    assert point.mount_path == "/etc/mzsane" and point.name == "smoke" and point.sweep == "smoke"
    # one fixed command: no stage chain and no value on the command line KubeRay pastes into bash -ce
    assert job["spec"]["entrypoint"] == "python -m mzsane.sweep run-point /etc/mzsane/point.json"
    assert point.runs_point_file
    stages = point.stages(python="python")
    assert [s.name for s in stages] == ["record-point", "train", "sample", "evaluate", "sample-seen", "evaluate-seen",
                                        "probe"]
    root, run = "s3://mzsane/data", "s3://mzsane/data/runs/smoke-smoke"
    out, zoo = f"{root}/sweeps/smoke/smoke", f"{root}/zoos/mnist-cnn_s"
    cfg = ["--preset", "tiny", "--config", "/etc/mzsane/overrides.yaml"]
    mz = ["python", "-m", "mzsane"]
    assert [s.argv for s in stages] == [
        ["python", "-m", "mzsane.sweep", "record-point", "/etc/mzsane/point.json", out],
        [*mz, "train", *cfg],
        [*mz, "sample", *cfg, "--backbone", run, "--zoo", zoo, "--out", out],
        [*mz, "evaluate", *cfg, "--samples", out, "--zoo", zoo],
        # the paper's protocol: anchors the backbone trained on (at most the zoo size of them), no fine-tuning
        [*mz, "sample", *cfg, "--set", "sample.anchor_pool=seen", "--set", "sample.num_anchors=2", "--backbone", run,
         "--zoo", zoo, "--out", f"{out}/anchors-seen"],
        [*mz, "evaluate", *cfg, "--set", "evaluate.finetune_epochs=0", "--set", "evaluate.hypernet_steps=0",
         "--samples", f"{out}/anchors-seen", "--zoo", zoo],
        [*mz, "probe", "--backbone", run, "--zoo", "mnist-cnn_s", "--out", f"{out}/probe"]]
    assert out == point.results_url


def test_a_seed_axis_sets_every_per_run_seed_of_the_config_and_is_checked_at_render():
    from dataclasses import fields, is_dataclass

    from mzsane import config
    from mzsane.sweep.schema import SEED_PATHS

    # every `seed` field of the config but the zoos' (zoos are shared prerequisites of all points)
    cfg = config.Config()
    declared = {f"{f.name}.seed" for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))
                and "seed" in {g.name for g in fields(getattr(cfg, f.name))}}
    assert set(SEED_PATHS) == declared - {"zoo.seed"}
    size = [str(ROOT / "jobs" / "zoo-size.yaml"), str(ROOT / "jobs" / "local" / "zoo-size.yaml")]
    points = rendered_points(chart.render(size, sets=["sweep.grid.zooSizes={4}",
                                                      "sweep.grid.axes.seed.values={0,3}"]))
    assert [p.name for p in points] == ["n4-mnist-0", "n4-mnist-3"]
    for point, seed in zip(points, (0, 3)):
        assert {path: point.overrides[path.split(".")[0]]["seed"] for path in SEED_PATHS} == dict.fromkeys(
            SEED_PATHS, seed)
        assert json.loads(point.files["point.json"])["axes"] == dict.fromkeys(SEED_PATHS, seed)
    with pytest.raises(ConfigError, match="appears twice"):
        chart.render(size, sets=[r"sweep.grid.axes.seed.values={0,1},sweep.grid.axes.sample\.seed.values={0,1}"])
    with pytest.raises(ConfigError, match="minimum"):  # the schema checks a seed axis's values as seeds
        chart.render(size, sets=["sweep.grid.axes.seed.values={-1}"])


STUB = """#!/bin/sh
echo "$*" >> "$TRACE"
case " $* " in *" $FAIL "*) exit 3;; esac
"""


def test_run_point_runs_the_stages_in_order_stops_at_the_first_failure_and_a_retry_skips_finished_ones(
        tmp_path, monkeypatch, capsys):
    """The RayJob's entrypoint: its exit status is the point's (a failed stage must fail the Ray job)."""
    from mzsane.sweep.point import main, run_point

    (point,) = rendered_points(chart.render(SMOKE))
    placed = local.place(point, str(tmp_path / "data"), str(tmp_path / "state"))
    point_file = os.path.join(placed.state_dir, "etc", "point.json")
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    trace = tmp_path / "trace"
    monkeypatch.setenv("TRACE", str(trace))
    monkeypatch.setenv("FAIL", "sample")
    assert run_point(point_file, python=str(stub)) == 3
    assert [line.split()[2] for line in trace.read_text().splitlines()] == ["record-point", "train", "sample"]
    assert "stage sample exited with 3" in capsys.readouterr().err
    monkeypatch.setenv("FAIL", "nothing")
    trace.unlink()
    assert run_point(point_file, python=str(stub)) == 0  # the retry starts at the stage that failed
    assert [line.split()[2] for line in trace.read_text().splitlines()] == ["sample", "evaluate", "sample", "evaluate",
                                                                            "probe"]
    progress = json.loads((tmp_path / "data" / "sweeps" / "smoke" / "smoke" / "run-point.json").read_text())
    assert progress["done"] == ["0-record-point", "1-train", "2-sample", "3-evaluate", "4-sample-seen",
                                "5-evaluate-seen", "6-probe"]
    assert main(["run-point", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the point file" in capsys.readouterr().err


def test_a_command_that_is_not_the_charts_run_point_runs_as_one_shell_stage(tmp_path):
    (point,) = rendered_points(chart.render(SMOKE))
    point.entrypoint = "mzsane train || echo failed; mzsane sample --config /etc/mzsane/overrides.yaml"
    assert not point.runs_point_file
    assert point.stages() == [Stage("entrypoint", ["bash", "-c", point.entrypoint])]
    placed = local.place(point, str(tmp_path / "data"), str(tmp_path / "state"))
    etc = tmp_path / "state" / "smoke" / "smoke" / "etc"
    assert placed.stages == [Stage("entrypoint", ["bash", "-c", point.entrypoint.replace("/etc/mzsane", str(etc))])]


def test_place_changes_only_the_config_mount_and_the_storage_root(tmp_path):
    (point,) = rendered_points(chart.render(SMOKE))
    old_root = point.overrides["storage"]["root"]
    placed = local.place(point, str(tmp_path / "data"), str(tmp_path / "state"))
    etc = tmp_path / "state" / "smoke" / "smoke" / "etc"
    new_root = str(tmp_path / "data")
    for rendered, planned in zip(point.stages(), placed.stages, strict=True):
        assert rendered.name == planned.name and len(rendered.argv) == len(planned.argv)
        for before, after in zip(rendered.argv, planned.argv):
            if before.startswith("/etc/mzsane/"):
                assert after == str(etc / before.rsplit("/", 1)[1])
            elif before.startswith(old_root):
                assert after == new_root + before[len(old_root):]
            else:
                assert after == before
    overrides = yaml.safe_load((etc / "overrides.yaml").read_text())
    expected = dict(point.overrides, storage={"root": new_root},
                    data=dict(point.overrides["data"], shards_url=f"{new_root}/shards/tiny"))
    assert point.overrides["data"]["shards_url"] == f"{old_root}/shards/tiny"
    assert overrides == expected
    record = json.loads((etc / "point.json").read_text())
    assert record["zoo_size"] == 2 and record["overrides"]["storage"]["root"] == new_root
    assert placed.results_url == f"{new_root}/sweeps/smoke/smoke" and placed.cfg.storage.root == new_root
    assert placed.cpus == 1


def test_prerequisites_size_zoos_for_the_train_models_the_points_select(tmp_path):
    objects = chart.render([*SMOKE, _write(tmp_path, {"sweep": {"config": {"zoo": {"num_models": 0}}, "runs": {
        "smoke": None,
        "a": {"zooSize": 2, "zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s"]},
        "b": {"zooSize": 5, "zoos": ["mnist-cnn_s"]},
        "c": {"zooSize": 1, "zoos": ["animal_mnist-cnn_s"]}}}})])
    configs = {p.name: local.place(p, str(tmp_path / "data"), str(tmp_path / "s")).cfg
               for p in rendered_points(objects)}
    zoos_url, shards_url, needs = prerequisites.needs(configs)
    assert zoos_url == str(tmp_path / "data" / "zoos") and shards_url == str(tmp_path / "data" / "shards" / "tiny")
    assert {z: n.train_models for z, n in needs.items()} == {"mnist-cnn_s": 5, "fashion_mnist-cnn_s": 2,
                                                              "animal_mnist-cnn_s": 1}
    # a zoo keeps its recipe's size (0 = the tiny recipe's 4) unless the points need more train models
    assert prerequisites._zoo_config(needs["animal_mnist-cnn_s"]).num_models == 4
    assert prerequisites._zoo_config(needs["mnist-cnn_s"]).num_models > 5
    assert needs["mnist-cnn_s"].points == ["a", "b", "c"]  # c reads it as its sampling target
    cfg = configs["b"]
    n = prerequisites.models_for_train(5, cfg, "mnist-cnn_s")
    from mzsane.shards.writer import split_models

    def train(k: int) -> int:
        return sum(s == "train" for s in split_models([f"m{i:05d}" for i in range(k)], cfg.shards.split_fractions,
                                                      cfg.shards.split_seed, "mnist-cnn_s").values())
    assert train(n) >= 5 > train(n - 1)


def test_extra_target_zoos_are_sampled_and_evaluated_by_the_same_backbone_and_built_first(tmp_path):
    """sweep.extraTargetZoos (e.g. an out-of-distribution target): two more stages per target, results under
    {point}/targets/{zoo}, the zoo built by the prerequisites, its held-out anchor pool checked too."""
    extra = _write(tmp_path, {"sweep": {"extraTargetZoos": ["animal_mnist-cnn_s"]}})
    (point,) = rendered_points(chart.render([*SMOKE, extra]))
    assert point.extra_target_zoos == ["animal_mnist-cnn_s"]
    stages = [s.argv for s in point.stages()]
    # animal_mnist is out of distribution (not a training zoo): no seen-anchor stages for it
    assert [s.name for s in point.stages()] == ["record-point", "train", "sample", "evaluate", "sample-seen",
                                                "evaluate-seen", "probe", "sample", "evaluate"]
    out = f"{point.results_url}/targets/animal_mnist-cnn_s"
    zoo = "s3://mzsane/data/zoos/animal_mnist-cnn_s"
    sample, evaluate = stages[7], stages[8]
    assert sample[sample.index("--zoo") + 1] == zoo and sample[sample.index("--out") + 1] == out
    assert sample[sample.index("--backbone") + 1] == stages[2][stages[2].index("--backbone") + 1]  # same backbone
    assert evaluate[evaluate.index("--samples") + 1] == out and evaluate[evaluate.index("--zoo") + 1] == zoo
    placed = local.place(point, str(tmp_path / "data"), str(tmp_path / "s"))
    _, _, needs = prerequisites.needs({point.name: placed.cfg}, {point.name: point.extra_target_zoos})
    assert "animal_mnist-cnn_s" in needs and not needs["animal_mnist-cnn_s"].sharded
    assert "animal_mnist-cnn_s" not in prerequisites.needs({point.name: placed.cfg})[2]
    # an extra target that is also a training zoo is held to the same anchor-pool check as the first one
    inside = _write(tmp_path, {"sweep": {"extraTargetZoos": ["fashion_mnist-cnn_s"],
                                         "config": {"sample": {"num_anchors": 40}}}})
    (point,) = rendered_points(chart.render([*SMOKE, inside]))
    cfg = local.place(point, str(tmp_path / "data"), str(tmp_path / "s")).cfg
    cfg.sample.target_zoo = "animal_mnist-cnn_s"  # out of distribution: no pool limit for the first target
    with pytest.raises(ConfigError, match="fashion_mnist-cnn_s"):
        prerequisites.check_anchor_pools({point.name: cfg}, {point.name: point.extra_target_zoos})
    with pytest.raises(ConfigError, match="already sweep.targetZoo"):
        chart.render([*SMOKE, _write(tmp_path, {"sweep": {"extraTargetZoos": ["mnist-cnn_s"]}})])


def test_prerequisites_count_the_train_models_a_shard_dataset_already_holds(tmp_path):
    from tests.fixtures.zoos import make_shards

    assert prerequisites._train_models(str(tmp_path / "none")) == {}
    url = make_shards(str(tmp_path), num_models=8)  # split 0.75 / 0.25 / 0 by model
    from mzsane.shards.manifest import read_manifest

    splits = [m["split"] for m in read_manifest(url).models]
    assert prerequisites._train_models(url) == {"mnist_cnn_s": splits.count("train")} and 0 < splits.count("train") < 8


@pytest.mark.parametrize("name", ["smoke", "zoo-size", "composition", "norm-ablation", "grid"])
def test_every_local_sweep_leaves_its_points_enough_held_out_anchors(tmp_path, name):
    """Checked before anything is built: a point short of held-out anchors would fail only at sample, after
    its whole training (jobs/local/norm-ablation.yaml did, with the default 5 anchors of an 8-model zoo)."""
    files = [str(ROOT / "jobs" / f"{name}.yaml"), str(ROOT / "jobs" / "local" / f"{name}.yaml")]

    def configs(*sets: str) -> dict:
        return {p.name: local.place(p, str(tmp_path / "data"), str(tmp_path / "s")).cfg
                for p in rendered_points(chart.render(files, sets=list(sets)))}

    prerequisites.check_anchor_pools(configs())
    with pytest.raises(ConfigError, match="stay outside its backbone's training selection"):
        prerequisites.check_anchor_pools(configs("sweep.config.sample.num_anchors=40"))


def test_norm_ablation_with_five_anchors_is_refused_with_the_count_that_fits(tmp_path):
    files = [str(ROOT / "jobs" / "norm-ablation.yaml"), str(ROOT / "jobs" / "local" / "norm-ablation.yaml")]
    points = rendered_points(chart.render(files, sets=["sweep.config.sample.num_anchors=5"]))
    with pytest.raises(ConfigError, match=r"num_anchors=5 but only 4 of mnist-resnet_mini's 8 models"):
        prerequisites.check_anchor_pools({p.name: local.place(p, str(tmp_path), str(tmp_path / "s")).cfg
                                          for p in points})


def _write(tmp_path: Path, values: dict) -> str:
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ------------------------------------------------------------------- scheduling and resume, no Ray


def _trace(tmp_path: Path) -> list[list]:
    path = tmp_path / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _max_concurrent(trace: list[list]) -> int:
    events = sorted([(t0, 1) for _, _, t0, _ in trace] + [(t1, -1) for _, _, _, t1 in trace])
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def test_points_run_side_by_side_within_the_cpus_and_stages_in_order(tmp_path):
    points = fake_points(tmp_path, ["a", "b", "c"])
    lines: list[str] = []
    local.Runner(points, capacity=2, env=dict(os.environ), progress_every=0.2, log=lines.append).run()
    trace = _trace(tmp_path)
    assert [p.status for p in points] == ["done"] * 3
    assert sorted((name, stage) for name, stage, *_ in trace) == sorted(
        (n, s) for n in "abc" for s in ("first", "second"))
    assert _max_concurrent(trace) == 2  # two 1-CPU points at once on 2 CPUs, never three
    for name in "abc":
        first, second = (t for t in trace if t[0] == name)
        assert first[1] == "first" and second[2] >= first[3]
    assert any("2 running" in line for line in lines) and any("a: done" in line for line in lines)


def test_a_failed_stage_fails_its_point_only_and_a_rerun_resumes_after_finished_stages(tmp_path):
    points = fake_points(tmp_path, ["a", "b"], sleep=0.2, fail="b/second")
    local.Runner(points, capacity=2, env=dict(os.environ), log=lambda s: None).run()
    assert [p.status for p in points] == ["done", "failed"]
    assert "exited with 1" in points[1].error and points[1].done_stages == ["first"]
    # the re-run: 'a' finished (results exist) and is skipped, 'b' resumes at its second stage
    results = Path(points[0].results_url) / "evaluate" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text("{}")
    before = len(_trace(tmp_path))
    again = fake_points(tmp_path, ["a", "b"], sleep=0.2)
    assert [p.status for p in again] == ["done", "queued"] and again[1].stage == 1
    local.Runner([p for p in again if p.status == "queued"], capacity=2, env=dict(os.environ), log=lambda s: None).run()
    rerun = _trace(tmp_path)[before:]
    assert [(name, stage) for name, stage, *_ in rerun] == [("b", "second")]


def test_an_interrupted_run_stops_its_stages_and_keeps_the_finished_ones(tmp_path):
    points = fake_points(tmp_path, ["a"], sleep=30)
    runner = local.Runner(points, capacity=2, env=dict(os.environ), log=lambda s: None)
    points[0].stages[0].argv[6] = "0.1"  # first stage quick, second one long: interrupted while it runs

    def interrupt(*_):
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert time.time() - t0 < 20
    proc = points[0].proc
    assert proc is not None and proc.poll() is not None  # the stage process was stopped, not left behind
    state = json.loads((Path(points[0].state_dir) / "state.json").read_text())
    assert state["done_stages"] == ["first"] and state["interrupted"] is True


def test_a_point_changed_since_its_last_run_is_refused(tmp_path):
    (point,) = fake_points(tmp_path, ["a"], sleep=0.1)
    local.Runner([point], capacity=1, env=dict(os.environ), log=lambda s: None).run()
    changed = rendered_points(chart.render(SMOKE, sets=["sweep.config.train.num_steps=7"]))[0]
    changed.name = "a"
    placed = local.place(changed, str(tmp_path / "data"), str(tmp_path / "state"))
    with pytest.raises(ConfigError, match="ran before with other settings"):
        local._load_state(placed)


RUNNER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.fixtures.sweep_points import fake_points
from mzsane.sweep import local
points = fake_points(Path(sys.argv[2]), ["a"], sleep=60)
local.Runner(points, capacity=1, env=dict(os.environ), log=lambda s: None).run()
"""


def test_a_killed_runner_leaves_no_stage_process_behind(tmp_path):
    import signal
    import subprocess

    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(ROOT), str(tmp_path)])
    state = tmp_path / "state" / "smoke" / "a" / "state.json"
    deadline = time.time() + 60
    while not (state.exists() and "pid" in json.loads(state.read_text() or "{}")) and time.time() < deadline:
        time.sleep(0.1)
    stage_pid = json.loads(state.read_text())["pid"]
    os.kill(stage_pid, 0)  # running
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(stage_pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{stage_pid}/stat") as fh:  # an exited child of the dead runner is a zombie until reaped
            if fh.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(stage_pid, signal.SIGKILL)
    raise AssertionError("the stage process outlived its runner")


@pytest.mark.parametrize("job", sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml")))
def test_every_sweep_has_a_local_overlay_that_fits_two_cores(job, tmp_path):
    overlay = ROOT / "jobs" / "local" / f"{job}.yaml"
    assert overlay.exists(), f"jobs/{job}.yaml has no local-scale overlay jobs/local/{job}.yaml"
    points = [local.place(p, str(tmp_path / "data"), str(tmp_path / "state"), write=False)
              for p in rendered_points(chart.render([str(ROOT / "jobs" / f"{job}.yaml"), str(overlay)]))]
    assert points and all(p.cpus <= 2 for p in points)
    assert not any(p.cfg.metrics.enabled for p in points)  # parallel points on one host would share the port
    _, _, needs = prerequisites.needs({p.name: p.cfg for p in points}, {p.name: p.rendered.extra_target_zoos
                                                                       for p in points})
    # the demo recipe's zoos (30 CNNs, 8 ResNets) grown by at most ~16 models: minutes of zoo building
    assert all(prerequisites._zoo_config(n).num_models <= 48 for n in needs.values())
    assert all(p.cfg.train.num_epochs > 0 for p in points if job != "smoke")  # equal exposure, not equal steps


def test_the_equal_steps_control_differs_from_the_zoo_size_sweep_only_in_its_budget(tmp_path):
    base = [str(ROOT / "jobs" / "zoo-size.yaml"), str(ROOT / "jobs" / "local" / "zoo-size.yaml")]
    control = [*base, str(ROOT / "jobs" / "local" / "zoo-size-equal-steps.yaml")]

    def configs(files):
        return {p.name: local.place(p, str(tmp_path / "data"), str(tmp_path / "s"), write=False).cfg
                for p in rendered_points(chart.render(files))}

    passes, steps = configs(base), configs(control)
    assert set(steps) < set(passes)  # the same point names, sizes 4-16 of the zoo-size sweep, all seeds
    assert {c.train.num_steps for c in steps.values()} == {1200}
    assert all(c.train.num_epochs == 0 for c in steps.values())
    for name, cfg in steps.items():
        a, b = cfg, passes[name]
        assert (a.data, a.model, a.loss, a.sample.seed, a.train.lr) == (b.data, b.model, b.loss, b.sample.seed,
                                                                        b.train.lr)
        assert a.run_name != b.run_name  # its own backbones
