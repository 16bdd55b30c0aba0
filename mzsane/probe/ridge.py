"""Linear (ridge) probes in closed form, with the regularization chosen by exact leave-one-out on train.

Why numpy and closed form: the probes have a few hundred rows and at most a few hundred features, so an
SVD solves every regularization strength at once; no scikit-learn dependency is needed. The strength is
picked on the training rows only, by exact leave-one-model-out residuals (``(I - H_gg)^-1 e_g`` from the
SVD, no refits), so held-out models are touched once, for the reported R^2 and Kendall's tau.

Legend: N rows (checkpoints), F features, S singular values, A regularization strengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))


@dataclass
class RidgeProbe:
    """Standardization of the training features, the chosen strength and the weights."""

    mean_F: np.ndarray
    scale_F: np.ndarray
    coef_F: np.ndarray
    intercept: float
    alpha: float
    loo_mse: float

    def predict(self, x_NF: np.ndarray) -> np.ndarray:
        return ((x_NF - self.mean_F) / self.scale_F) @ self.coef_F + self.intercept


def _group_loo_mse(u_NS: np.ndarray, d_S: np.ndarray, resid_N: np.ndarray, groups: list[np.ndarray]) -> float:
    """Exact leave-one-group-out error of a linear smoother: ``e_g / (I - H_gg)`` for each group g.

    ``H = U diag(d) U^T + 1/N`` (the intercept's share); only the diagonal blocks are formed, so memory stays
    O(N * S) however many rows there are. A singular block (the fit interpolates that group) has no estimate.
    """
    n, total = len(resid_N), 0.0
    for index in groups:
        u_GS = u_NS[index]
        free_GG = np.eye(len(index)) - (u_GS * d_S) @ u_GS.T - 1.0 / n
        if np.linalg.cond(free_GG) > 1e10:
            return np.inf
        total += float(np.sum(np.linalg.solve(free_GG, resid_N[index]) ** 2))
    return total / n


def fit(x_NF: np.ndarray, y_N: np.ndarray, alphas: tuple[float, ...] = ALPHAS,
        groups: np.ndarray | list | None = None) -> RidgeProbe:
    """Ridge regression on standardized features; ``alpha`` minimizes the leave-one-group-out squared error.

    Why groups: the rows of a probe are checkpoints, several per model; leaving out one checkpoint while its
    siblings stay would reward memorizing model identity. With ``groups`` (one label per row, e.g. model
    ids) whole groups are left out, as the held-out models will be; without, every row is its own group.
    """
    x_NF, y_N = np.asarray(x_NF, dtype=np.float64), np.asarray(y_N, dtype=np.float64)
    if x_NF.ndim != 2 or len(x_NF) != len(y_N) or len(y_N) < 2:
        raise ValueError(f"ridge needs >= 2 rows of 2-D features and one target each, got {x_NF.shape}, {y_N.shape}")
    mean_F = x_NF.mean(0)
    scale_F = x_NF.std(0)
    scale_F[~(scale_F > 1e-12)] = 1.0  # constant features (padding, fixed BN scales) stay 0 after centering
    xs_NF = np.nan_to_num((x_NF - mean_F) / scale_F)
    intercept = float(y_N.mean())
    yc_N = y_N - intercept
    u_NS, s_S, vt_SF = np.linalg.svd(xs_NF, full_matrices=False)
    uty_S = u_NS.T @ yc_N
    labels = np.arange(len(y_N)) if groups is None else np.asarray(groups)
    index_groups = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    best = (np.inf, alphas[0], np.zeros(x_NF.shape[1]))
    for alpha in alphas:
        shrink_S = s_S / (s_S ** 2 + alpha)
        fitted_N = u_NS @ (s_S * shrink_S * uty_S)
        mse = _group_loo_mse(u_NS, s_S * shrink_S, yc_N - fitted_N, index_groups)
        if mse < best[0]:
            best = (mse, alpha, vt_SF.T @ (shrink_S * uty_S))
    return RidgeProbe(mean_F, scale_F, best[2], intercept, float(best[1]), best[0])


def r2_score(y_N: np.ndarray, pred_N: np.ndarray) -> float:
    """Coefficient of determination against the held-out rows' own mean (can be negative)."""
    y_N, pred_N = np.asarray(y_N, dtype=np.float64), np.asarray(pred_N, dtype=np.float64)
    total = float(np.sum((y_N - y_N.mean()) ** 2))
    if total <= 0:
        return float("nan")
    return 1.0 - float(np.sum((y_N - pred_N) ** 2)) / total


def kendall_tau(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable accounted for), scipy's; NaN where it is undefined."""
    from scipy import stats

    a_N, b_N = np.asarray(a_N, dtype=np.float64), np.asarray(b_N, dtype=np.float64)
    if len(a_N) < 2:
        return float("nan")
    return float(stats.kendalltau(a_N, b_N, variant="b").statistic)
