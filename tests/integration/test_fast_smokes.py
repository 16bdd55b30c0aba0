"""Fast smokes (not ``slow``) of the paths ``make demo`` takes, so ``-m "not slow"`` still touches Ray,
Prometheus and ``evaluate``:

* ``mzsane train`` on its default path: no ``--address``, the command starts its own local Ray instance
  (2 Ray Train workers, the demo's set-up) and stops it again;
* a real Prometheus server scraping the exporter a training rank serves;
* ``sample`` then ``evaluate`` on the backbone that command trained.

The zoo holds freshly initialized cnn_s models and the images are synthetic (no dataset load): these prove
the stages run and connect, not what they learn (the slow end-to-end tests do that).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mzsane import storage

pytestmark = [pytest.mark.integration, pytest.mark.ray]

NODE_IP = "127.0.0.9"  # this test's own loopback address: its Ray processes are findable by it


def _synthetic_dataset():
    from mzsane.zoo.datasets import ImageDataset, Split

    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    return ImageDataset(name="mnist", train=split(256), val=split(128), test=split(128), num_classes=10, channels=1,
                        image_size=28, mean=0.0, std=1.0)


def _ray_processes() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if NODE_IP in cmd and "pytest" not in cmd:
                out.append(f"{entry}: {cmd[:120]}")
    return out


@pytest.fixture(scope="module")
def default_train(tmp_path_factory):
    """A toy zoo, its shards, and ``mzsane train`` exactly as the demo calls it: no --address."""
    from tests.fixtures.zoos import make_zoo

    root = str(tmp_path_factory.mktemp("smoke"))
    zoo_url = make_zoo(storage.join(root, "zoos"), "mnist-cnn_s", num_models=10, epochs=(0,))
    mzsane = os.path.join(os.path.dirname(sys.executable), "mzsane")
    shards = storage.join(root, "shards")
    built = subprocess.run([mzsane, "shards", "build", zoo_url, "--out", shards, "--preset", "tiny"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no fixture cluster, no token
    done = subprocess.run([mzsane, "train", "--preset", "tiny", "--set", f"storage.root={root}",
                           "--set", f"data.shards_url={shards}", "--set", "cluster.num_workers=2",
                           "--set", f"cluster.node_ip={NODE_IP}", "--set", "run_name=smoke"],
                          capture_output=True, text=True, timeout=600, env=env)
    return {"root": root, "zoo": zoo_url, "done": done, "run": storage.join(root, "runs", "smoke")}


def test_default_train_starts_its_own_ray_with_two_workers_and_stops_it(default_train):
    done, run = default_train["done"], default_train["run"]
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(run, "config.json")) as fh:
        assert json.load(fh)["cluster"]["num_workers"] == 2
    assert sorted(os.listdir(os.path.join(run, "workers"))) == ["rank_0.json", "rank_1.json"]
    from mzsane.train import checkpoint as ckpt

    assert [step for step, _ in ckpt.list_checkpoints(run)][-1] == 20  # the tiny preset's 20 steps
    deadline = time.time() + 20  # processes of a stopped instance may take a moment to exit
    while _ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert _ray_processes() == []  # the command stopped the Ray instance it started


def test_prometheus_scrapes_a_training_ranks_exporter(prometheus_server):
    from mzsane.metrics import PrometheusSink

    sink = PrometheusSink("smoke-run", world_rank=1)
    try:
        sink.log({"train/loss": 0.25, "train/steps": 3, "perf/step_time_s": [0.1, 0.2]}, step=7)
        prom = prometheus_server([sink.target])
        step = prom.wait_for('mzsane_train_step{run="smoke-run",world_rank="1"}', timeout=30)
        assert float(step[0]["value"][1]) == 7
        (loss,) = prom.wait_for('mzsane_train_loss{term="loss"}')
        assert float(loss["value"][1]) == 0.25
        (steps,) = prom.wait_for("mzsane_train_steps_total")
        assert float(steps["value"][1]) == 3
    finally:
        sink.close()


def test_sample_and_evaluate_on_the_trained_backbone(default_train):
    assert default_train["done"].returncode == 0, "training failed (see the test above)"
    from mzsane.config import EvaluateConfig
    from mzsane.evaluate.report import evaluate
    from mzsane.model.backbone import load_backbone
    from mzsane.sample.generate import sample

    _, cfg = load_backbone(default_train["run"])
    dataset = _synthetic_dataset()
    out = storage.join(default_train["root"], "samples")
    results = sample(default_train["run"], default_train["zoo"], out, cfg.sample, dataset=dataset, progress=False)
    assert len(results["generated"]) == cfg.sample.num_keep
    ecfg = EvaluateConfig(finetune_epochs=1, finetune_max_train_images=64, soup_sizes=[1, 2], num_random=2,
                          num_finetune_models=1, hypernet_steps=0, num_novelty_images=32, max_train_models=3)
    report = evaluate(out, default_train["zoo"], ecfg, dataset=dataset, plots=False)
    methods = {r["method"] for r in report["rows"]}
    assert {"generated", "anchors", "random"} <= methods
    assert all(0.0 <= r["test_acc_mean"] <= 1.0 for r in report["rows"])
    with open(os.path.join(out, "evaluate", "results.json")) as fh:
        assert json.load(fh)["rows"] == report["rows"]
