"""Subset value (valuekit.analysis.subsets): rows written, top-by-value selection, planted good vs bad subsets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import blobs

from valuekit.analysis.subsets import COLUMNS, plot_subset_value, summarise, top_ids
from valuekit.bench.retrain import subset_value
from valuekit.errors import InputError


@pytest.fixture
def noisy(tmp_path):
    train = blobs(160, seed=1, noise=0.4)
    paths = {"train": tmp_path / "train.parquet", "dev": tmp_path / "dev.parquet", "test": tmp_path / "test.parquet"}
    train.to_parquet(paths["train"], index=False)
    blobs(30, seed=2, id_start=1000).to_parquet(paths["dev"], index=False)
    blobs(150, seed=3, id_start=2000).to_parquet(paths["test"], index=False)
    clean = (~train["is_noisy"]).to_numpy().astype(float)
    rng = np.random.default_rng(0)
    good = pd.DataFrame({"example_id": train["id"], "value": clean + 0.1 * rng.random(len(train))})
    bad = pd.DataFrame({"example_id": train["id"], "value": -good["value"]})
    return paths, good, bad, train


def test_top_ids_orders_by_value_nan_last():
    v = pd.DataFrame({"example_id": [10, 11, 12, 13], "value": [0.5, np.nan, 2.0, 0.5]})
    assert top_ids(v, 3).tolist() == [12, 10, 13]  # ties in table order, NaN last
    assert top_ids(v, 4).tolist() == [12, 10, 13, 11]


def test_planted_good_subset_beats_bad_one(noisy, tmp_path):
    paths, good, bad, train = noisy
    out = tmp_path / "subset_value.parquet"
    frame = subset_value(good, paths["train"], dev=paths["dev"], test=paths["test"], fractions=(0.3, 0.5),
                         seeds=(0, 1), others={"planted bad": bad}, model="linear", steps=120, batch_size=32,
                         lr=0.05, out=out)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 2 * 2 * 3
    assert set(frame["selection"]) == {"value", "random", "planted bad"}
    assert frame.groupby(["fraction", "selection"]).size().eq(2).all()
    assert (
        frame.loc[frame.fraction == 0.3, "size"].eq(48).all() and frame.loc[frame.fraction == 0.5, "size"].eq(80).all()
    )
    assert frame["test_acc"].between(0, 1).all()
    pd.testing.assert_frame_equal(pd.read_parquet(out), frame)
    acc = summarise(frame).set_index(["fraction", "selection"])["mean"]
    for f in (0.3, 0.5):
        # top 50 % by the planted value are all clean rows; by the planted bad value, 40 of 80 are flipped
        assert acc[(f, "value")] > acc[(f, "planted bad")] + 0.15
        assert acc[(f, "value")] >= acc[(f, "random")] - 0.02
    assert acc[(0.5, "value")] > 0.85


def test_plot_and_input_errors(noisy, tmp_path):
    paths, good, _, _ = noisy
    frame = pd.DataFrame({"fraction": [0.1, 0.1, 0.5, 0.5], "selection": ["value", "random"] * 2, "seed": 0,
                          "test_acc": [0.9, 0.8, 0.95, 0.9], "size": [16, 16, 80, 80]})
    ax = plot_subset_value(frame)
    assert len(ax.lines) >= 2 and ax.get_xlabel().startswith("training subset")
    with pytest.raises(InputError, match="data="):
        subset_value(good, dev=paths["dev"], test=paths["test"], write=False)
    with pytest.raises(InputError, match="fractions"):
        subset_value(good, paths["train"], fractions=(0.0,), write=False)
    with pytest.raises(InputError, match="no value for training id"):
        subset_value(good.iloc[5:], paths["train"], fractions=(0.5,), seeds=(0,), write=False)
    with pytest.raises(InputError, match="value"):
        subset_value(good.drop(columns="value"), paths["train"], write=False)


def test_stratified_subsets_keep_class_proportions(noisy, tmp_path):
    paths, good, _, train = noisy
    frame = subset_value(good, paths["train"], dev=paths["dev"], test=paths["test"], fractions=(0.25,), seeds=(0,),
                         model="linear", steps=3, stratify=True, write=False)
    counts = train["label"].value_counts()
    expected = int(sum(max(1, round(0.25 * c)) for c in counts))
    assert frame["size"].eq(expected).all() and set(frame["selection"]) == {"value", "random"}
