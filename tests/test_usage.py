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

from valuekit.analysis.usage import plot_source_usage, source_usage
from valuekit.errors import InputError
from valuekit.runlog import SCHEMA_VERSION, SOURCES_SCHEMA


def _run_dir(tmp_path, sources=None, steps=None):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "method": "multidds"}))
    if sources is not None:
        (d / "sources").mkdir()
        # two parts, as a run that flushed twice would leave
        half = len(sources) // 2
        for i, part in enumerate((sources.iloc[:half], sources.iloc[half:])):
            pq.write_table(pa.Table.from_pandas(part, schema=SOURCES_SCHEMA, preserve_index=False),
                           d / "sources" / f"part-{i:05d}.parquet")
    if steps is not None:
        (d / "steps").mkdir()
        pq.write_table(pa.Table.from_pandas(steps, preserve_index=False), d / "steps" / "part-00000.parquet")
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
