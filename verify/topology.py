"""Mixing (gossip) matrices of D-SGD: the official topologies, validation, spectra, time-varying schedules.

D-SGD (AWC) is ``w_j(t+1) = sum_k P_jk w_k(t) - lr g_j(w_j(t))``: row j of P holds the weights worker j
gives to the models it *receives* from. Every built-in P is returned as an (m, m) float64 tensor that passed
:func:`validate` (nonnegative, rows and columns summing to 1). Built-ins (``utils.generate_P`` of the
official code, github.com/Raiden-Zhu/ICML-2023-DSGD-and-SAM, is the reference for ring, grid, exponential
and star):

- ``ring``: ``P = (I + S + S^T) / 3`` with S the cyclic shift. For m = 2 both neighbours are the same node
  and the weights add: ``[[1/3, 2/3], [2/3, 1/3]]`` (the official code would assign 1/3 twice and lose a
  third of the row); for m = 1, ``P = [[1]]``.
- ``grid``: r x c grid without wrap-around, r the largest divisor of m with r <= sqrt(m) (prime m: a path);
  Metropolis-Hastings weights ``P_ij = 1 / max(n_i, n_j)`` on edges, n counting neighbours including self,
  ``P_ii = 1 - sum_{j != i} P_ij``. Option ``shape=(r, c)``. Alias ``meshgrid``.
- ``torus``: the same grid with wrap-around and the same weights; a neighbour reached twice (a side of length
  2) counts once, so a 2 x 2 torus is a 4-cycle and a 1 x m torus is the ring.
- ``exponential``: directed circulant, weight ``1 / (1 + ceil(log2 m))`` on ``P[i, i]`` and on
  ``P[i, (i + 2^k) mod m]`` for every 2^k < m (as ``np.roll(x, i)`` in the official code). Not symmetric.
- ``complete``: ``J = 11^T / m`` (alias ``all``). ``star``: Metropolis-Hastings on the star with hub 0, i.e.
  ``P_0i = P_i0 = 1/m``, ``P_00 = 1/m``, ``P_ii = 1 - 1/m`` (identical to the official code's ``star``).
- ``disconnected``: ``P = I`` (no communication; spectral gap 0), a control (alias ``single``).
- a path to a ``.npy`` or ``.csv`` file: a user matrix, see :func:`load_matrix`.

Spectral gap ``1 - ||P - J||_2`` and ``S_P = (1/m) Tr sum_t (P-J)^t (I-J) ((P-J)^t)^T`` (paper section 3),
both computed, never tabulated. Time-varying P(t) live in :class:`TopologySchedule`. Constructions:
:mod:`verify.graphs`; gossip products: :mod:`verify.mixers`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from verify import graphs
from verify.mixers import METHODS, Mixer, mix, mixer

__all__ = [
    "BUILTINS",
    "METHODS",
    "Neighbours",
    "TopologyError",
    "TopologySchedule",
    "is_symmetric",
    "load_matrix",
    "mix",
    "mixer",
    "mixing_matrix",
    "s_p",
    "schedule",
    "spectral_gap",
    "validate",
]


class TopologyError(ValueError):
    """A malformed mixing matrix or an unknown topology; the message is one line naming the problem."""


BUILTINS = ("ring", "grid", "torus", "exponential", "complete", "star", "disconnected")
ALIASES = {"meshgrid": "grid", "all": "complete", "single": "disconnected", "exp": "exponential"}


def validate(P: Any, atol: float = 1e-9) -> Tensor:
    """Return P as a float64 CPU tensor after checking it is a doubly stochastic m x m matrix.

    Refused (one-line :class:`TopologyError`): not 2-D square, NaN/inf, an entry < -atol, a row sum or a
    column sum off 1 by more than atol. Column sums matter: ``mean_j (P W)_j = mean_j W_j`` (the exact
    averaging identity of D-SGD) holds for every W iff ``1^T P = 1^T``. Cost O(m^2).
    """
    try:
        T = torch.as_tensor(np.asarray(P.detach().cpu() if isinstance(P, Tensor) else P, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TopologyError(f"the mixing matrix is not a numeric array ({exc})") from None
    if T.dim() != 2 or T.shape[0] != T.shape[1] or T.shape[0] == 0:
        raise TopologyError(f"the mixing matrix must be square m x m with m >= 1; got shape {tuple(T.shape)}")
    if not bool(torch.isfinite(T).all()):
        i, j = (int(v) for v in torch.nonzero(~torch.isfinite(T))[0])
        raise TopologyError(f"the mixing matrix has a NaN or infinite entry at ({i}, {j})")
    if float(T.min()) < -atol:
        i, j = (int(v) for v in torch.nonzero(T == T.min())[0])
        raise TopologyError(f"the mixing matrix has a negative entry P[{i}, {j}] = {float(T[i, j]):.6g}")
    rows, cols = T.sum(1), T.sum(0)
    k = int(torch.argmax(torch.abs(rows - 1)))
    if abs(float(rows[k]) - 1) > atol:
        raise TopologyError(f"rows of the mixing matrix must sum to 1; row {k} sums to {float(rows[k]):.12g}")
    k = int(torch.argmax(torch.abs(cols - 1)))
    if abs(float(cols[k]) - 1) > atol:
        raise TopologyError(
            "the exact averaging identity of D-SGD needs column sums of 1; "
            f"column {k} sums to {float(cols[k]):.12g}"
        )
    return T.contiguous()


def _grid_shape(m: int, shape: Any) -> tuple[int, int]:
    """r x c, r the largest divisor of m with r <= sqrt(m), unless ``shape`` is given (and has m nodes)."""
    if shape is None:
        r = math.isqrt(m)
        while m % r:
            r -= 1
        return r, m // r
    try:
        r, c = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise TopologyError(f"grid shape must be a pair (rows, columns); got {shape!r}") from None
    if r < 1 or c < 1 or r * c != m:
        raise TopologyError(f"grid shape {tuple(shape)} does not have {m} nodes")
    return r, c


def load_matrix(path: str | os.PathLike[str]) -> Tensor:
    """Read a matrix from ``.npy`` (no pickles) or comma-separated ``.csv``/``.txt``; :func:`validate` it."""
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    if ext not in (".npy", ".csv", ".txt"):
        raise TopologyError(f"a mixing matrix file must end in .npy, .csv or .txt; got {p!r}")
    if not os.path.isfile(p):
        raise TopologyError(f"no such mixing matrix file: {p}")
    try:
        with warnings.catch_warnings():  # an empty file: numpy warns, then validate() says what is wrong
            warnings.simplefilter("ignore", UserWarning)
            arr = np.load(p, allow_pickle=False) if ext == ".npy" else np.loadtxt(p, delimiter=",", ndmin=2)
    except (ValueError, OSError) as exc:
        raise TopologyError(f"cannot read a matrix from {p}: {str(exc).splitlines()[0]}") from None
    if arr.size == 0:
        raise TopologyError(f"{p} holds no numbers: expected an m x m mixing matrix")
    return validate(arr)


def mixing_matrix(name: str, m: int | None = None, **options: Any) -> Tensor:
    """The (m, m) float64 mixing matrix of a built-in topology (module docstring) or of a matrix file.

    ``options``: ``shape=(r, c)`` for grid/torus; none otherwise. For a file, m may be None or must match.
    Cost: O(m^2) to build and validate.
    """
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if key not in BUILTINS:
        if isinstance(name, (str, os.PathLike)) and (
            os.path.splitext(os.fspath(name))[1] or os.path.exists(name)
        ):
            P = load_matrix(name)
            if m is not None and P.shape[0] != m:
                raise TopologyError(
                    f"{name} holds a {P.shape[0]} x {P.shape[0]} matrix, but {m} workers were asked"
                )
            return P
        raise TopologyError(
            f"unknown topology {name!r}; choose from {', '.join(BUILTINS)} or a .npy/.csv path"
        )
    if m is None or int(m) != m or m < 1:
        raise TopologyError(f"the number of workers must be a positive integer; got {m!r}")
    m = int(m)
    allowed = {"grid": {"shape"}, "torus": {"shape"}}.get(key, set())
    if set(options) - allowed:
        raise TopologyError(
            f"topology {key!r} takes no option(s) {', '.join(sorted(set(options) - allowed))}"
        )
    if key in ("grid", "torus"):
        P = graphs.lattice(*_grid_shape(m, options.get("shape")), wrap=key == "torus")
    else:
        P = getattr(graphs, key)(m)
    return validate(P)


def is_symmetric(P: Tensor, atol: float = 0.0) -> bool:
    """Whether ``max |P - P^T| <= atol``."""
    return bool(torch.all(torch.abs(P - P.T) <= atol))


def spectral_gap(P: Any) -> float:
    """``1 - ||P - J||_2`` (largest singular value, J = 11^T/m).

    Equals ``1 - max(|lambda_2|, |lambda_m|)`` for symmetric P. Cost: one m x m SVD.
    """
    T = validate(P)
    m = T.shape[0]
    return 1.0 - float(torch.linalg.matrix_norm(T - 1.0 / m, ord=2))


def s_p(P: Any) -> float:
    """``S_P = (1/m) Tr X`` with ``X = A X A^T + (I - J)``, ``A = P - J`` (discrete Lyapunov equation).

    Equals ``(1/m) Tr sum_{t>=0} A^t (I - J) (A^t)^T``; for symmetric P, ``(1/m) sum_{k>=2} 1/(1 -
    lambda_k^2)``. Infinite (refused with :class:`TopologyError`) when A has spectral radius >= 1
    (disconnected or periodic P).
    Cost: one m x m eigendecomposition and one Lyapunov solve, O(m^3).
    """
    T = validate(P).numpy()
    m = T.shape[0]
    A = T - 1.0 / m
    rho = float(np.max(np.abs(np.linalg.eigvals(A))))
    if rho >= 1.0 - 1e-12:
        raise TopologyError(f"S_P is infinite: P - J has spectral radius {rho:.6g} >= 1 (P does not mix)")
    X = scipy.linalg.solve_discrete_lyapunov(A, np.eye(m) - 1.0 / m)
    return float(np.trace(X)) / m


class Neighbours(NamedTuple):
    """Who node j talks to at one step: ``incoming`` (k != j with P_jk > 0, weights ``in_weights``) and
    ``outgoing`` (k != j with P_kj > 0), plus its ``self_weight`` P_jj."""

    incoming: list[int]
    in_weights: list[float]
    outgoing: list[int]
    self_weight: float


#: Ways P(t) changes with t (``--shuffle``); None: fixed.
SHUFFLES = (None, "fixed", "random", "two-sided", "matching")
#: Schedules that are not one matrix (:func:`schedule`).
SCHEDULES = ("random_matching",)
_TAGS = {"random": 1, "two-sided": 2, "matching": 3}


class TopologySchedule:
    """P(t) for every step t, recomputable by any process from ``(base P, shuffle, seed, t)`` alone.

    - ``shuffle=None``/``"fixed"``: P(t) = P.
    - ``"random"``: P(t) = Pi_t^T P Pi_t, i.e. ``P(t)[a, b] = P[pi_t(a), pi_t(b)]`` for a permutation pi_t
      drawn from ``numpy.random.default_rng([seed, 1, t])``: nodes relabelled, same spectrum (paper 4.1).
    - ``"two-sided"``: P(t) = Pi_a^T P Pi_b with two independent permutations, which is what the official
      ``main.py`` computes (it calls ``PermutationMatrix`` twice); still doubly stochastic, but not a
      similarity, so the spectrum changes.
    - ``"matching"``: a random maximal matching of the base graph's edges (greedy over a random edge order);
      each matched pair averages with weights 1/2, unmatched nodes keep their model. The built-in name
      ``"random_matching"`` uses the complete graph, i.e. a uniform perfect matching for even m.

    Cost of ``at(t)``: O(m^2) (O(m^2 log m) for matchings).
    """

    def __init__(self, base: Tensor, shuffle: str | None = None, seed: int = 0) -> None:
        if shuffle not in SHUFFLES:
            raise TopologyError(
                f"unknown shuffle {shuffle!r}; choose from fixed, random, two-sided, matching"
            )
        if int(seed) != seed or seed < 0:
            raise TopologyError(f"the topology seed must be a nonnegative integer; got {seed!r}")
        self.base = validate(base)
        self.m = self.base.shape[0]
        self.shuffle = None if shuffle == "fixed" else shuffle
        self.seed = int(seed)
        self._static_mixers: dict[str, Mixer] = {}
        if self.shuffle == "matching":
            support = (self.base + self.base.T) > 0
            self.edges = [(i, j) for i in range(self.m) for j in range(i + 1, self.m) if support[i, j]]

    @property
    def static(self) -> bool:
        """True when P(t) does not depend on t."""
        return self.shuffle is None

    def _rng(self, t: int) -> np.random.Generator:
        if int(t) != t or t < 0:
            raise TopologyError(f"the step must be a nonnegative integer; got {t!r}")
        return np.random.default_rng([self.seed, _TAGS[self.shuffle], int(t)])

    def permutations(self, t: int) -> tuple[Tensor, Tensor] | None:
        """``(row_perm, col_perm)`` with ``P(t) = P[row_perm][:, col_perm]`` for the shuffles, else None."""
        if self.shuffle not in ("random", "two-sided"):
            return None
        rng = self._rng(t)
        rows = torch.from_numpy(rng.permutation(self.m))
        cols = rows if self.shuffle == "random" else torch.from_numpy(rng.permutation(self.m))
        return rows, cols

    def at(self, t: int) -> Tensor:
        """The (m, m) float64 mixing matrix used at step t."""
        if self.shuffle is None:
            return self.base
        if self.shuffle == "matching":
            rng = self._rng(t)
            P = torch.eye(self.m, dtype=torch.float64)
            free = [True] * self.m
            for e in rng.permutation(len(self.edges)) if self.edges else []:
                i, j = self.edges[int(e)]
                if free[i] and free[j]:
                    free[i] = free[j] = False
                    P[i, i] = P[j, j] = P[i, j] = P[j, i] = 0.5
            return P
        rows, cols = self.permutations(t)  # type: ignore[misc]
        return self.base[rows][:, cols].contiguous()

    def neighbours(self, t: int, j: int) -> Neighbours:
        """Node j's in-neighbours (nonzeros of row j), out-neighbours (nonzeros of column j), j excluded."""
        if not 0 <= j < self.m:
            raise TopologyError(f"node {j} is outside 0..{self.m - 1}")
        P = self.at(t)
        inc = [k for k in torch.nonzero(P[j]).flatten().tolist() if k != j]
        out = [k for k in torch.nonzero(P[:, j]).flatten().tolist() if k != j]
        return Neighbours(inc, [float(P[j, k]) for k in inc], out, float(P[j, j]))

    def mixer(self, t: int, method: str = "auto") -> Mixer:
        """A callable ``W -> P(t) W``. For ``"random"`` the base mixer is wrapped by gathers, so ring and
        exponential keep the fast ``roll`` path: ``P(t) W = (P (W[pi_t^-1]))[pi_t]``."""
        if self.shuffle is None:  # built once per method
            if method not in self._static_mixers:
                self._static_mixers[method] = mixer(self.base, method)
            return self._static_mixers[method]
        perms = self.permutations(t) if self.shuffle == "random" else None
        if perms is None:
            return mixer(self.at(t), method)
        rows = perms[0]
        inverse = torch.argsort(rows)
        base = mixer(self.base, method)
        return lambda W: base(W[inverse.to(W.device)])[rows.to(W.device)]


def schedule(
    name_or_matrix: Any, m: int | None = None, shuffle: str | None = None, seed: int = 0
) -> TopologySchedule:
    """A :class:`TopologySchedule` from a topology name, a matrix file, a matrix, or ``"random_matching"``."""
    if isinstance(name_or_matrix, str) and name_or_matrix.lower() in (*SCHEDULES, "matching"):
        if shuffle not in (None, "fixed", "matching"):
            raise TopologyError("random_matching already changes every step; it takes no shuffle")
        return TopologySchedule(mixing_matrix("complete", m), "matching", seed)
    if isinstance(name_or_matrix, (str, os.PathLike)):
        base = mixing_matrix(os.fspath(name_or_matrix), m)
    else:
        base = validate(name_or_matrix)
        if m is not None and base.shape[0] != m:
            raise TopologyError(
                f"the mixing matrix is {base.shape[0]} x {base.shape[0]}, but {m} workers were asked"
            )
    return TopologySchedule(base, shuffle, seed)
