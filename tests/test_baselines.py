import itertools
import math

import numpy as np
import pytest

from valuekit.analysis.baselines import knn_shapley, knn_utility


def _exact_shapley(x, y, xv, yv, k):
    """Shapley values by the definition: average marginal contribution over all orderings."""
    n = len(x)
    phi = np.zeros(n)
    for perm in itertools.permutations(range(n)):
        for j in range(len(xv)):
            prev = 0.0
            for pos, i in enumerate(perm):
                cur = knn_utility(np.array(perm[: pos + 1]), x, y, xv[j], yv[j], k)
                phi[i] += cur - prev
                prev = cur
    return phi / math.factorial(n) / len(xv)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_knn_shapley_equals_the_definition(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(6, 2))
    y = rng.integers(0, 2, 6)
    xv = rng.normal(size=(3, 2))
    yv = rng.integers(0, 2, 3)
    np.testing.assert_allclose(knn_shapley(x, y, xv, yv, k=k), _exact_shapley(x, y, xv, yv, k), atol=1e-12)


def test_values_sum_to_the_full_utility_and_flag_flipped_labels():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (40, 2)), rng.normal(2, 1, (40, 2))])
    y = np.repeat([0, 1], 40)
    y_noisy = y.copy()
    y_noisy[:5] = 1  # five flipped labels
    xv = np.concatenate([rng.normal(-2, 1, (20, 2)), rng.normal(2, 1, (20, 2))])
    yv = np.repeat([0, 1], 20)
    v = knn_shapley(x, y_noisy, xv, yv, k=5, chunk=7)
    full = np.mean([knn_utility(np.arange(80), x, y_noisy, xv[j], yv[j], 5) for j in range(40)])
    assert v.sum() == pytest.approx(full, abs=1e-12)  # efficiency axiom
    assert np.all(np.argsort(v)[:5] < 5)  # the flipped ones are the five least valuable
