"""pyDVL peers through their own interpreter (valuekit.bench.peers); skipped where no pyDVL Python is configured."""

import numpy as np
import pytest

from valuekit.analysis.baselines import knn_shapley
from valuekit.bench.peers import pydvl_python, pydvl_values


@pytest.mark.slow
@pytest.mark.skipif(pydvl_python() is None, reason="no pyDVL interpreter (set VALUEKIT_PYDVL_PYTHON)")
def test_pydvl_knn_shapley_equals_ours_and_data_oob_flags_flips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    y = (x[:, 0] > 0).astype(int)
    y[:20] = 1 - y[:20]  # the first 20 labels are flipped
    dx = rng.normal(size=(40, 3))
    dy = (dx[:, 0] > 0).astype(int)
    got = pydvl_values(x, y, dx, dy, seed=0, k=5, trees=50)
    np.testing.assert_allclose(got["knn-shapley"], knn_shapley(x, y, dx, dy, k=5), rtol=1e-9, atol=1e-12)
    oob = got["data-oob"]
    assert ((oob >= 0) & (oob <= 1)).all() and oob[:20].mean() < oob[20:].mean() - 0.3


def test_missing_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("VALUEKIT_PYDVL_PYTHON", "/nonexistent/python")
    with pytest.raises((RuntimeError, OSError)):
        pydvl_values(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros((2, 2)), np.array([0, 1]))
