"""A backbone's learning curve: zero-shot generation and its ceiling at every checkpoint the run kept.

Why: the cause table measures every setting at one budget, so it cannot say where more steps would take a
run (issue 26.3). A run that keeps its checkpoints (``train.num_checkpoints_to_keep``) is sampled and evaluated
at each of them with the same anchors (same ``sample.seed``, same pool), so the curve changes one thing, the
steps: the generated top-k, the unselected candidates, the mean and best noise-free reconstruction of the
anchors (the ceiling) and the run's own validation reconstruction loss at that step.

Zero-shot only: fine-tuning and the HyperNetwork arm are off (they answer another question and would cost more
than the sampling). Resumable: a checkpoint whose ``{out}/step_{n}/evaluate/results.json`` exists is read, not
redone, so a curve can grow while its run trains on, across sessions.
"""
from __future__ import annotations

import copy
import csv
import io
import json
from typing import Any

from mzsane import storage
from mzsane.errors import DataError

COLUMNS = ("step", "generated", "generated_unselected", "reconstruction", "reconstruction_best", "anchors",
           "val_loss_recon", "anchor_pool")
CURVE_METHODS = ("generated", "generated_unselected", "reconstruction", "reconstruction_best", "anchors")


def checkpoints(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of the run's complete checkpoints, oldest first; one line when there are none."""
    from mzsane.train.checkpoint import latest_checkpoint_url, list_checkpoints

    found = [(step, url) for step, url in list_checkpoints(run_url) if latest_checkpoint_url(url)]
    if not found:
        raise DataError(f"run '{run_url}' holds no complete checkpoint; train it first, and keep more than the last "
                        "two with --set train.num_checkpoints_to_keep=N for a curve")
    return found


def validation_losses(run_url: str) -> dict[int, float]:
    """step -> ``val/loss_recon`` from the run's log (empty if it has none)."""
    url = storage.join(run_url, "log.jsonl")
    if not storage.exists(url):
        return {}
    out = {}
    for line in storage.read_text(url).splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a killed run
            continue
        if "val/loss_recon" in record and "step" in record:
            out[int(record["step"])] = float(record["val/loss_recon"])
    return out


def curve_row(step: int, results: dict[str, Any], val_loss: float | None) -> dict[str, Any]:
    """One point of the curve from one evaluation's results."""
    from mzsane.evaluate.report import anchor_pool_of, best_reconstruction

    by_method = {r["method"]: float(r["test_acc_mean"]) for r in [*results["rows"], *best_reconstruction(results)]}
    return {"step": step, **{m: by_method.get(m, float("nan")) for m in CURVE_METHODS},
            "val_loss_recon": float("nan") if val_loss is None else val_loss,
            "anchor_pool": anchor_pool_of(results)}


def learning_curve(run_url: str, zoo_url: str, out_url: str, sample_cfg: Any, eval_cfg: Any,
                   log=print) -> dict[str, Any]:
    """Sample and evaluate ``zoo_url`` from every kept checkpoint of ``run_url`` into ``{out_url}/step_{n}``;
    write ``curve.json``, ``curve.csv`` and ``curve.png`` under ``out_url``."""
    from mzsane.evaluate.report import evaluate
    from mzsane.sample.generate import sample

    ev = copy.deepcopy(eval_cfg)
    ev.finetune_epochs, ev.hypernet_steps = 0, 0
    losses = validation_losses(run_url)
    found = checkpoints(run_url)
    rows = []
    for i, (step, ckpt) in enumerate(found):
        point = storage.join(out_url, f"step_{step:08d}")
        results_url = storage.join(point, "evaluate", "results.json")
        if storage.exists(results_url):
            log(f"[curve {i + 1}/{len(found)}] step {step}: evaluated before, read")
        else:
            log(f"[curve {i + 1}/{len(found)}] step {step}: sampling and evaluating")
            sample(ckpt, zoo_url, point, sample_cfg, progress=False)
            evaluate(point, zoo_url, ev, plots=False)
        rows.append(curve_row(step, storage.read_json(results_url), losses.get(step)))
    summary = {"run": run_url, "zoo": zoo_url, "rows": rows,
               "sample": {k: getattr(sample_cfg, k) for k in vars(sample_cfg)}}
    storage.write_json(storage.join(out_url, "curve.json"), summary)
    storage.write_text(storage.join(out_url, "curve.csv"), curve_csv(rows))
    summary["plot"] = write_plot(rows, storage.join(out_url, "curve.png"), zoo_url)
    return summary


def curve_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    return buf.getvalue()


def write_plot(rows: list[dict[str, Any]], url: str, zoo_url: str) -> str:
    """Test accuracy against steps (left axis) beside the validation reconstruction loss (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = {"generated": "generated (top-k)", "generated_unselected": "unselected candidates",
              "reconstruction": "ceiling (mean anchor)", "reconstruction_best": "ceiling (best anchor)",
              "anchors": "anchors"}
    for method, label in labels.items():
        ax.plot(steps, [r[method] for r in rows], marker="o", label=label,
                linestyle="--" if method == "anchors" else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    losses = [r["val_loss_recon"] for r in rows]
    if any(v == v for v in losses):  # any not NaN
        twin = ax.twinx()
        twin.plot(steps, losses, color="grey", marker="x", linestyle=":", label="val reconstruction loss")
        twin.set_ylabel("val reconstruction loss")
        twin.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    pool = rows[0]["anchor_pool"] if rows else ""
    ax.set_title(f"learning curve, {zoo_url.rstrip('/').rsplit('/', 1)[-1]} ({pool} anchors)")
    return storage.write_figure(url, fig, tight=True)


def curve_cli(args: Any) -> None:
    """``mzsane curve --backbone RUN --zoo ZOO --out OUT``: prints the curve as a table."""
    summary = learning_curve(args.backbone, args.zoo, args.out, args.cfg.sample, args.cfg.evaluate)
    print(" ".join(f"{c:>20}" for c in COLUMNS))
    for r in summary["rows"]:
        print(" ".join(f"{r[c]:>20.4f}" if isinstance(r[c], float) else f"{r[c]!s:>20}" for c in COLUMNS))
    print(f"curve: {storage.join(args.out, 'curve.csv')}, plot: {summary['plot']}")
