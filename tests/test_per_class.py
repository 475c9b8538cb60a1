"""Selection that never starves a class: `score(per_class=True)` / `valuekit score --per-class`, and the warning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import valuekit
from valuekit.errors import InputError
from valuekit.export import scoring as export
from valuekit.runs.writer import RunWriter


def make_run(path, ids, value):
    ids = np.asarray(ids)
    n = len(ids)
    w = RunWriter(path, meta={"method": "uniform", "id_type": "int64"}, id_type="int64")
    order = np.argsort(-np.asarray(value), kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    w.write_values(pd.DataFrame({"example_id": ids, "value": np.asarray(value, dtype=np.float64),
                                 "value_std": np.full(n, np.nan), "weight": np.ones(n), "rank": rank}))
    w.close("finished")
    return path


# 10 rows: class "a" has the 6 highest values, class "b" the rest (one NaN, one tie)
IDS = np.arange(10, 20)
LABELS = np.array(["a", "b", "a", "b", "a", "a", "b", "a", "b", "a"])
VALUES = np.array([9.0, 2.0, 8.0, np.nan, 7.0, 6.0, 3.0, 5.0, 3.0, 4.0])


@pytest.fixture
def table(tmp_path):
    df = pd.DataFrame({"id": IDS, "label": LABELS, "f": np.arange(10.0)})
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False)
    return {"df": df, "path": path, "run": make_run(tmp_path / "run", IDS, VALUES)}


def test_class_quotas_exact():
    counts = np.array([5, 3, 2])
    np.testing.assert_array_equal(export.class_quotas(counts, keep_fraction=0.5), [3, 2, 1])  # half up
    np.testing.assert_array_equal(export.class_quotas(counts, keep_fraction=0.01), [1, 1, 1])  # never empty
    np.testing.assert_array_equal(export.class_quotas(counts, drop_fraction=0.4), [3, 2, 1])
    # 5 * (5, 3, 2) / 10 = (2.5, 1.5, 1.0): floors (2, 1, 1), the spare row to the first largest remainder
    np.testing.assert_array_equal(export.class_quotas(counts, top_k=5), [3, 1, 1])
    np.testing.assert_array_equal(export.class_quotas(counts, top_k=100), [5, 3, 2])


def test_per_class_selection_exact_rows(table):
    # class a (rows 0,2,4,5,7,9; values 9,8,7,6,5,4) keeps 3; class b (rows 1,3,6,8; 2,nan,3,3) keeps 2:
    # 3.0 twice (rows 6 and 8, ties in row order), NaN last
    got = valuekit.score(table["df"], table["run"], keep_fraction=0.5, per_class=True)
    assert list(got.index[got.selected]) == [0, 2, 4, 6, 8]
    glob = valuekit.score(table["df"], table["run"], keep_fraction=0.5)
    assert list(glob.index[glob.selected]) == [0, 2, 4, 5, 7]  # the global rule keeps no row of class b
    top = valuekit.score(table["df"], table["run"], top_k=4, per_class=True)  # 4 * (6, 4) / 10 -> (2.4, 1.6) -> 2, 2
    assert list(top.index[top.selected]) == [0, 2, 6, 8]
    drop = valuekit.score(table["df"], table["run"], drop_fraction=0.25, per_class=True)  # drop 2 of a, 1 of b
    assert list(drop.index[drop.selected]) == [0, 1, 2, 4, 5, 6, 8]


def test_write_reports_starved_classes(table, tmp_path):
    s = export.write_scored(table["path"], table["run"], tmp_path / "g.parquet",
                            selection=export.Selection(keep_fraction=0.5))
    assert s.selected == 5 and [c["label"] for c in s.starved] == ["b"] and s.starved[0]["kept"] == 0
    s = export.write_scored(table["path"], table["run"], tmp_path / "p.parquet",
                            selection=export.Selection(keep_fraction=0.5, per_class=True))
    assert s.starved == []
    got = pd.read_parquet(tmp_path / "p.parquet")
    assert list(got.id[got.selected]) == list(IDS[[0, 2, 4, 6, 8]])
    shares = export.class_shares(got.selected.to_numpy(), got.label.to_numpy()).set_index("label")
    assert shares.loc["a", "share_ratio"] == pytest.approx((3 / 5) / (6 / 10))
    assert shares.loc["b", "share_ratio"] == pytest.approx((2 / 5) / (4 / 10))


def test_class_shares_frame_is_sorted_with_ties_in_label_order():
    """Rows by share_ratio; equal ratios in sorted label order (not order of appearance); a fresh 0..n-1 index."""
    labels = np.array(["z", "z", "m", "m", "a", "a"])
    frame = export.class_shares(np.array([True, True, True, False, False, False]), labels)
    assert frame.label.tolist() == ["a", "m", "z"] and frame.index.tolist() == [0, 1, 2]
    assert frame.rows.tolist() == [2, 2, 2] and frame.kept.tolist() == [0, 1, 2]
    np.testing.assert_allclose(frame.share_ratio, [0.0, (1 / 3) / (2 / 6), (2 / 3) / (2 / 6)])
    moved = export.class_shares(np.array([False, False, True, False, True, True]), labels)  # sorting reorders
    assert moved.label.tolist() == ["z", "m", "a"] and moved.index.tolist() == [0, 1, 2]
    ties = export.class_shares(np.ones(4, dtype=bool), np.array(["b", "b", "a", "a"]))
    assert ties.label.tolist() == ["a", "b"] and ties.share_ratio.tolist() == [1.0, 1.0]
    starved = export.starved_classes(np.array([True, True, True, False, False, False]), labels)
    assert starved.label.tolist() == ["a"] and starved.index.tolist() == [0]


def test_cli_per_class_and_errors(table, tmp_path, capsys):
    from valuekit.cli.main import main

    out = tmp_path / "o.parquet"
    base = ["score", str(table["path"]), "--run", str(table["run"]), "-o", str(out)]
    assert main(base + ["--keep-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "warning: class 'b' keeps 0 of 4 rows" in printed
    assert main(base + ["--keep-fraction", "0.5", "--per-class", "--subset-only", "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert list(pd.read_parquet(out).id) == list(IDS[[0, 2, 4, 6, 8]])
    out.unlink()
    assert main(base + ["--per-class"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--per-class needs --keep-fraction" in err[0] and not out.exists()
    assert main(base + ["--top-k", "3", "--per-class", "--label-col", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and not out.exists()
    with pytest.raises(InputError, match="per_class=True needs"):
        valuekit.score(table["df"], table["run"], min_weight=1.0, per_class=True)


def test_report_warns_when_a_selection_starves_a_class():
    from valuekit.reporting import _starved_notes

    values = pd.DataFrame({"example_id": IDS, "value": VALUES})
    notes = _starved_notes("run-a", values, pd.Series(LABELS, index=IDS))
    assert len(notes) == 1 and "class 'b' at 0.00x its share (0 of 4 rows)" in notes[0] and "--per-class" in notes[0]
    balanced = values.assign(value=np.where(LABELS == "b", 10.0, 0.0) + np.arange(10.0))  # b now on top
    assert "class 'a'" in _starved_notes("run-a", balanced, pd.Series(LABELS, index=IDS))[0]
    mixed = values.assign(value=np.arange(10.0))
    assert _starved_notes("run-a", mixed, pd.Series(LABELS, index=IDS)) == []
