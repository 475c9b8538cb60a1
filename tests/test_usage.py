"""valuekit.analysis.usage on hand-made run directories."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from valuekit.analysis.usage import (
    plot_source_probs,
    plot_source_rewards,
    plot_source_usage,
    source_rewards,
    source_table,
    source_usage,
)
from valuekit.errors import InputError
from valuekit.runs.layout import SCHEMA_VERSION, SOURCES_SCHEMA, steps_schema


def _run_dir(tmp_path, sources=None, steps=None, schema=SOURCES_SCHEMA):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "method": "multidds"}))
    if sources is not None:
        (d / "sources").mkdir()
        # two parts, as a run that flushed twice would leave
        half = len(sources) // 2
        for i, part in enumerate((sources.iloc[:half], sources.iloc[half:])):
            part = part.reindex(columns=SOURCES_SCHEMA.names) if schema is SOURCES_SCHEMA else part
            pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False),
                           d / "sources" / f"part-{i:05d}.parquet")
    if steps is not None:
        (d / "steps").mkdir()
        schema = steps_schema("int64")  # every column of a real step log (readers check them)
        pq.write_table(pa.Table.from_pandas(steps.reindex(columns=schema.names), schema=schema, preserve_index=False),
                       d / "steps" / "part-00000.parquet")
    return d


SOURCES = pd.DataFrame({
    "step": [1, 1, 1, 10, 10, 10],
    "source": ["es", "ja", "gl", "es", "ja", "gl"],
    "prob": [0.25, 0.25, 0.25, 0.6, 0.1, 0.3],  # bernoulli-like: step 1 sums to 0.75
    "count": [10, 20, 10, 50, 0, 30],
})


def test_source_usage_prob_and_count(tmp_path):
    d = _run_dir(tmp_path, SOURCES)
    p = source_usage(d, by="prob")
    assert list(p.columns) == ["step", "source", "share"]
    assert p["step"].tolist() == [1, 1, 1, 10, 10, 10]
    assert p["source"].tolist() == ["es", "gl", "ja", "es", "gl", "ja"]
    np.testing.assert_allclose(p["share"], [1 / 3, 1 / 3, 1 / 3, 0.6, 0.3, 0.1])
    c = source_usage(d, by="count")
    np.testing.assert_allclose(c["share"], [0.25, 0.25, 0.5, 50 / 80, 30 / 80, 0.0])
    assert np.allclose(c.groupby("step")["share"].sum(), 1.0)


def test_source_usage_counts_from_steps_when_no_sources_log(tmp_path):
    steps = pd.DataFrame({"step": [1, 1, 1, 2, 2, 2, 2], "example_id": range(7),
                          "source": ["es", "es", "ja", "ja", "ja", "ja", "es"]})
    d = _run_dir(tmp_path, steps=steps)
    c = source_usage(d, by="count")
    assert c.values.tolist() == [[1, "es", 2 / 3], [1, "ja", 1 / 3], [2, "es", 0.25], [2, "ja", 0.75]]
    with pytest.raises(InputError, match="sources"):
        source_usage(d, by="prob")
    with pytest.raises(InputError, match="by="):
        source_usage(d, by="share")


def test_plot_source_usage_stacks_shares(tmp_path):
    frame = source_usage(_run_dir(tmp_path, SOURCES))
    ax = plot_source_usage(frame)
    assert ax.get_xlabel() == "training step"
    polys = ax.collections
    assert len(polys) == 3  # one band per source
    top = polys[-1].get_paths()[0].vertices
    assert np.isclose(top[:, 1].max(), 1.0)  # the stacked shares reach 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["es", "gl", "ja"]
    import matplotlib.pyplot as plt

    fig, ax2 = plt.subplots()
    assert plot_source_usage(frame, ax=ax2) is ax2


def test_plot_source_usage_distinct_colours_for_eleven_sources(tmp_path):
    names = [f"s{i:02d}" for i in range(11)]
    frame = pd.DataFrame({"step": np.repeat([1, 2], 11), "source": names * 2, "share": 1 / 11})
    ax = plot_source_usage(frame)
    colours = {tuple(np.round(c.get_facecolor()[0][:3], 4)) for c in ax.collections}
    assert len(colours) == 11


REWARDS = pd.DataFrame({
    "step": [1, 1, 8, 8, 16, 16, 24, 24],
    "source": ["es", "ja"] * 4,
    "prob": [0.5, 0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2],
    "count": [16] * 8,
    "reward": [None, None, 0.3, -0.1, 0.5, None, 0.1, 0.0],  # step 1: no update yet; ja unseen at 16
    "reward_se": [None, None, 0.1, 0.2, 0.3, None, 0.2, 0.1],
})


def test_source_rewards_per_update_and_binned(tmp_path):
    d = _run_dir(tmp_path, REWARDS)
    r = source_rewards(d)
    assert r.values.tolist() == [[8, "es", 0.3, 0.1], [8, "ja", -0.1, 0.2], [16, "es", 0.5, 0.3],
                                 [24, "es", 0.1, 0.2], [24, "ja", 0.0, 0.1]]
    b = source_rewards(d, max_points=2)  # es: updates (8, 16) | (24); ja: (8) | (24)
    es = b[b.source == "es"]
    assert es["step"].tolist() == [16, 24]
    np.testing.assert_allclose(es["reward"], [0.4, 0.1])
    np.testing.assert_allclose(es["reward_se"], [np.sqrt(0.1 ** 2 + 0.3 ** 2) / 2, 0.2])
    assert b[b.source == "ja"]["reward"].tolist() == [-0.1, 0.0]


def test_runs_without_reward_columns_read_back(tmp_path):
    old = SOURCES.copy()  # a sources/ log written before reward and reward_se existed
    schema = pa.schema([f for f in SOURCES_SCHEMA if f.name not in ("reward", "reward_se")])
    d = _run_dir(tmp_path, old, schema=schema)
    assert len(source_rewards(d)) == 0 and list(source_rewards(d).columns) == ["step", "source", "reward", "reward_se"]
    assert len(source_usage(d)) == 6
    with pytest.raises(InputError, match="sources.parquet"):
        source_table(d)


def test_usage_curves_plot_the_logged_series(tmp_path):
    d = _run_dir(tmp_path, REWARDS)
    ax = plot_source_probs(source_usage(d), highlight=["es"])
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines) == {"es", "ja"}
    np.testing.assert_allclose(lines["es"].get_xdata(), [1, 8, 16, 24])
    np.testing.assert_allclose(lines["es"].get_ydata(), [0.5, 0.6, 0.7, 0.8])
    np.testing.assert_allclose(lines["ja"].get_ydata(), [0.5, 0.4, 0.3, 0.2])
    assert lines["es"].get_linewidth() > lines["ja"].get_linewidth()  # the highlighted target
    ax = plot_source_rewards(source_rewards(d))
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == {"es", "ja"}
    line, _, (vlines,) = bars["es"].lines
    np.testing.assert_allclose(line.get_xdata(), [8, 16, 24])
    np.testing.assert_allclose(line.get_ydata(), [0.3, 0.5, 0.1])
    segs = vlines.get_segments()  # one vertical bar per point: reward +- se
    np.testing.assert_allclose([s[:, 1] for s in segs], [[0.2, 0.4], [0.2, 0.8], [-0.1, 0.3]], atol=1e-12)
    assert line.get_color() == bars["es"].lines[0].get_color() and ax.get_ylabel().startswith("reward")


def test_source_table_reads_sources_parquet(tmp_path):
    from valuekit.runs.layout import SOURCE_TABLE, SOURCE_TABLE_SCHEMA

    d = _run_dir(tmp_path, REWARDS)
    t = pd.DataFrame({"source": ["ja", "es"], "prob": [0.2, 0.8], "logit": [-0.7, 0.7], "uniform_prob": 0.5,
                      "mean_reward": [-0.05, 0.3], "reward_se": [0.1, 0.12], "updates": [2, 3], "rows": [10, 12],
                      "drawn": [30, 34], "is_target": [False, True]})
    pq.write_table(pa.Table.from_pandas(t, schema=SOURCE_TABLE_SCHEMA, preserve_index=False), d / SOURCE_TABLE)
    out = source_table(d)
    assert out["source"].tolist() == ["es", "ja"] and out["prob"].tolist() == [0.8, 0.2]
    assert out.loc[0, "is_target"] and list(out.columns) == SOURCE_TABLE_SCHEMA.names
