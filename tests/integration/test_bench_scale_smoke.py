"""``mzsane bench scale --quick`` runs end to end (synthetic zoos, shards local and in SeaweedFS, 2 Ray Train
workers on a two-node loopback cluster, a big synthetic manifest) and prints physically possible figures.

No speed is asserted (the goals are stated in the benchmark's own ``checks``); what is asserted holds on
any machine: each worker reads only its share of the rows per epoch, the build's memory does not scale
with the zoo, every worker's memory was measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    mzsane = os.path.join(os.path.dirname(sys.executable), "mzsane")
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    done = subprocess.run([mzsane, "bench", "scale", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    # --out holds the whole result, not the figures saved after the last size (it lacked manifest and checks)
    assert json.loads(out.read_text()) == result
    png = out.with_suffix(".png")
    assert result["figure"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return result


def test_build_figures_for_each_size_local_and_s3(quick):
    assert quick["sizes"] == [10, 100] and quick["architecture"] == "resnet_mini"
    assert [b["models"] for b in quick["build_local"]] == [10, 100]
    assert [b["models"] for b in quick["build_s3"]] == [10]
    for where in ("build_local", "build_s3"):
        for b in quick[where]:
            assert b["s_per_model"] > 0 and b["rows"] == b["models"] and b["bytes_per_model"] > 0
            assert 50 < b["peak_rss_mb"] < 4096
    small, large = quick["build_local"]
    assert large["peak_rss_mb"] < 1.5 * small["peak_rss_mb"], "the build streams: 10x the zoo, not 10x the memory"
    par = quick["parallel_build"]
    assert par["processes"] == 2 and par["speedup"] > 0


def test_training_figures_per_size(quick):
    for t in quick["train"]:
        assert set(t["peak_rss_mb_per_worker"]) == {"0", "1"}
        assert all(200 < v < 8192 for v in t["peak_rss_mb_per_worker"].values())
        assert 0 < t["start_to_first_step_s"] < 600 and 0 < t["manifest_and_selection_s"] < 60
        assert 0 <= t["data_wait_fraction_steady"] <= 1 and t["tokens_per_s_rank0"] > 0
        # each row is read by one rank once per epoch: a worker reads its share, not the whole dataset
        assert 0 < t["bytes_read_per_worker_per_epoch"] <= 1.1 * t["train_bytes_over_workers"] + 4096


def test_big_manifest_and_projection(quick):
    m = quick["manifest_1e6"]
    assert m["manifest_rows"] == 10_000 and m["selected_rows"] == 700
    assert m["manifest_load_s"] >= 0 and m["select_s"] > 0 and m["index_mb"] > 0
    assert m["json_format"]["same_selection"] and m["json_format"]["manifest_load_s"] > 0
    p = quick["projection"]
    for n in ("1000", "10000"):
        assert p[n]["shard_gb"] > 0 and p[n]["build_h_one_process"] > 0
    gpu = p["paper_gpu"]
    assert gpu["tokens_per_s"] > 0 and gpu["assumptions"]["mfu"] == pytest.approx(0.35)
    assert set(quick["checks"]) >= {"train_rss_goal_1_1x", "data_wait_under_1pct", "bytes_per_worker_epoch_le_share"}


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes of the loopback cluster whose Ray temp dir is ``temp_dir`` (its nodes name it on their
    command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if temp_dir.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_sigterm_stops_the_bench_with_its_cluster_and_scratch(tmp_path):
    """``kill`` (or a CI timeout) on a running benchmark: it says "interrupted" and exits 130, the loopback
    Ray cluster it started (daemonized nodes in sessions of their own) is gone, and its scratch folder is
    removed. Before, SIGTERM ended the process without its ``finally`` and left both behind."""
    import contextlib
    import glob
    import signal
    import time

    before = set(glob.glob("/tmp/mzray-*"))
    mzsane = os.path.join(os.path.dirname(sys.executable), "mzsane")
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the benchmark's scratch folder lands here
    proc = subprocess.Popen([mzsane, "bench", "scale", "--quick"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, temp_dir = time.time() + 300, ""
        while time.time() < deadline and proc.poll() is None:
            new = sorted(set(glob.glob("/tmp/mzray-*")) - before)
            # both nodes up: the worker node's raylet names the head's temp dir too
            if new and len(_cluster_pids(new[0])) >= 6:
                temp_dir = new[0]
                break
            time.sleep(0.5)
        assert temp_dir, "the benchmark never started its loopback cluster"
        time.sleep(3.0)
        assert glob.glob(os.path.join(str(tmp_path), "mzsane-bench-scale-*")), "no scratch folder to clean up"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err[-2000:])
        deadline = time.time() + 30
        while _cluster_pids(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        assert not _cluster_pids(temp_dir), "the loopback Ray cluster outlived its benchmark"
        assert not os.path.exists(temp_dir)
        assert not _cluster_pids(str(tmp_path)), "a server of the benchmark (SeaweedFS) outlived it"
        assert not glob.glob(os.path.join(str(tmp_path), "mzsane-bench-scale-*")), "scratch folder left behind"
    finally:  # a red run must not leave its cluster running under the rest of the suite
        for pid in _cluster_pids(temp_dir) + _cluster_pids(str(tmp_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
