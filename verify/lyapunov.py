"""Exact stationary consensus distance of D-SGD and stationary excess loss of C-SGD on a quadratic
(paper.md s.3).

Model: ``L(w) = 1/2 w^T H w`` with additive gradient noise ``N(0, Sigma / b)`` per worker and step,
independent across workers and steps; m workers mixing with a doubly stochastic ``P`` (``J = 11^T / m``).

**D-SGD (AWC).** The deviations ``D = W - 1 w_a^T`` evolve as
``D(t+1) = (P - J) D - eta D H - eta (I - J) N(t)`` (this uses ``JP = PJ = J``). In the eigenbasis
``H = V diag(h) V^T`` the columns decouple: with ``sigma_i^2 = v_i^T Sigma v_i``, the stationary covariance
``Q_i = E D_i D_i^T`` (m x m) solves the discrete Lyapunov equation

    Q_i = A_i Q_i A_i^T + eta^2 (sigma_i^2 / b) (I - J),   A_i = (P - J) - eta h_i (I - J),

and ``E Tr Xi = (1/m) sum_i Tr Q_i``, ``E Tr(H Xi) = (1/m) sum_i h_i Tr Q_i``. For ``eta h_i << 1 - lambda``
this is ``E Tr Xi ~ (eta^2 / b) Tr(Sigma) S_P`` with ``S_P`` of :func:`verify.topology.s_p`. With ATC
(``W <- P (W - eta G)``) instead ``A_i = (1 - eta h_i)(P - J)`` and the noise term is
``eta^2 (sigma_i^2/b) (P - J)(P - J)^T``. The full matrix ``E Xi`` (cross-directions ``Q_ik = A_i Q_ik A_k^T +
eta^2 (Sigma'_ik / b)(I - J)``) is :func:`stationary_xi`, for small d.

**C-SGD** (one model, the mean of m local gradients, total batch ``B = m b``): per direction
``v_i = (1 - eta h_i)^2 v_i + eta^2 sigma_i^2 / B``, so the exact stationary excess loss is
``E[L(w) - L*] = 1/2 sum_i h_i v_i = sum_i eta sigma_i^2 / (2 B (2 - eta h_i))``, which tends to the
continuous form ``(eta / (4 B)) Tr Sigma`` as ``eta h -> 0``.

Nothing here is simulated: every number is a linear solve. Sources: paper.md s.3 ("Exact stationary consensus
distance [D]", P6, P7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from .topology import validate

FORMS = ("awc", "atc")

ArrayLike = Sequence[float] | np.ndarray | float


class LyapunovError(ValueError):
    """A setting without a stationary state or a malformed input; the message is one line naming it."""


@dataclass(frozen=True)
class ConsensusPrediction:
    """Stationary D-SGD prediction: ``trace_xi = E Tr Xi``, ``trace_h_xi = E Tr(H Xi)``, per direction
    ``per_direction = (1/m) Tr Q_i``; ``small_eta = (eta^2/b) sum_i sigma_i^2 S_P`` (the eta h -> 0 limit)."""

    trace_xi: float
    trace_h_xi: float
    per_direction: np.ndarray
    small_eta: float
    s_p: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_xi": self.trace_xi,
            "trace_h_xi": self.trace_h_xi,
            "per_direction": self.per_direction.tolist(),
            "small_eta": self.small_eta,
            "s_p": self.s_p,
        }


def _matrix(P: Any) -> np.ndarray:
    try:
        return validate(P).numpy()
    except ValueError as exc:
        raise LyapunovError(str(exc)) from None


def _spectrum(h: ArrayLike, noise_var: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``h`` (d,) and ``noise_var`` (scalar or (d,)) as float64 arrays of equal length, noise >= 0."""
    h_arr = np.atleast_1d(np.asarray(h, dtype=np.float64)).reshape(-1)
    s_arr = np.atleast_1d(np.asarray(noise_var, dtype=np.float64)).reshape(-1)
    if h_arr.size == 0:
        raise LyapunovError("the curvature spectrum h is empty")
    if s_arr.size == 1:
        s_arr = np.full_like(h_arr, float(s_arr[0]))
    if s_arr.size != h_arr.size:
        raise LyapunovError(f"noise_var has {s_arr.size} entries but h has {h_arr.size}")
    if not (np.all(np.isfinite(h_arr)) and np.all(np.isfinite(s_arr))) or np.any(s_arr < 0):
        raise LyapunovError("h and noise_var must be finite, noise_var >= 0")
    return h_arr, s_arr


def _check_eta_b(eta: float, b: float) -> None:
    if not (np.isfinite(eta) and eta > 0):
        raise LyapunovError(f"the learning rate must be a finite number > 0; got {eta}")
    if not (np.isfinite(b) and b > 0):
        raise LyapunovError(f"the local batch must be > 0; got {b}")


def transition(P: Any, eta: float, h: float, form: str = "awc") -> np.ndarray:
    """``A = (P - J) - eta h (I - J)`` (AWC) or ``(1 - eta h)(P - J)`` (ATC), the deviation map of one
    eigen-direction of H. Cost: O(m^2)."""
    if form not in FORMS:
        raise LyapunovError(f"form must be one of {', '.join(FORMS)}; got {form!r}")
    T = _matrix(P)
    m = T.shape[0]
    Jm = np.full((m, m), 1.0 / m)
    if form == "awc":
        return (T - Jm) - eta * h * (np.eye(m) - Jm)
    return (1.0 - eta * h) * (T - Jm)


def _noise_shape(T: np.ndarray, form: str) -> np.ndarray:
    m = T.shape[0]
    Jm = np.full((m, m), 1.0 / m)
    if form == "awc":
        return np.eye(m) - Jm
    return (T - Jm) @ (T - Jm).T


def direction_covariance(
    P: Any, eta: float, h: float, noise_var: float, b: float = 1.0, form: str = "awc"
) -> np.ndarray:
    """The stationary ``Q = E D_i D_i^T`` (m x m) of one eigen-direction:
    ``Q = A Q A^T + eta^2 (sigma^2/b) N`` with ``N = I - J`` (AWC) or ``(P - J)(P - J)^T`` (ATC), by
    ``scipy.linalg.solve_discrete_lyapunov``. Refused when the spectral radius of A is >= 1 (no stationary
    state). Cost: one m x m Lyapunov solve, O(m^3)."""
    _check_eta_b(eta, b)
    A = transition(P, eta, h, form)
    rho = float(np.max(np.abs(np.linalg.eigvals(A))))
    if rho >= 1.0 - 1e-12:
        raise LyapunovError(
            f"no stationary state: the deviation map has spectral radius {rho:.6g} >= 1 "
            f"(eta h = {eta * h:.4g})"
        )
    C = eta**2 * (noise_var / b) * _noise_shape(_matrix(P), form)
    Q = scipy.linalg.solve_discrete_lyapunov(A, C)
    return 0.5 * (Q + Q.T)


def stationary_consensus(
    P: Any,
    eta: float,
    h: ArrayLike,
    noise_var: ArrayLike = 1.0,
    b: float = 1.0,
    form: str = "awc",
) -> ConsensusPrediction:
    """Exact stationary ``E Tr Xi = (1/m) sum_i Tr Q_i`` and ``E Tr(H Xi) = (1/m) sum_i h_i Tr Q_i`` of
    D-SGD on ``1/2 w^T H w`` (H's eigenvalues ``h``; ``noise_var`` the per-sample noise variances
    ``sigma_i^2`` along H's eigenvectors, a scalar for isotropic noise) with local batch ``b``. Equal
    ``h_i`` are solved once. Cost: one m x m Lyapunov solve per distinct ``h_i``."""
    h_arr, s_arr = _spectrum(h, noise_var)
    _check_eta_b(eta, b)
    T = _matrix(P)
    m = T.shape[0]
    unit: dict[float, float] = {}
    per = np.empty_like(h_arr)
    for i, (hi, si) in enumerate(zip(h_arr, s_arr, strict=True)):
        key = float(hi)
        if key not in unit:  # Tr Q is linear in sigma^2: solve once per distinct h with sigma^2 = 1
            unit[key] = float(np.trace(direction_covariance(T, eta, key, 1.0, b, form))) / m
        per[i] = unit[key] * si
    sp = _s_p_form(T, form)
    return ConsensusPrediction(
        trace_xi=float(per.sum()),
        trace_h_xi=float((h_arr * per).sum()),
        per_direction=per,
        small_eta=float(eta**2 / b * s_arr.sum() * sp),
        s_p=sp,
    )


def _s_p_form(T: np.ndarray, form: str) -> float:
    """``S_P`` (AWC: ``(1/m) Tr sum_t A^t (I-J) A^tT``; ATC: the same with noise ``(P-J)(P-J)^T``); inf if P
    does not mix."""
    m = T.shape[0]
    A = T - 1.0 / m
    if float(np.max(np.abs(np.linalg.eigvals(A)))) >= 1.0 - 1e-12:
        return float("inf")
    return float(np.trace(scipy.linalg.solve_discrete_lyapunov(A, _noise_shape(T, form)))) / m


def stationary_xi(
    P: Any, eta: float, H: np.ndarray, Sigma: np.ndarray, b: float = 1.0, form: str = "awc"
) -> np.ndarray:
    """The full stationary ``E Xi`` (d x d) of D-SGD on ``1/2 w^T H w`` with per-sample noise covariance
    ``Sigma`` (both symmetric d x d). In H's eigenbasis ``Sigma' = V^T Sigma V`` and the cross-covariances
    ``Q_ik = A_i Q_ik A_k^T + eta^2 (Sigma'_ik / b) N`` give ``E Xi' _ik = (1/m) Tr Q_ik``; returns
    ``V E Xi' V^T``. Solved as ``(I - A_k kron A_i) vec Q = vec C``. Cost: d(d+1)/2 dense m^2 x m^2
    solves: small d only (refused above d = 64)."""
    H = np.asarray(H, dtype=np.float64)
    S = np.asarray(Sigma, dtype=np.float64)
    d = H.shape[0]
    if H.shape != (d, d) or S.shape != (d, d):
        raise LyapunovError(f"H and Sigma must both be d x d; got {H.shape} and {S.shape}")
    if d > 64:
        raise LyapunovError(
            f"stationary_xi forms d x d cross terms; d = {d} exceeds 64 (use stationary_consensus)"
        )
    _check_eta_b(eta, b)
    T = _matrix(P)
    m = T.shape[0]
    h, V = np.linalg.eigh(0.5 * (H + H.T))
    Sp = V.T @ (0.5 * (S + S.T)) @ V
    A = [transition(T, eta, float(hi), form) for hi in h]
    for i, Ai in enumerate(A):
        rho = float(np.max(np.abs(np.linalg.eigvals(Ai))))
        if rho >= 1.0 - 1e-12:
            raise LyapunovError(f"no stationary state: direction {i} has spectral radius {rho:.6g} >= 1")
    N = _noise_shape(T, form)
    eye = np.eye(m * m)
    X = np.zeros((d, d))
    for i in range(d):
        for k in range(i, d):
            C = eta**2 * (Sp[i, k] / b) * N
            # vec(A_i Q A_k^T) = (A_k kron A_i) vec(Q) with column-major vec
            q = np.linalg.solve(eye - np.kron(A[k], A[i]), C.reshape(-1, order="F"))
            X[i, k] = X[k, i] = np.trace(q.reshape(m, m, order="F")) / m
    return V @ X @ V.T


def csgd_excess_loss(
    eta: float, h: ArrayLike, noise_var: ArrayLike, total_batch: float, exact: bool = True
) -> float:
    """C-SGD's stationary ``E[L(w) - L*]`` on ``1/2 w^T H w`` with per-sample noise variances ``sigma_i^2``
    along H's eigenvectors and total batch B: exact discrete ``sum_i eta sigma_i^2 / (2 B (2 - eta h_i))``
    (``exact=True``; needs ``0 < eta h_i < 2``) or the continuous ``(eta / (4 B)) sum_i sigma_i^2``.
    Cost: O(d)."""
    h_arr, s_arr = _spectrum(h, noise_var)
    _check_eta_b(eta, total_batch)
    if not exact:
        return float(eta / (4.0 * total_batch) * s_arr.sum())
    if np.any(h_arr <= 0) or np.any(eta * h_arr >= 2):
        raise LyapunovError("C-SGD has no stationary state unless 0 < eta h_i < 2 for every direction")
    return float((eta * s_arr / (2.0 * total_batch * (2.0 - eta * h_arr))).sum())


def csgd_variance(eta: float, h: ArrayLike, noise_var: ArrayLike, total_batch: float) -> np.ndarray:
    """Per-direction stationary variance ``v_i = eta sigma_i^2 / (B h_i (2 - eta h_i))`` of C-SGD's iterate
    (its exact stationary law is ``N(0, V diag(v) V^T)``; used to start simulations at stationarity).
    Cost: O(d)."""
    h_arr, s_arr = _spectrum(h, noise_var)
    _check_eta_b(eta, total_batch)
    if np.any(h_arr <= 0) or np.any(eta * h_arr >= 2):
        raise LyapunovError("C-SGD has no stationary state unless 0 < eta h_i < 2 for every direction")
    return eta * s_arr / (total_batch * h_arr * (2.0 - eta * h_arr))


def csgd_excess_loss_se(
    eta: float, h: ArrayLike, noise_var: ArrayLike, total_batch: float, steps: int, chains: int = 1
) -> float:
    """Standard error of the time average of C-SGD's excess loss over ``steps`` stationary steps, averaged
    over ``chains`` independent chains, under the exact model: each ``w_i`` is a Gaussian AR(1) with
    coefficient ``a_i = 1 - eta h_i`` and variance ``v_i`` (:func:`csgd_variance`), so ``Var(w_i^2) = 2
    v_i^2`` with autocorrelation ``a_i^(2k)`` and ``SE^2 = sum_i (h_i / 2)^2 2 v_i^2 (1 + a_i^2) / ((1 -
    a_i^2) T C)``. Cost: O(d)."""
    h_arr, _ = _spectrum(h, noise_var)
    v = csgd_variance(eta, h, noise_var, total_batch)
    a2 = (1.0 - eta * h_arr) ** 2
    var = np.sum((h_arr / 2) ** 2 * 2 * v**2 * (1 + a2) / (1 - a2)) / (int(steps) * int(chains))
    return float(np.sqrt(var))
