"""k-means: seeded reproducibility, k-means++ properties, optimality on small problems, bad input, CUDA."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorakit.errors import OperatorParameterError
from lorakit.ops.kmeans import kmeans


def blobs(seed: int, centers: int = 3, per: int = 5, dim: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, dim, generator=g, dtype=torch.float64) * 20
    X = mu.repeat_interleave(per, 0) + torch.randn(centers * per, dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(centers * per, generator=g)
    return X[perm], torch.arange(centers).repeat_interleave(per)[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(bool((a == a[i]).eq(b == b[i]).all()) for i in range(len(a)))


def test_recovers_separated_clusters():
    X, truth = blobs(1)
    km = kmeans(X, 3, seed=0)
    assert same_partition(km.labels, truth)
    # centroids are the member means and the inertia is the objective
    for c in range(3):
        torch.testing.assert_close(km.centroids[c], X[km.labels == c].mean(0))
    assert km.inertia == pytest.approx(float(((X - km.centroids[km.labels]) ** 2).sum()), rel=1e-12)


def test_optimal_inertia_on_tiny_problem_against_brute_force():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(7, 3, generator=g, dtype=torch.float64)
    best = min(
        sum(float(((X[m] - X[m].mean(0)) ** 2).sum()) for m in (torch.tensor(p) == 0, torch.tensor(p) == 1))
        for p in itertools.product([0, 1], repeat=7) if 0 < sum(p) < 7
    )
    assert kmeans(X, 2, seed=0, restarts=8).inertia == pytest.approx(best, rel=1e-9)


def test_seed_reproducible_bitwise():
    X, _ = blobs(2, centers=4, per=6)
    a, b = kmeans(X, 4, seed=11), kmeans(X, 4, seed=11)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids) and a.inertia == b.inertia


def test_k_equal_n_gives_singletons_even_with_duplicates():
    X, _ = blobs(4, centers=2, per=3)
    X = torch.cat([X, X[:2]])  # duplicates: only the distinct points can be singletons
    km = kmeans(X[:6], 6, seed=5)
    assert sorted(km.labels.tolist()) == list(range(6))
    assert km.inertia == 0.0
    km = kmeans(X, 7, seed=5)  # 7 clusters over 6 distinct points: every point still sits on its centre
    assert km.inertia == 0.0


def test_k_one_is_the_mean():
    X, _ = blobs(5)
    km = kmeans(X, 1)
    torch.testing.assert_close(km.centroids[0], X.mean(0))


@pytest.mark.parametrize("k", [0, -1, 16])
def test_bad_k(k):
    X, _ = blobs(0)
    with pytest.raises(OperatorParameterError, match="outside"):
        kmeans(X, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    X, _ = blobs(6, centers=5, per=8, dim=300)
    a, b = kmeans(X, 5, seed=2), kmeans(X.cuda(), 5, seed=2)
    assert torch.equal(a.labels, b.labels.cpu())
    torch.testing.assert_close(a.centroids, b.centroids.cpu())
