"""The quick benchmarks run through the CLI and print well-formed JSON with physically possible figures.

No speed is asserted here (targets live in the benchmarks' own output); this only keeps the benchmark
code from rotting between the times someone runs it by hand. ``bench shards`` starts its own SeaweedFS."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _bench(stage: str) -> dict:
    mzsane = os.path.join(os.path.dirname(sys.executable), "mzsane")
    done = subprocess.run([mzsane, "bench", stage, "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_bench_tokens_reports_rates_for_small_and_large_architectures():
    out = _bench("tokens")
    for arch, tokens in (("cnn_s", 48), ("resnet18", 43_924)):
        assert out[arch]["num_tokens"] == tokens  # spec section 1.4 counts at tokensize 288
        assert out[arch]["checkpoints_tokenized_per_s"] > 0


def test_bench_shards_measures_local_and_s3_and_checks_the_targets():
    out = _bench("shards")
    for where in ("local", "s3_loopback"):
        figures = out[where]
        assert figures["read_mb_s"] > 0 and figures["write_mb_s"] > 0
        assert 0 < figures["bytes_per_model"] < figures["raw_mb"] * 2**20 * 1.1
    r18 = out["resnet18"]
    assert r18["meets_targets"] == (r18["ingest_s_per_checkpoint"] <= r18["target_ingest_s"]
                                    and r18["bytes_per_model"] <= r18["target_bytes_per_model"])


def test_bench_model_relates_achieved_to_matmul_flops():
    small = _bench("model")["presets"]["small"]
    assert small["d_model"] == 512 and small["tokens_per_s"] > 0
    assert 0 < small["matmul_fraction"] <= 1.5  # achieved / plain-matmul FLOP/s on the same machine


def test_bench_zoo_compares_batched_with_one_model_and_bounds_it_by_the_convolutions():
    out = _bench("zoo")
    assert [(r["batch_size"], r["backend"]) for r in out["runs"]] == [(10, "batched"), (64, "batched"), (64, "loop")]
    for run in out["runs"]:
        assert run["population"] >= 1 and run["single_step_ms"] > 0 and run["population_step_ms"] > 0
        assert run["speedup"] == pytest.approx(run["single_step_ms"] * run["population"] / run["population_step_ms"])
        assert run["speedup_vs_channels_last_single"] == pytest.approx(
            run["single_step_ms_channels_last"] * run["population"] / run["population_step_ms"])
    first = out["runs"][0]
    # the convolution kernels are part of the batched step, so they cannot take longer than all of it
    assert 0 < out["batch10_convolution_ms_per_model_step"] < first["population_step_ms"] / first["population"]
    best = min(first["single_step_ms"], first["single_step_ms_channels_last"])
    assert out["batch10_speedup_ceiling_convolutions_only"] == pytest.approx(
        best / out["batch10_convolution_ms_per_model_step"])
    assert out["batch10_speedup_ceiling_convolutions_only"] > best * first["population"] / first["population_step_ms"]
    assert out["target_speedup_batch10"] == 10
    assert out["meets_target"] == (first["speedup"] >= 10)
    assert out["evals_per_s_batched"] > 0 and out["evals_per_s_single"] > 0
