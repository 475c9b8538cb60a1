"""valuekit.analysis.balance on a hand-made run directory (exact numbers) and on a tiny real run."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from valuekit.analysis.balance import (
    class_balance,
    class_balance_over_steps,
    kl,
    plot_class_balance,
    plot_class_balance_over_steps,
)
from valuekit.runs.layout import SCHEMA_VERSION, steps_schema, values_schema
from valuekit.runs.reader import read_run


def write_steps(folder, part, rows):
    schema = steps_schema("int64")
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    pq.write_table(pa.table({k: pa.array(v, schema.field(k).type) for k, v in cols.items()}, schema=schema),
                   folder / f"part-{part:05d}.parquet")


@pytest.fixture
def hand_run(tmp_path):
    """6 training rows, labels a a a b b c; 4 logged steps of 3 rows; dev labels a b c c."""
    run = tmp_path / "run"
    (run / "steps").mkdir(parents=True)
    dev = tmp_path / "dev.parquet"
    pd.DataFrame({"id": [10, 11, 12, 13], "label": ["a", "b", "c", "c"], "f": [0.0, 1, 2, 3]}).to_parquet(dev)
    (run / "run.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "name": "hand", "method": "dds", "classes": ["a", "b", "c"],
        "data": {"dev": {"path": str(dev)}}, "steps_done": 4,
    }))
    labels = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2}

    def rows(step, ids, weights):
        return [
            {"step": step, "example_id": i, "label": labels[i], "weight": w, "loss": 0.1} for i, w in zip(ids, weights)
        ]

    write_steps(run / "steps", 0, rows(1, [0, 3, 5], [1, 1, 1]) + rows(2, [1, 4, 5], [0.5, 0.5, 2]))
    write_steps(run / "steps", 1, rows(3, [0, 1, 2], [None] * 3) + rows(4, [3, 4, 5], [3, 0, 0]))
    values = pd.DataFrame({"example_id": np.arange(6), "value": np.arange(6.0), "value_std": np.nan,
                           "weight": [0.5, 0.5, 0.5, 1, 1, 2.5], "rank": np.arange(6, 0, -1)})
    pq.write_table(pa.Table.from_pandas(values, schema=values_schema("int64"), preserve_index=False),
                   run / "values.parquet")
    return run


def test_class_balance_hand_numbers(hand_run):
    df = class_balance(hand_run)
    assert list(df["class"]) == ["a", "b", "c"]
    np.testing.assert_allclose(df["scorer_mass"], [1.5 / 6, 2 / 6, 2.5 / 6])
    np.testing.assert_allclose(df["empirical"], [3 / 6, 2 / 6, 1 / 6])
    np.testing.assert_allclose(df["dev"], [0.25, 0.25, 0.5])
    kl_s = 0.25 * math.log(0.25 / 0.25) + 0.25 * math.log(0.25 / (2 / 6)) + 0.5 * math.log(0.5 / (2.5 / 6))
    kl_e = 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(0.25 / (2 / 6)) + 0.5 * math.log(0.5 / (1 / 6))
    assert df.attrs["kl_scorer_dev"] == pytest.approx(kl_s, rel=1e-12)
    assert df.attrs["kl_empirical_dev"] == pytest.approx(kl_e, rel=1e-12)
    # a Run object works too, and a label column in values.parquet takes precedence over steps/
    run = read_run(hand_run)
    assert class_balance(run)["scorer_mass"].tolist() == df["scorer_mass"].tolist()


def test_class_balance_without_dev_file(hand_run, tmp_path):
    (tmp_path / "dev.parquet").unlink()
    df = class_balance(hand_run)
    assert df["dev"].isna().all()
    assert math.isnan(df.attrs["kl_scorer_dev"]) and math.isnan(df.attrs["kl_empirical_dev"])


def test_class_balance_over_steps_hand_numbers(hand_run):
    df = class_balance_over_steps(hand_run, bins=2)
    assert list(df.columns) == ["step", "class", "mass"]
    got = {(int(s), c): m for s, c, m in df.itertuples(index=False)}
    # bin 1 = steps 1-2: a 1+0.5, b 1+0.5, c 1+2; bin 2 = steps 3-4 (null weight = 1): a 3, b 3+0, c 0
    expected = {(2, "a"): 0.25, (2, "b"): 0.25, (2, "c"): 0.5, (4, "a"): 0.5, (4, "b"): 0.5, (4, "c"): 0.0}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12)
    one = class_balance_over_steps(hand_run, bins=1)
    np.testing.assert_allclose(one["mass"], [4.5 / 12, 4.5 / 12, 3 / 12])
    assert one["step"].tolist() == [4, 4, 4]


def test_plots_return_axes(hand_run):
    ax = plot_class_balance(class_balance(hand_run))
    assert len(ax.patches) == 9  # 3 classes x (scorer, empirical, dev)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights[-1] == pytest.approx(0.5)
    ax2 = plot_class_balance_over_steps(class_balance_over_steps(hand_run, bins=2))
    assert ax2.get_xlabel() == "step" and len(ax2.collections) == 3


def test_kl_direction():
    assert kl([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert kl([0.5, 0.5], [1.0, 0.0]) == math.inf


def test_on_a_real_uniform_run(tmp_path):
    """Uniform training logs no label column in values.parquet: labels come from steps/; weights are 1."""
    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.training.loop import run_training

    rng = np.random.default_rng(0)
    y = np.array(["x"] * 12 + ["y"] * 6 + ["z"] * 2)
    train_df = pd.DataFrame({"id": np.arange(20), "label": y, "f0": rng.normal(size=20), "f1": rng.normal(size=20)})
    dev_df = pd.DataFrame({"id": np.arange(100, 106), "label": ["x", "y", "z"] * 2, "f0": rng.normal(size=6),
                           "f1": rng.normal(size=6)})
    train_df.to_parquet(tmp_path / "train.parquet")
    dev_df.to_parquet(tmp_path / "dev.parquet")
    tr = load_table(tmp_path / "train.parquet")
    dv = load_table(tmp_path / "dev.parquet", like=tr, name="dev")
    run = run_training(tr, dv, out=tmp_path / "run", config=TrainConfig(steps=10, batch_size=10, progress=False))
    df = class_balance(run)
    np.testing.assert_allclose(df["empirical"], [0.6, 0.3, 0.1])
    np.testing.assert_allclose(df["scorer_mass"], [0.6, 0.3, 0.1])
    np.testing.assert_allclose(df["dev"], [1 / 3] * 3)
    over = class_balance_over_steps(run, bins=5)
    assert over["step"].unique().tolist() == [2, 4, 6, 8, 10]
    np.testing.assert_allclose(over.groupby("step")["mass"].sum(), 1.0)
    # 10 steps x 10 rows = 5 passes over the 20 rows: every bin (2 steps) is one full pass
    np.testing.assert_allclose(over.pivot(index="step", columns="class", values="mass").to_numpy(),
                               np.tile([0.6, 0.3, 0.1], (5, 1)))
