"""Paired-by-seed comparison of two sweep settings: the mean difference, a stated test, its p-value, a verdict.

Why paired: seeds of one sweep share everything random between settings (data order, init, anchor and latent
draws: the ``seed`` axis), so the seed-to-seed spread that makes two settings' 95% intervals overlap is mostly
shared; the differences within a seed carry the comparison. Two tests on the per-seed differences d_i:

* the paired t-test (``scipy.stats.ttest_rel``, two-sided), the verdict's test: it assumes the d_i are
  normal, which three seeds cannot check;
* the exact sign-flip permutation test (two-sided: the share of the 2^n sign patterns of |d_i| whose mean is
  at least |mean d| in size), which assumes only that d_i is symmetric about 0 under "no difference". Its
  smallest p-value is 2 / 2^n: 0.25 at three seeds, so at n = 3 it can never call a difference; it is
  reported beside the t-test so a reader sees how much the verdict leans on the normality assumption.

The verdict is ``not distinguishable`` when p >= ``ALPHA`` (or too few pairs to test), else which side is
higher. A comparison never pairs points of different seeds, and names the seeds it paired.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ALPHA = 0.05
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass
class Comparison:
    """``a`` minus ``b`` over the seeds both settings ran, for one target and one method."""

    target_zoo: str
    method: str
    a: str  # the settings' labels (composition, zoo size, axes)
    b: str
    seeds: str  # the paired seeds, comma-separated
    n_pairs: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean over pairs of a - b
    diff_ci95: float  # 95% Student-t half-width of mean_diff (NaN below two pairs)
    t_stat: float
    p_t: float  # paired t-test, two-sided (the verdict's test)
    p_sign_flip: float  # exact sign-flip permutation test, two-sided
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign_flip_p(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip p-value of mean(diffs) = 0: every one of the 2^n sign patterns counted."""
    diffs = np.asarray(diffs, dtype=float)
    if diffs.size == 0:
        return float("nan")
    observed = abs(diffs.mean())
    means = [abs(np.dot(signs, np.abs(diffs)) / diffs.size)
             for signs in itertools.product((1.0, -1.0), repeat=diffs.size)]
    tol = 1e-12 * max(1.0, observed)  # float sums of the same magnitudes in another order
    return float(np.mean([m >= observed - tol for m in means]))


def paired_t(diffs: np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test on the differences (NaN below two pairs or with all d_i = 0)."""
    diffs = np.asarray(diffs, dtype=float)
    if diffs.size < 2 or not np.any(diffs != 0):
        return float("nan"), float("nan")
    if np.ptp(diffs) <= 1e-12 * np.abs(diffs).max():  # every pair moved by the same amount: no spread, t infinite
        return math.copysign(math.inf, float(diffs.mean())), 0.0
    from scipy import stats

    res = stats.ttest_rel(diffs, np.zeros_like(diffs))
    return float(res.statistic), float(res.pvalue)


def verdict(mean_diff: float, p: float, a: str, b: str, alpha: float = ALPHA) -> str:
    """One phrase: ``not distinguishable`` unless p < alpha, then which setting is higher."""
    if not math.isfinite(p) or p >= alpha:
        return NOT_DISTINGUISHABLE
    return f"{a} higher" if mean_diff > 0 else f"{b} higher"


def compare(a: dict[Any, float], b: dict[Any, float], *, label_a: str = "a", label_b: str = "b",
            target_zoo: str = "", method: str = "", alpha: float = ALPHA) -> Comparison:
    """Pair ``a`` and ``b`` (seed -> value) on the seeds both have, then test the mean difference."""
    seeds = sorted(set(a) & set(b), key=str)
    diffs = np.array([a[s] - b[s] for s in seeds], dtype=float)
    t_stat, p_t = paired_t(diffs)
    half = float("nan")
    if diffs.size >= 2:
        from scipy import stats

        half = float(stats.t.ppf(0.975, diffs.size - 1) * diffs.std(ddof=1) / np.sqrt(diffs.size))
    mean_diff = float(diffs.mean()) if diffs.size else float("nan")
    return Comparison(target_zoo, method, label_a, label_b, ",".join(str(s) for s in seeds), int(diffs.size),
                      float(np.mean([a[s] for s in seeds])) if seeds else float("nan"),
                      float(np.mean([b[s] for s in seeds])) if seeds else float("nan"),
                      mean_diff, half, t_stat, p_t, sign_flip_p(diffs),
                      verdict(mean_diff, p_t, label_a, label_b, alpha))


def setting_label(row: dict[str, Any]) -> str:
    """A report row's setting: composition, zoo size, non-seed axes (what ``sweep report`` groups by) and the
    anchor pool where it is not the held-out headline's."""
    pool = row.get("anchor_pool", "held_out")
    return (f"{row['composition']} n={row['zoo_size']}" + (f" {row['axes']}" if row.get("axes") else "")
            + (f" [{pool} anchors]" if pool != "held_out" else ""))


def compare_settings(rows: list[dict[str, Any]], method: str = "generated", baseline: str = "",
                     alpha: float = ALPHA) -> list[Comparison]:
    """Every setting against the baseline setting, per target, paired by seed, on ``method``'s accuracy.

    ``rows`` are ``sweep report``'s per-point rows. ``baseline`` is a substring of one setting's label (e.g.
    ``"mnist n=8"`` or ``"loss.token_weight_alpha=1"``); empty = the first setting in label order. Settings are
    compared within one anchor pool (seen anchors against the baseline's seen anchors, held-out against held-out):
    a seen-anchor figure against a held-out baseline would credit the setting with the protocol's gap, which is
    compared once, on the baseline's own backbones (its seen against its held-out anchors). A target and pool
    without the baseline, or with a single setting, gives no comparison.
    """
    values: dict[tuple[str, str], dict[str, dict[Any, float]]] = {}
    for row in rows:
        if row["method"] != method or not math.isfinite(row["test_acc_mean"]):
            continue
        seed = row["seed"] if row["seed"] != "" else row["point"]
        key = (row["target_zoo"], row.get("anchor_pool", "held_out"))  # seen with seen, held-out with held-out
        values.setdefault(key, {}).setdefault(setting_label(row), {})[seed] = row["test_acc_mean"]
    out, bases = [], {}
    for (target, pool), settings in sorted(values.items(), key=lambda kv: (kv[0][0], kv[0][1] != "held_out", kv[0][1])):
        labels = sorted(settings)
        matches = [s for s in labels if baseline in s] if baseline else labels[:1]
        if not matches:
            continue
        base = min(matches, key=len)  # "alpha=1" matches alpha=1 before alpha=1.5 would
        bases.setdefault(target, []).append((pool, base, settings[base]))
        for label in labels:
            if label != base:
                out.append(compare(settings[label], settings[base], label_a=label, label_b=base,
                                   target_zoo=target, method=method, alpha=alpha))
    for target, found in bases.items():  # the protocols' gap on the same backbones: baseline seen - held-out
        held = [b for b in found if b[0] == "held_out"]
        for _, label, accs in (b for b in found if b[0] != "held_out"):
            if held:
                out.append(compare(accs, held[0][2], label_a=label, label_b=held[0][1], target_zoo=target,
                                   method=method, alpha=alpha))
    return out


COLUMNS = ["target_zoo", "method", "a", "b", "seeds", "n_pairs", "mean_a", "mean_b", "mean_diff", "diff_ci95",
           "p_t", "p_sign_flip", "verdict"]


def format_comparisons(comparisons: list[Comparison]) -> str:
    """The comparisons as an aligned text table (a - b, paired t-test p, sign-flip p, verdict)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4f}" if abs(v) >= 1e-4 or v == 0 else f"{v:.1e}"
        return str(v)

    cells = [[cell(c.as_dict()[k]) for k in COLUMNS] for c in comparisons]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
