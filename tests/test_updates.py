"""Update rules against independent closed forms (pure linear algebra, fp64)."""

import pytest
import torch

from editlib.editing.statistics import StatisticsError
from editlib.editing.updates import (
    Covariance,
    alphaedit_directions,
    emmet_directions,
    memit_directions,
    nullspace_projector,
    rome_directions,
    weight_update,
)

D, DK, N = 12, 20, 5


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(200, DK, generator=gen, dtype=torch.float64) @ torch.diag(torch.linspace(0.05, 2, DK, dtype=torch.float64))
    cov = Covariance.from_mean(samples.T @ samples / 200)
    keys = torch.randn(DK, N, generator=gen, dtype=torch.float64)
    residual = torch.randn(D, N, generator=gen, dtype=torch.float64)
    return cov, keys, residual


def test_memit_equals_ridge_least_squares(problem):
    cov, keys, residual = problem
    mu = 3.0
    delta = weight_update(residual, memit_directions(keys, cov, mu))
    # Independently: argmin_D ||D K - R||^2 + mu tr(D C D^T), as a stacked least-squares problem.
    chol = torch.linalg.cholesky(cov.matrix)
    lhs = torch.cat([keys.T, mu**0.5 * chol.T])  # (N + d_k, d_k)
    rhs = torch.cat([residual.T, torch.zeros(DK, D, dtype=torch.float64)])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(delta, expected, rtol=1e-9, atol=1e-10)


def test_emmet_satisfies_constraints(problem):
    cov, keys, residual = problem
    exact = weight_update(residual, emmet_directions(keys, cov, 1.0, emmet_lambda=0.0))
    torch.testing.assert_close(exact @ keys, residual, rtol=1e-9, atol=1e-9)
    ridged = weight_update(residual, emmet_directions(keys, cov, 1.0, emmet_lambda=0.1))
    error = (ridged @ keys - residual).norm() / residual.norm()
    assert 0 < error < 0.5  # the ridge trades exactness for stability
    tiny = weight_update(residual, emmet_directions(keys, cov, 1.0, emmet_lambda=1e-8))
    assert (tiny @ keys - residual).norm() / residual.norm() < 1e-6


def test_emmet_is_minimum_preservation_change(problem):
    cov, keys, residual = problem
    delta = weight_update(residual, emmet_directions(keys, cov, 1.0, emmet_lambda=0.0))
    # Any other solution of D K = R has a larger tr(D C D^T): perturb within the constraint set.
    null = torch.linalg.svd(keys.T).Vh[N:].T  # (d_k, d_k - N), K^T null = 0
    other = delta + torch.randn(D, DK - N, dtype=torch.float64) @ null.T
    torch.testing.assert_close(other @ keys, residual)
    cost = lambda m: torch.trace(m @ cov.matrix @ m.T)
    assert cost(delta) < cost(other)


def test_alphaedit_leaves_retained_space_untouched(problem):
    cov, keys, residual = problem
    values, vectors = cov.eigh
    threshold = float(values[DK // 2])
    projector = nullspace_projector(cov, threshold)
    retained = vectors[:, values >= threshold]  # directions C's preserved keys live in
    previous = keys[:, :2] @ keys[:, :2].T
    delta = weight_update(residual, alphaedit_directions(keys, projector, previous, l2=1.0))
    assert delta.norm() > 1e-3
    # Delta = Y^T P exactly, so Delta k = 0 for every k in the span of the retained eigenvectors.
    assert (delta @ retained).norm() / delta.norm() < 1e-10
    torch.testing.assert_close(delta @ projector, delta)


def test_independent_directions_equal_single_fact_solves(problem):
    cov, keys, _ = problem
    projector = nullspace_projector(cov, float(cov.eigh[0][DK // 2]))
    previous = keys @ keys.T / 3
    for name, fn in {
        "memit": lambda k, ind: memit_directions(k, cov, 2.0, ind),
        "emmet": lambda k, ind: emmet_directions(k, cov, 2.0, 0.1, independent=ind),
        "alphaedit": lambda k, ind: alphaedit_directions(k, projector, previous, 1.0, ind),
    }.items():
        batched = fn(keys, True)
        for i in range(N):
            torch.testing.assert_close(batched[:, i : i + 1], fn(keys[:, i : i + 1], False), msg=name)


def test_rome_writes_value_at_denominator_key(problem):
    cov, keys, residual = problem
    k_bar, k_0 = keys[:, :1], keys[:, 1:2]
    for denominator in (k_0, k_bar):  # original ROME, r-ROME
        delta = weight_update(residual[:, :1], rome_directions(k_bar, denominator, cov))
        torch.testing.assert_close(delta @ denominator, residual[:, :1])
        # the update direction is C^-1 k_bar
        direction = torch.linalg.solve(cov.matrix, k_bar)
        cosine = torch.nn.functional.cosine_similarity(delta[0], direction[:, 0], dim=0)
        assert abs(abs(float(cosine)) - 1) < 1e-9


def test_bad_statistics_raise():
    with pytest.raises(StatisticsError, match="non-finite"):
        Covariance.from_mean(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    not_psd = Covariance.from_mean(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(StatisticsError, match="not positive definite"):
        not_psd.solve(torch.ones(2, 1))
