"""The tabular sets read from files that packages ship (river, vega_datasets, palmerpenguins, scikit-learn):
each prepares with its documented size, classes and exact noise, and a missing package is named in one line."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from valuekit.data.bundled import DATASETS, PACKAGES, prepare
from valuekit.errors import InputError

# name -> (rows before the splits, classes, features)
EXPECTED = {"iris": (150, 3, 4), "segment": (2310, 7, 18), "phishing": (1250, 2, 9), "banana": (5300, 2, 2),
            "penguins": (342, 3, 4), "seattle-weather": (1461, 5, 6)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_package_sets_prepare_with_their_sizes(name, tmp_path):
    package = PACKAGES.get(name, ("sklearn", ""))[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed")
    rows, classes, features = EXPECTED[name]
    x, y, feature_names, class_names = DATASETS[name][0]()
    assert x.shape == (rows, features) and len(feature_names) == features
    assert len(class_names) == classes and sorted(set(y.tolist())) == list(range(classes))
    assert (x == x).all()  # no NaN left (penguins drops the rows without measurements)
    paths = prepare(name, tmp_path, noise=0.3, noise_kind="pair", seed=1)
    tr, dev, te = (pd.read_parquet(paths[s]) for s in ("train", "dev", "test"))
    assert len(tr) + len(dev) + len(te) == rows
    assert tr.is_noisy.sum() == round(0.3 * len(tr))
    assert set(dev.label) == set(class_names) and dev.label.value_counts().nunique() == 1  # balanced, clean dev
    assert [c for c in tr.columns if c not in ("id", "label", "is_noisy", "clean_label")] == feature_names


def test_seattle_weather_season_wraps_around_the_year():
    if importlib.util.find_spec("vega_datasets") is None:
        pytest.skip("vega_datasets not installed")
    x, _, names, classes = DATASETS["seattle-weather"][0]()
    assert classes == ["drizzle", "fog", "rain", "snow", "sun"]
    sin, cos = x[:, names.index("season_sin")], x[:, names.index("season_cos")]
    assert abs(float((sin**2 + cos**2).mean()) - 1) < 1e-5
    assert cos[0] > 0.99 and cos[364] > 0.99  # 1 January and 31 December 2012 are neighbours


def test_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("river") else real(n, *a))
    with pytest.raises(InputError, match=r"package river: pip install 'valuekit\[benchdata\]'"):
        DATASETS["segment"][0]()
