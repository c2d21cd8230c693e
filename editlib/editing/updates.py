"""Update rules. Every rule returns update directions B (d_k, N) such that Delta = R B^T, where
R (d, N) is the residual to write (target minus current output) and K (d_k, N) holds the keys.

    MEMIT      B = (mu C + K K^T)^-1 K                            (docs/methods.md §5.3)
    EMMET      B = C~^-1 K (K^T C~^-1 K + lambda I)^-1, C~ = mu C + nu I   (§5.4)
    AlphaEdit  B = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K          (§5.5)
    ROME       B = u / (k_d^T u), u = C^-1 k_bar                  (§5.1/5.2)

with mu = mom2_update_weight, nu = update_norm_lambda, lambda = emmet_lambda (the config's names).

All solves run in fp64 with Cholesky factorisations of C cached per layer (no explicit inverse).
MEMIT uses the push-through identity (mu C + K K^T)^-1 K = X (I + K^T X)^-1 with X = (mu C)^-1 K,
so only an N x N system is factorised per batch. `independent=True` gives each column the
direction it would get if it were edited alone (single-edit experiments), in one batched solve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from editlib.editing.statistics import StatisticsError, check_finite

log = logging.getLogger(__name__)


class UpdateError(RuntimeError):
    """An update could not be computed safely (non-finite values, singular system)."""


@dataclass
class Covariance:
    """C = E[k k^T] of one layer in fp64, with its Cholesky factor and eigendecomposition cached."""

    matrix: torch.Tensor  # (d_k, d_k) fp64
    _cholesky: torch.Tensor | None = field(default=None, repr=False)
    _eigh: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mean(cls, mean: torch.Tensor, device=None) -> "Covariance":
        matrix = mean.to(device=device, dtype=torch.float64)
        check_finite(matrix, "second-moment matrix C")
        matrix = (matrix + matrix.T) / 2
        return cls(matrix)

    @property
    def cholesky(self) -> torch.Tensor:
        if self._cholesky is None:
            factor, info = torch.linalg.cholesky_ex(self.matrix)
            if int(info) != 0:
                smallest = float(torch.linalg.eigvalsh(self.matrix)[0])
                raise StatisticsError(
                    f"C is not positive definite (smallest eigenvalue {smallest:.3e}); "
                    "collect statistics over more tokens, or set update_norm_lambda > 0"
                )
            self._cholesky = factor
            diag = factor.diagonal()
            log.info("C condition estimate %.3e", float((diag.max() / diag.min()) ** 2))
        return self._cholesky

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C^-1 rhs via the cached Cholesky factor."""
        return torch.cholesky_solve(rhs.to(self.matrix), self.cholesky)

    @property
    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.matrix)
        return self._eigh


def _check(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise UpdateError(f"{what} has non-finite entries (NaN/Inf)")
    return tensor


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """Solve a symmetric positive (semi)definite system; Cholesky, else least squares (pinv)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    log.warning("%s is not positive definite; using a least-squares (pseudo-inverse) solve", what)
    return torch.linalg.lstsq(matrix, rhs).solution


def condition_number(matrix: torch.Tensor) -> float:
    """2-norm condition number of a small symmetric matrix (for diagnostics)."""
    eig = torch.linalg.eigvalsh(matrix).abs()
    return float(eig.max() / eig.min().clamp_min(1e-300))


def memit_directions(keys: torch.Tensor, cov: Covariance, mom2_update_weight: float, independent: bool = False) -> torch.Tensor:
    """B = (mu C + K K^T)^-1 K; K: (d_k, N) -> (d_k, N) fp64."""
    keys = _check(keys.to(cov.matrix), "keys")
    scaled = cov.solve(keys) / mom2_update_weight  # X = (mu C)^-1 K
    if independent:  # Sherman-Morrison per column
        return scaled / (1 + (keys * scaled).sum(0))
    gram = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ scaled  # I + K^T X
    return _check(_solve_spd(gram, scaled.T, "I + K^T (mu C)^-1 K").T, "MEMIT directions")


def emmet_directions(
    keys: torch.Tensor,
    cov: Covariance,
    mom2_update_weight: float,
    emmet_lambda: float,
    update_norm_lambda: float = 0.0,
    independent: bool = False,
) -> torch.Tensor:
    """B = C~^-1 K D^-1, D = K^T C~^-1 K (+ lambda I when N > 1, as UME); C~ = mu C + nu I."""
    keys = _check(keys.to(cov.matrix), "keys")
    if update_norm_lambda:
        ridge = mom2_update_weight * cov.matrix + update_norm_lambda * torch.eye(len(keys), dtype=keys.dtype, device=keys.device)
        scaled = torch.cholesky_solve(keys, torch.linalg.cholesky(ridge))
    else:
        scaled = cov.solve(keys) / mom2_update_weight  # X = C~^-1 K
    if independent:
        return scaled / (keys * scaled).sum(0)
    gram = keys.T @ scaled  # D: (N, N)
    if keys.shape[1] > 1:
        gram = gram + emmet_lambda * torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
    log.info("EMMET D condition number %.3e", condition_number(gram))
    return _check(_solve_spd(gram, scaled.T, "EMMET D = K^T C^-1 K + lambda I").T, "EMMET directions")


def nullspace_projector(cov: Covariance, threshold: float) -> torch.Tensor:
    """P = U0 U0^T over the eigenvectors of C with eigenvalue < threshold (fp64, (d_k, d_k))."""
    values, vectors = cov.eigh
    null = vectors[:, values < threshold]
    if null.shape[1] == 0:
        raise UpdateError(f"AlphaEdit: no eigenvalue of C is below nullspace_threshold={threshold}; P would be 0")
    return null @ null.T


def alphaedit_directions(
    keys: torch.Tensor,
    projector: torch.Tensor,
    previous_key_product: torch.Tensor | None,
    l2: float,
    independent: bool = False,
) -> torch.Tensor:
    """B = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K; previous_key_product = K_p K_p^T (or None)."""
    keys = _check(keys.to(projector), "keys")
    eye = torch.eye(len(projector), dtype=projector.dtype, device=projector.device)
    base = l2 * eye
    if previous_key_product is not None:
        base = base + projector @ previous_key_product.to(projector)
    projected = projector @ keys  # P K
    if independent:  # Sherman-Morrison: (A0 + P k k^T)^-1 P k = A0^-1 P k / (1 + k^T A0^-1 P k)
        solved = torch.linalg.solve(base, projected)
        return solved / (1 + (keys * solved).sum(0))
    system = base + projected @ keys.T
    return _check(torch.linalg.solve(system, projected), "AlphaEdit directions")


def rome_directions(
    mean_keys: torch.Tensor,
    denominator_keys: torch.Tensor,
    cov: Covariance | None,
) -> torch.Tensor:
    """B = u / (k_d^T u) with u = C^-1 k_bar (or k_bar when cov is None, mom2_adjustment false).

    Original ROME uses the plain-prompt key k0 as k_d; r-ROME uses k_bar (pass it twice), which
    removes the tiny-denominator "disabling edits" of the original (kmeng01/rome PR #44).
    """
    dtype = torch.float64
    mean_keys = _check(mean_keys.to(dtype), "keys")
    u = cov.solve(mean_keys) if cov is not None else mean_keys
    denominator = (denominator_keys.to(u) * u).sum(0)
    if (denominator.abs() < 1e-12 * u.norm(dim=0) * denominator_keys.to(u).norm(dim=0)).any():
        raise UpdateError("ROME denominator k_d^T C^-1 k_bar is ~0; the update would explode (use r-ROME)")
    return u / denominator


def weight_update(residual: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Delta = R B^T, (d, d_k) fp64."""
    return _check(residual.to(directions) @ directions.T, "weight update")


def update_norm_squared(residual: torch.Tensor, directions: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """||R B^T||^2 without forming the (d, d_k) update, from N x N products: the Frobenius norm
    sum((R^T R) * (B^T B)), or with `weight` (d_k, d_k), e.g. C = E[k k^T], the weighted norm
    tr(R B^T weight B R^T) = sum((R^T R) * (B^T weight B)): the mean squared change of the layer's
    output over keys distributed as C."""
    residual, directions = residual.detach().double(), directions.detach().double()
    right = directions if weight is None else weight.to(directions) @ directions
    return float(((residual.T @ residual) * (directions.T @ right)).sum())
