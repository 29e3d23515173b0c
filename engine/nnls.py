"""Non-negative least squares, exactly, for the few columns of a time model (engine/cost_model.py
fits its coefficients with it). Pure numpy."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def nnls(a: FloatArray, b: FloatArray) -> FloatArray:
    """Non-negative least squares, exactly, for the few columns of a time model. The optimum is
    the plain least-squares solution on its own support: the Lawson-Hanson active set finds
    that support in a few solves, ending only where the optimality (KKT) conditions hold; in
    the rare case it does not settle (a degenerate matrix), every support is tried (2^5)."""
    full = np.linalg.lstsq(a, b, rcond=None)[0]
    if np.all(full >= 0):
        return np.asarray(full, dtype=np.float64)
    tol = 1e-12 * (float(np.abs(a).sum()) * float(np.abs(b).sum()) + 1.0)
    x = _active_set(a, b, tol)
    return x if x is not None else _nnls_every_support(a, b)


def _active_set(a: FloatArray, b: FloatArray, tol: float) -> FloatArray | None:
    """The NNLS optimum by Lawson and Hanson's active-set method: the least-squares solution on
    a support where it is positive and the gradient points out of the feasible set everywhere
    else (within ``tol``); None if it does not settle within its iteration bound."""
    num_cols = a.shape[1]
    passive: list[int] = []
    x = np.zeros(num_cols)
    for _ in range(3 * num_cols):
        grad = a.T @ (b - a @ x)
        free = [j for j in range(num_cols) if j not in passive and grad[j] > tol]
        if not free:  # the KKT conditions hold: x is optimal
            return x
        passive.append(max(free, key=lambda j: grad[j]))
        for _ in range(3 * num_cols):  # solve on the passive set, stepping back while < 0
            cols = sorted(passive)
            z = np.zeros(num_cols)
            z[cols] = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if np.all(z[cols] > 0):
                x = z
                break
            steps = [x[j] / (x[j] - z[j]) for j in cols if z[j] <= 0 and x[j] > z[j]]
            if not steps:
                return None  # no way back into the feasible set: degenerate
            x = x + min(steps) * (z - x)
            floor = 1e-14 * float(np.abs(x).max())
            passive = [j for j in passive if x[j] > floor]
        else:
            return None
    return None


def _nnls_every_support(a: FloatArray, b: FloatArray) -> FloatArray:
    """NNLS by trying the least-squares solution on every support: the best non-negative one."""
    num_cols = a.shape[1]
    best, best_res = np.zeros(num_cols), float(b @ b)
    for size in range(1, num_cols + 1):
        for cols in itertools.combinations(range(num_cols), size):
            sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if np.any(sol < 0):
                continue
            res = b - a[:, cols] @ sol
            if float(res @ res) < best_res - 1e-15:
                best_res = float(res @ res)
                best = np.zeros(num_cols)
                best[list(cols)] = sol
    return best
