"""``mzsane bench train --preset P``: whole training steps of one preset in-process (the path ``--preset paper``
takes on a GPU), here at the tiny preset's scale on CPU: the JSON carries real and padded tokens/s and the FLOP
fractions, the real tokens are the model's own (its token count, from the tokenizer, not from the benchmark),
padding shows up only when asked for, and ``--out`` keeps the same JSON."""
from __future__ import annotations

import json

import pytest

from mzsane import config as config_mod
from mzsane import presets
from mzsane.cli import main

pytestmark = [pytest.mark.integration]

KEYS = {"median_step_s", "real_tokens_per_s", "padded_tokens_per_s", "mfu", "mfu_real", "peak_gflops",
        "windows_per_step", "window_positions", "real_tokens_per_window", "load_avg", "runs", "model", "device"}


def _cnn_s_tokens(tokensize: int) -> int:
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.zoo.architectures import build_model

    return layout_from_state_dict(build_model("cnn_s").state_dict(), tokensize).num_tokens


def _bench(capsys, tmp_path, *sets: str) -> dict:
    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--preset", "tiny", "--arch", "cnn_s", "--steps", "12", "--repeats", "1",
            "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    return printed


def test_bench_train_preset_reports_real_and_padded_tokens(capsys, tmp_path):
    tokensize = config_mod.load(presets.tiny()).tokens.tokensize
    n = _cnn_s_tokens(tokensize)
    window = 4 * n  # longer than the model
    out = _bench(capsys, tmp_path, f"data.window_size={window}")
    assert set(out) >= KEYS and out["preset"] == "tiny" and out["model"]["d_model"] == 32
    # default: a window never has more positions than its model has tokens
    assert out["real_tokens_per_window"] == pytest.approx(n) and out["window_positions"] == pytest.approx(n)
    assert out["real_tokens_per_s"] > 0 and out["real_tokens_per_s"] == pytest.approx(out["padded_tokens_per_s"])
    assert 0 < out["mfu_real"] < 1.5 and out["mfu_real"] == pytest.approx(out["mfu"])

    padded = _bench(capsys, tmp_path, f"data.window_size={window}", "data.pad_windows=true")
    assert padded["window_positions"] == pytest.approx(window) and padded["real_tokens_per_window"] == pytest.approx(n)
    assert padded["real_tokens_per_s"] < padded["padded_tokens_per_s"]
    assert padded["real_tokens_per_s"] * window == pytest.approx(padded["padded_tokens_per_s"] * n, rel=1e-3)
    assert padded["mfu_real"] < padded["mfu"]
