"""Every figure goes through ``storage.write_figure``: written at the URL it always had, on local disk and on
``memory://`` (the unit tests' stand-in for S3), at the resolution and cropping it always had (read back from the
PNG: its pHYs DPI, and its size against the uncropped figsize x DPI)."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from mzsane import storage
from mzsane.evaluate import finetune as ft
from mzsane.evaluate import report as ev
from mzsane.sweep import results as sweep_results


def _png(url: str) -> tuple[tuple[int, int], int]:
    """(pixel size, DPI) of the PNG at ``url``."""
    data = storage.read_bytes(url)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", url
    image = Image.open(io.BytesIO(data))
    return image.size, round(image.info["dpi"][0])


def _curves(methods: tuple[str, ...], final: float) -> dict:
    return {m: {"epoch": [0, 1], "test_acc_mean": [0.1, final + i / 100], "test_acc_std": [0.0, 0.01], "n": 2}
            for i, m in enumerate(methods)}


def test_evaluate_plots_are_written_beside_the_results(root):
    results = {"target_zoo": "mnist-cnn_s", "in_distribution": True,
               "rows": [{"method": m, "test_acc_mean": a, "test_acc_std": 0.01}
                        for m, a in (("generated", 0.7), ("anchors", 0.8), ("soup", 0.1))],
               "finetune": {"curves": _curves(("generated", "random"), 0.8)},
               "soup_curve": [{"n": n, "test_acc": 0.5 / n, "aligned": a} for n in (1, 2) for a in (False, True)]}
    out = storage.join(root, "p", "evaluate")
    plots = ev.write_plots(results, out)
    assert plots == {name: storage.join(out, f"{name}.png") for name in ("accuracy", "finetune", "soup")}
    for url in plots.values():
        size, dpi = _png(url)
        assert dpi == 110 and size != (6 * 110, round(3.5 * 110)), (url, size)  # cropped to what is drawn


def test_finetune_comparison_plot_is_written_at_its_url(root):
    rows = ft.comparison_rows([{"target_zoo": t, "dataset": t.split("-")[0], "backbone": "runs/a",
                                "in_distribution": True, "finetune": {"curves": _curves(("generated",), 0.7)}}
                               for t in ("mnist-cnn_s", "digits-cnn_s")])
    url = storage.join(root, "demo", "finetune.png")
    assert ft.write_comparison_plot(rows, url) == url
    size, dpi = _png(url)
    assert dpi == 110 and size != (round(2 * 4.2 * 110), round(3.4 * 110)), size


def test_sweep_report_figures_keep_the_figures_own_resolution(root, monkeypatch):
    url = storage.join(root, "sweeps", "grid")
    for size, acc in ((4, 0.6), (8, 0.7)):
        point = storage.join(url, f"n{size}")
        storage.write_json(storage.join(point, "point.json"), {"point": f"n{size}", "composition": "mnist",
                                                               "zoo_size": size, "zoos": ["mnist-cnn_s"]})
        storage.write_json(storage.join(point, "evaluate", "results.json"), {
            "target_zoo": "mnist-cnn_s", "in_distribution": True, "backbone": f"runs/n{size}",
            "rows": [{"method": "generated", "test_acc_mean": acc, "test_acc_std": 0.02, "n": 4}]})
    monkeypatch.setattr(sweep_results, "_probe_columns", lambda *a, **k: {
        "probe_r2_embedding": 0.5, "probe_r2_weight_stats": 0.4, "probe_tau_embedding": 0.3})
    out = storage.join(root, "report")
    result = sweep_results.report(url, out)
    assert (result["png"], result["probe_png"]) == (storage.join(out, "sweep_zero_shot.png"),
                                                    storage.join(out, "sweep_probe.png"))
    for png in (result["png"], result["probe_png"]):
        assert _png(png) == ((round(6.4 * 120), round(4.2 * 120)), 120), png  # dpi=120 figure, uncropped


@pytest.mark.parametrize("tight", [False, True])
def test_write_figure_closes_the_figure(root, tight):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    ax.plot([0, 1], [1, 0])
    url = storage.join(root, "f.png")
    assert storage.write_figure(url, fig, dpi="figure", tight=tight) == url
    size, dpi = _png(url)
    assert dpi == 50 and (size != (100, 50)) == tight
    assert not plt.fignum_exists(fig.number)
