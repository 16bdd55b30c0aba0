"""Sweeps: the Helm chart's points, on a KubeRay cluster (``submit``/``status``) or on one machine (``run``).

One module per noun: ``chart`` (render through Helm), ``cluster`` (the Kubernetes API; the only module
importing the ``kubernetes`` client), ``local`` (``sweep run``: the rendered points on local Ray),
``results`` (``sweep report``: tables and the Figure-3 plot), ``paired`` (settings compared paired by seed,
with a test and its p-value), ``point`` (the point record each RayJob
writes), ``overlay`` (how values files stack: Helm's merge, keyed runs/compositions/axes,
``sweep convert``). The names below keep ``from mzsane import sweep; sweep.render(...)`` working; the cluster and
local runners are imported lazily so importing this package loads neither Kubernetes nor Ray.
"""
from __future__ import annotations

from typing import Any

from mzsane.sweep.chart import CHART_DIR, load_values, parse_set, render, render_cli
from mzsane.sweep.point import main, record_point
from mzsane.sweep.results import REPORT_COLUMNS, ZERO_SHOT_METHOD, collect, format_table, report, report_cli

_LAZY = {"submit": "cluster", "submit_cli": "cluster", "status": "cluster", "status_cli": "cluster",
         "SWEEP_LABEL": "cluster", "POINT_LABEL": "cluster", "run": "local", "run_cli": "local"}

__all__ = ["CHART_DIR", "POINT_LABEL", "REPORT_COLUMNS", "SWEEP_LABEL", "ZERO_SHOT_METHOD", "collect", "format_table",
           "load_values", "main", "parse_set", "record_point", "render", "render_cli", "report", "report_cli", "run",
           "run_cli", "status", "status_cli", "submit", "submit_cli"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mzsane.sweep.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mzsane.sweep' has no attribute '{name}'")
