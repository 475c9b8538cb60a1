"""valuekit.export.scoring / `valuekit score`: round trips keep every column, added columns are exact,
streaming equals one batch, writes are atomic, and the three user workflows work on the output."""

from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import valuekit
from valuekit.errors import InputError
from valuekit.export import scoring as export
from valuekit.export import tablestream
from valuekit.ranking import rank_by_value
from valuekit.runs.reader import read_run
from valuekit.runs.writer import RunWriter

N = 60


def make_run(path, ids, value, *, weight=None, value_std=None, extra=None):
    """A finished run directory holding only values.parquet, written with the runlog schema (plus `extra`
    columns, as the methods add: name -> array)."""
    ids = np.asarray(ids)
    id_type = "int64" if ids.dtype.kind in "iu" else "string"
    n = len(ids)
    w = RunWriter(path, meta={"method": "uniform", "id_type": id_type}, id_type=id_type)
    value = np.asarray(value, dtype=np.float64)
    order = np.argsort(-value, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    w.write_values(pd.DataFrame({
        "example_id": ids if id_type == "int64" else ids.astype(str).astype(object),
        "value": value,
        "value_std": np.full(n, np.nan) if value_std is None else np.asarray(value_std, dtype=np.float64),
        "weight": np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64),
        "rank": rank,
        **(extra or {}),
    }))
    w.close("finished")
    return path


def rich_arrow(n=N, *, seed=0, ids=None) -> pa.Table:
    """Every kind of column users keep: nullable ints, strings with nulls, dictionary, bool, timestamps,
    a list<float> and a fixed-size-list image column, plus file metadata."""
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + n) if ids is None else np.asarray(ids)
    null = rng.random(n) < 0.2
    img = rng.random((n, 4)).astype(np.float32)
    t = pa.table({
        "id": pa.array(ids),
        "label": pa.array(rng.choice(["cat", "dog"], n)),
        "f32": pa.array(rng.normal(size=n).astype(np.float32)),
        "count": pa.array([None if z else int(v) for z, v in zip(null, rng.integers(-5, 5, n))], pa.int32()),
        "big": pa.array([None if z else int(v) for z, v in zip(null[::-1], rng.integers(0, 1 << 40, n))], pa.int64()),
        "name": pa.array([None if z else f"n{i}" for i, z in enumerate(rng.random(n) < 0.3)], pa.string()),
        "lang": pa.array(rng.choice(["en", "de", "fr"], n)).dictionary_encode(),
        "flag": pa.array(rng.random(n) < 0.5),
        "when": pa.array([None if i % 7 == 3 else dt.datetime(2024, 1, 1) + dt.timedelta(seconds=int(s))
                          for i, s in enumerate(rng.integers(0, 10**7, n))], pa.timestamp("us", tz="UTC")),
        "emb": pa.array([None if i % 11 == 5 else list(r[:3]) for i, r in enumerate(img)], pa.list_(pa.float32())),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), 4),
    })
    return t.replace_schema_metadata({b"valuekit.image_shape": b"[1, 2, 2]"})


def csv_frame(n=N, *, seed=0) -> pd.DataFrame:
    """What a CSV can hold: nullable ints, strings with nulls, bool, timestamps, floats."""
    rng = np.random.default_rng(seed)
    null = rng.random(n) < 0.2
    return pd.DataFrame({
        "id": np.arange(100, 100 + n),
        "label": rng.choice(["cat", "dog"], n),
        "x": rng.normal(size=n),
        "count": pd.array([None if z else int(v) for z, v in zip(null, rng.integers(-5, 5, n))], dtype="Int64"),
        "name": [None if z else f"n{i}" for i, z in enumerate(rng.random(n) < 0.3)],
        "flag": rng.random(n) < 0.5,
        "when": pd.to_datetime("2024-01-01") + pd.to_timedelta(rng.integers(0, 10**7, n), unit="s"),
    })


def values_for(ids, *, seed=1, nan_every=9):
    rng = np.random.default_rng(seed)
    n = len(ids)
    value = rng.normal(size=n)
    value[::nan_every] = np.nan  # never-seen rows
    weight = rng.uniform(0.1, 3.0, n)
    return value, weight, rng.uniform(0, 1, n)


@pytest.fixture
def scored(tmp_path):
    """A rich Parquet table (rows shuffled against the run's order) and a run holding its values."""
    t = rich_arrow()
    ids = t.column("id").to_numpy()
    value, weight, std = values_for(ids)
    perm = np.random.default_rng(2).permutation(len(ids))
    run = make_run(tmp_path / "run", ids[perm], value[perm], weight=weight[perm], value_std=std[perm])
    inp = tmp_path / "in.parquet"
    pq.write_table(t, inp, row_group_size=17)
    return {"table": t, "path": inp, "run": run, "value": value, "weight": weight, "std": std}


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    """Same schema and values, NaN equal to NaN (pa.Table.equals treats NaN as unequal)."""
    assert a.schema.equals(b.schema)
    for name in a.schema.names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            np.testing.assert_array_equal(x.to_numpy(), y.to_numpy(), err_msg=name)
        else:
            assert x.equals(y), name


def expected_rank(value):
    """Rank 1 = highest value; ties by row order; NaN last (explicit reference, not the implementation)."""
    def key(i):
        nan = math.isnan(value[i])
        return (nan, 0.0 if nan else -value[i], i)

    keyed = sorted(range(len(value)), key=key)
    rank = np.empty(len(value), dtype=np.int64)
    for r, i in enumerate(keyed):
        rank[i] = r + 1
    return rank


# ---------------------------------------------------------------- round trips


def test_parquet_round_trip_keeps_every_column_and_adds_exact_values(scored, tmp_path):
    out = tmp_path / "out" / "scored.parquet"
    assert valuekit.score(scored["path"], scored["run"], out=out, batch_rows=7) == out
    got = pq.read_table(out)
    original = pq.read_table(scored["path"])
    # Every input column, in order, with its Arrow type (incl. dictionary, lists, tz timestamps) and values.
    assert got.schema.names == original.schema.names + ["weight", "value", "value_std", "rank"]
    assert got.select(original.schema.names).equals(original)
    assert got.schema.metadata[b"valuekit.image_shape"] == b"[1, 2, 2]"
    # pandas sees the same frame it would read from the input.
    pd.testing.assert_frame_equal(pd.read_parquet(out)[list(original.schema.names)], pd.read_parquet(scored["path"]))

    w = got.column("weight").to_numpy()
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w, scored["weight"] * N / scored["weight"].sum(), rtol=1e-12)
    np.testing.assert_array_equal(got.column("value").to_numpy(), scored["value"])  # NaN kept for unseen rows
    np.testing.assert_array_equal(got.column("value_std").to_numpy(), scored["std"])
    rank = got.column("rank").to_numpy()
    np.testing.assert_array_equal(rank, expected_rank(scored["value"]))
    assert set(rank[np.isnan(scored["value"])]) == set(range(N - np.isnan(scored["value"]).sum() + 1, N + 1))


def test_csv_round_trip_keeps_columns_and_types(tmp_path):
    df = csv_frame()
    inp = tmp_path / "in.csv"
    df.to_csv(inp, index=False)
    value, weight, std = values_for(df["id"].to_numpy())
    run = make_run(tmp_path / "run", df["id"].to_numpy(), value, weight=weight, value_std=std)
    for name in ("out.csv", "out.parquet"):
        out = tmp_path / name
        valuekit.score(inp, run, out=out, keep_fraction=0.25, batch_rows=5)
        got = pacsv.read_csv(out) if name.endswith(".csv") else pq.read_table(out)
        original = pacsv.read_csv(inp)
        assert str(original.schema.field("count").type) == "int64" and original.column("count").null_count > 0
        assert original.schema.field("when").type == pa.timestamp("s")
        if name.endswith(".parquet"):  # Parquet has no seconds unit: timestamp[s] is stored as [ms]
            original = original.set_column(6, "when", original.column("when").cast(pa.timestamp("ms")))
        assert got.select(original.schema.names).equals(original), name  # same Arrow types and values
        np.testing.assert_allclose(got.column("weight").to_numpy().mean(), 1.0)
        assert got.column("selected").to_numpy(zero_copy_only=False).sum() == 15
    # The CSV reads back into pandas as the input CSV does.
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out.csv")[list(df.columns)], pd.read_csv(inp))


def test_dataframe_in_dataframe_out_keeps_dtypes_and_index(tmp_path):
    df = csv_frame()
    df["cat"] = pd.Categorical(np.where(df["flag"], "a", "b"))
    df.index = pd.Index(np.arange(N) * 10 + 5, name="row")
    value, weight, std = values_for(df["id"].to_numpy())
    run = make_run(tmp_path / "run", df["id"].to_numpy(), value, weight=weight, value_std=std)
    res = valuekit.score(df, run, top_k=10)
    pd.testing.assert_frame_equal(res[list(df.columns)], df)
    assert res["selected"].sum() == 10 and res["weight"].mean() == pytest.approx(1.0)
    sub = valuekit.score(df, run, top_k=10, subset_only=True)
    assert list(sub.index) == list(res.index[res["selected"]])
    # DataFrame in, Parquet out: pandas reads back the same dtypes (Int64, category, datetime).
    out = tmp_path / "df.parquet"
    valuekit.score(df, run, out=out)
    pd.testing.assert_frame_equal(pd.read_parquet(out)[list(df.columns)], df)


def test_dataframe_with_python_objects_stays_in_pandas(tmp_path):
    run = make_run(tmp_path / "run", np.arange(3), [0.5, 2.0, 1.0])
    df = pd.DataFrame({"id": [2, 0, 1], "meta": [{"a": 1}, [1, "x"], None]})  # not convertible to Arrow
    res = valuekit.score(df, run)
    assert res["meta"].tolist() == df["meta"].tolist() and list(res["rank"]) == [2, 3, 1]
    with pytest.raises(InputError, match="column 'id' mixes types"):
        valuekit.score(pd.DataFrame({"id": [1, "b", 2.5]}), run)


def test_path_in_dataframe_out_matches_pandas_reader(scored):
    res = valuekit.score(scored["path"], scored["run"], batch_rows=4)
    pd.testing.assert_frame_equal(res[list(scored["table"].schema.names)], pd.read_parquet(scored["path"]))
    assert res["weight"].mean() == pytest.approx(1.0)


# ---------------------------------------------------------------- selection rules


def test_selection_rules_select_exact_counts_by_value(scored, tmp_path):
    value = scored["value"]
    w_norm = scored["weight"] * N / scored["weight"].sum()
    by_value = np.argsort(expected_rank(value))  # rows from most to least valuable
    cases = {
        "keep_fraction": (0.3, 18),
        "top_k": (7, 7),
        "drop_fraction": (0.2, 48),
        "min_weight": (1.0, int((w_norm >= 1.0).sum())),
    }
    for rule, (arg, k) in cases.items():
        out = tmp_path / f"{rule}.parquet"
        valuekit.score(scored["path"], scored["run"], out=out, **{rule: arg})
        sel = pq.read_table(out).column("selected").to_numpy(zero_copy_only=False)
        assert sel.sum() == k, rule
        if rule == "min_weight":
            np.testing.assert_array_equal(sel, w_norm >= 1.0)
        else:
            assert set(np.flatnonzero(sel)) == set(by_value[:k]), rule

        sub_path = tmp_path / f"{rule}-subset.parquet"
        valuekit.score(scored["path"], scored["run"], out=sub_path, subset_only=True, batch_rows=5, **{rule: arg})
        sub = pq.read_table(sub_path)
        full = pq.read_table(out)
        assert sub.num_rows == k
        # Same rows in input order, weights normalised over the whole table (not re-normalised).
        pd.testing.assert_frame_equal(sub.to_pandas(), full.filter(full.column("selected")).to_pandas())
    # drop_fraction 0.2 drops 12 rows; the 7 never-valued (NaN) rows rank last, so they are among them.
    assert np.isnan(value).sum() == 7 and not set(np.flatnonzero(np.isnan(value))) & set(by_value[:48])


def test_rank_by_another_values_column_ranks_and_selects_by_it(tmp_path):
    """--rank-by: rank and selection follow the named column of values.parquet, value stays the method's."""
    t = csv_frame()
    ids = t["id"].to_numpy()
    value, weight, _ = values_for(ids)
    reward = np.random.default_rng(5).normal(size=N)
    reward[::6] = np.nan  # rows that never got a reward rank last
    run = make_run(tmp_path / "run", ids, value, weight=weight, extra={"mean_reward": reward})
    got = valuekit.score(t, run, keep_fraction=0.25, rank_by="mean_reward")
    np.testing.assert_array_equal(got["value"].to_numpy(), value)
    np.testing.assert_array_equal(got["rank"].to_numpy(), expected_rank(reward))
    assert set(np.flatnonzero(got.selected)) == set(np.argsort(expected_rank(reward))[:15])
    by_class = valuekit.score(t, run, keep_fraction=0.5, rank_by="mean_reward", per_class=True)
    for _, part in by_class.groupby("label"):
        kept, dropped = reward[part.index[part.selected]], reward[part.index[~part.selected]]
        assert np.nanmin(kept) >= np.nanmax(dropped) or np.isnan(dropped).all()
    with pytest.raises(InputError, match=r"^rank_by='nope': .*values.parquet has no such column \(numeric columns: "
                                         r"value, value_std, weight, mean_reward\)") as info:
        valuekit.score(t, run, keep_fraction=0.5, rank_by="nope")
    assert info.value.cli.startswith("--rank-by nope: ")  # what the CLI prints


def test_option_errors(scored, tmp_path):
    out = tmp_path / "o.parquet"
    with pytest.raises(InputError, match="at most one"):
        valuekit.score(scored["path"], scored["run"], out=out, top_k=3, keep_fraction=0.5)
    with pytest.raises(InputError, match="subset_only=True needs"):
        valuekit.score(scored["path"], scored["run"], out=out, subset_only=True)
    with pytest.raises(InputError, match=r"keep_fraction=1.5"):
        valuekit.score(scored["path"], scored["run"], out=out, keep_fraction=1.5)
    with pytest.raises(InputError, match=r"\.parquet or \.csv"):
        valuekit.score(scored["path"], scored["run"], out=tmp_path / "o.json")
    with pytest.raises(InputError, match="CSV cannot hold"):  # the list<float> column
        valuekit.score(scored["path"], scored["run"], out=tmp_path / "o.csv")
    clash = scored["table"].append_column("weight", pa.array(np.ones(N)))
    with pytest.raises(InputError, match="already has column 'weight'"):
        valuekit.score(clash, scored["run"])
    assert not out.exists()


def test_defaults_keep_every_row_quietly(scored, tmp_path, capsys):
    """Called with no option, the public functions keep all rows, add no `selected` column, take batch_rows >= 1
    only, and print no progress bar (progress=False)."""
    got = export.score(scored["table"].to_pandas(), scored["run"])
    assert len(got) == N and "selected" not in got.columns
    summary = export.write_scored(scored["path"], scored["run"], tmp_path / "all.parquet")
    assert (
        summary.rows_in == summary.rows_out == N
        and summary.selected is None
        and pq.read_table(tmp_path / "all.parquet").num_rows == N
    )
    assert capsys.readouterr().err == ""
    with pytest.raises(InputError, match=r"^batch_rows=0: must be an integer >= 1$") as info:
        export.score(scored["path"], scored["run"], batch_rows=0)
    assert info.value.cli == "--batch-rows 0: must be an integer >= 1"


def test_progress_bar_only_when_asked(scored, tmp_path, monkeypatch):
    """progress defaults to False in score() and write_scored(): the bar is disabled outright (not left to tqdm's
    terminal check); progress=True leaves it to tqdm (disable=None: shown on a terminal)."""
    import tqdm.auto

    seen, real = [], tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: seen.append(k["disable"]) or real(*a, **k))
    export.score(scored["path"], scored["run"])
    export.write_scored(scored["path"], scored["run"], tmp_path / "a.parquet")
    export.score(scored["path"], scored["run"], progress=True)
    assert seen == [True, True, None]


def test_frame_ids_with_missing_values_are_null_ids(scored):
    """pandas marks a missing text id with NaN: it is reported as a null id, not as a type error."""
    df = pd.DataFrame({"id": ["a", np.nan, "c"], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(InputError, match=r"^table to score \(argument `table`\): column 'id' has a null id at row 1$"):
        valuekit.score(df, scored["run"])


def test_selection_bounds_are_inclusive_where_documented():
    """The edges of each range (mutation run, reports/tests.md): top_k 1 and drop_fraction 0 are allowed,
    top_k 0 is not; with no rule and no subset_only the check passes and reports no rule. The message names
    the argument, its command-line form the flag."""
    Selection = export.Selection
    assert Selection().check().has_rule is False
    assert Selection(top_k=1).check().has_rule is True
    assert Selection(drop_fraction=0.0).check().has_rule is True
    assert Selection(keep_fraction=1.0).check().has_rule is True
    with pytest.raises(InputError, match=r"^top_k=0: must be >= 1$") as err:
        Selection(top_k=0).check()
    assert err.value.cli == "--top-k 0: must be >= 1"
    with pytest.raises(InputError, match=r"^keep_fraction=0: must be in \(0, 1\]$"):
        Selection(keep_fraction=0).check()
    with pytest.raises(InputError, match=r"^drop_fraction=1: must be in \[0, 1\)$") as err:
        Selection(drop_fraction=1).check()
    assert err.value.cli == "--drop-fraction 1: must be in [0, 1)"


# ---------------------------------------------------------------- matching by id


def test_ids_not_in_run_are_listed(scored, tmp_path):
    t = scored["table"]
    ids = t.column("id").to_numpy().copy()
    ids[[3, 10, 11]] = [9001, 9002, 9003]
    bad = t.set_column(0, "id", pa.array(ids))
    with pytest.raises(InputError, match=r"3 id\(s\) in column 'id' are not in run .*first: 9001, 9002, 9003"):
        valuekit.score(bad, scored["run"])
    orig = t.column("id").to_numpy()
    dup = t.set_column(0, "id", pa.array(np.r_[orig[:1], orig[:-1]]))
    with pytest.raises(InputError, match=f"duplicate id {orig[0]} \\(1 duplicates\\)"):
        valuekit.score(dup, scored["run"])


def test_string_ids_subset_and_order(tmp_path):
    ids = np.array([f"ex-{i:03d}" for i in range(40)], dtype=object)
    value, weight, _ = values_for(ids)
    run = make_run(tmp_path / "run", ids, value, weight=weight)
    # The table holds 25 of the run's rows in another order: matched by id, weight mean 1 over these rows.
    pick = np.random.default_rng(5).permutation(40)[:25]
    df = pd.DataFrame({"id": ids[pick], "x": np.arange(25.0)})
    res = valuekit.score(df, run)
    assert list(res["id"]) == list(ids[pick]) and list(res["x"]) == list(range(25))
    np.testing.assert_array_equal(res["value"].to_numpy(), value[pick])
    np.testing.assert_allclose(res["weight"].to_numpy(), weight[pick] * 25 / weight[pick].sum())
    np.testing.assert_array_equal(res["rank"].to_numpy(), expected_rank(value[pick]))
    path = tmp_path / "t.parquet"  # the same through a file, streamed
    df.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(valuekit.score(path, run, out=tmp_path / "o.parquet", batch_rows=4)),
                                  res)
    with pytest.raises(InputError, match=r"1 id\(s\).*first: 'nope'"):
        valuekit.score(pd.DataFrame({"id": ["ex-001", "nope"]}), run)


def test_int_table_ids_match_text_run_ids(tmp_path):
    run = make_run(tmp_path / "run", np.array(["1", "2", "3"], dtype=object), [3.0, 1.0, 2.0])
    res = valuekit.score(pd.DataFrame({"id": [3, 1, 2]}), run)
    assert list(res["rank"]) == [2, 1, 3]


# ---------------------------------------------------------------- files: atomic, never the input


def test_refuses_to_overwrite_input(scored, tmp_path):
    before = scored["path"].read_bytes()
    with pytest.raises(InputError, match="never overwrites its input"):
        valuekit.score(scored["path"], scored["run"], out=scored["path"])
    with pytest.raises(InputError, match="never overwrites its input"):
        valuekit.score(scored["path"], scored["run"], out=scored["run"] / "values.parquet")
    df = csv_frame()
    csv = tmp_path / "t.csv"
    df.to_csv(csv, index=False)
    with pytest.raises(InputError, match="never overwrites its input"):
        valuekit.score(csv, make_run(tmp_path / "r2", df["id"].to_numpy(), np.zeros(N)), out=tmp_path / "." / "t.csv")
    assert scored["path"].read_bytes() == before


def test_interrupted_parquet_write_leaves_no_file(scored, tmp_path, monkeypatch):
    out = tmp_path / "exp" / "scored.parquet"
    out.parent.mkdir()
    monkeypatch.setattr(tablestream, "_ROW_GROUP_ROWS", 5)  # a row group per 5 rows: many writes
    calls = []
    real = pq.ParquetWriter.write_table

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        valuekit.score(scored["path"], scored["run"], out=out, batch_rows=5)
    assert len(calls) == 3 and list(out.parent.iterdir()) == []
    # An earlier good export at the same path survives an interrupted one.
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    valuekit.score(scored["path"], scored["run"], out=out)
    good = out.read_bytes()
    calls.clear()
    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(RuntimeError):  # replacing it (overwrite=True) and failing half-way
        valuekit.score(scored["path"], scored["run"], out=out, batch_rows=5, overwrite=True)
    assert out.read_bytes() == good and sorted(p.name for p in out.parent.iterdir()) == ["scored.parquet"]


def test_interrupted_csv_write_leaves_no_file(tmp_path, monkeypatch):
    df = csv_frame(2000)  # ~150 kB: several 16 kB blocks
    inp = tmp_path / "in.csv"
    df.to_csv(inp, index=False)
    run = make_run(tmp_path / "run", df["id"].to_numpy(), np.arange(2000, dtype=float))
    real, calls = export._extend, []

    def ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(export, "_extend", ctrl_c)
    out = tmp_path / "o" / "out.csv"
    with pytest.raises(KeyboardInterrupt):
        valuekit.score(inp, run, out=out, batch_rows=1)
    assert list(out.parent.iterdir()) == []


# ---------------------------------------------------------------- streaming


def test_streaming_small_batches_equals_one_batch(scored, tmp_path, monkeypatch):
    seen, extended = [], []
    real_iter, real_extend = pq.ParquetFile.iter_batches, export._extend

    def spy(self, *a, **k):
        seen.append(k.get("batch_size"))
        return real_iter(self, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(export, "_extend", lambda batch, *a: extended.append(batch.num_rows) or real_extend(batch, *a))
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    valuekit.score(scored["path"], scored["run"], out=small, batch_rows=3, keep_fraction=0.5)
    assert seen == [3] and len(extended) >= N // 3 and max(extended) == 3 and sum(extended) == N
    valuekit.score(scored["path"], scored["run"], out=big, batch_rows=10**6, keep_fraction=0.5)
    assert seen == [3, 10**6]
    assert_tables_equal(pq.read_table(small), pq.read_table(big))
    # Output row groups gather batches (up to 1M rows), so tiny batches do not make tiny row groups.
    assert pq.ParquetFile(small).metadata.num_row_groups == 1
    monkeypatch.setattr(tablestream, "_ROW_GROUP_ROWS", 20)
    valuekit.score(scored["path"], scored["run"], out=small, batch_rows=3, keep_fraction=0.5, overwrite=True)
    meta = pq.ParquetFile(small).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [21, 21, 18]
    assert_tables_equal(pq.read_table(small), pq.read_table(big))


def test_csv_streams_and_adopts_types_of_later_blocks(tmp_path, monkeypatch):
    """open_csv fixes types from its first block; later blocks with floats/values must still come out
    as pyarrow.csv.read_csv types them (the stream restarts with the unified type)."""
    n = 6000
    rng = np.random.default_rng(0)
    late = np.full(n, np.nan)
    late[-5:] = rng.normal(size=5)  # all-empty for most of the file, floats at the end
    ints = np.arange(n).astype(float)
    ints[-1] = 0.5  # ints, then one float
    df = pd.DataFrame({"id": np.arange(n), "late": late, "ints": ints, "s": [f"r{i}" for i in range(n)]})
    df["ints"] = df["ints"].map(lambda v: str(int(v)) if v.is_integer() else str(v))
    inp = tmp_path / "in.csv"
    df.to_csv(inp, index=False)
    run = make_run(tmp_path / "run", np.arange(n), rng.normal(size=n))
    with pacsv.open_csv(inp, read_options=pacsv.ReadOptions(block_size=1 << 14)) as r:
        assert r.schema.field("late").type == pa.null()  # what the first block alone would say
    fixes, states, real_fix = [], [], export._CsvSource._fix

    def spy_fix(self, exc):
        fixes.append(str(exc))
        real_fix(self, exc)
        states.append((dict(self.column_types), self.block_size))

    monkeypatch.setattr(export._CsvSource, "_fix", spy_fix)
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    aborts, real_abort = [], tablestream._FileSink.abort
    monkeypatch.setattr(tablestream._FileSink, "abort", lambda self: aborts.append(self.tmp) or real_abort(self))
    batches, real_extend = [], export._extend
    monkeypatch.setattr(export, "_extend", lambda batch, *a: batches.append(batch.num_rows) or real_extend(batch, *a))
    valuekit.score(inp, run, out=small, batch_rows=50)
    assert len(fixes) >= 2 and any("'late'" in f or "#1" in f for f in fixes)  # it restarted with read_csv's types
    # a conversion error fixes the column's type (as read_csv types it) and keeps the block size
    assert states[-1][0]["late"] == pa.float64() and states[-1][0]["ints"] == pa.float64()
    assert {b for _, b in states} == {tablestream._CSV_MIN_BLOCK}
    assert len(aborts) == len(fixes)  # every restart closed and removed the partial output first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "run", "small.parquet"]
    assert len(batches) > 10 and max(batches) < 1500  # 50 rows x ~17 bytes -> blocks of the 16 KiB minimum
    batches.clear()
    valuekit.score(inp, run, out=big, batch_rows=10**6)
    assert batches == [n]  # 10**6 rows x ~17 bytes is over the file's size: one block
    original = pacsv.read_csv(inp)
    for out in (small, big):
        got = pq.read_table(out)
        assert got.select(original.schema.names).equals(original)
    assert pq.ParquetFile(small).metadata.num_row_groups == 1
    assert_tables_equal(pq.read_table(small), pq.read_table(big))


# ---------------------------------------------------------------- the three workflows


def _noisy_binary(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 3)) + np.where(y[:, None] == 1, 1.0, -1.0) * np.array([1.5, 0.5, 0.0])
    flipped = rng.random(n) < 0.3
    y_obs = np.where(flipped, 1 - y, y)
    df = pd.DataFrame({"id": np.arange(n), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": y_obs})
    return df, flipped


def test_sklearn_sample_weight_changes_the_fit(tmp_path):
    from sklearn.linear_model import LogisticRegression

    df, flipped = _noisy_binary()
    # A run that found the flipped rows: weight 0 for them, value low.
    run = make_run(tmp_path / "run", df["id"].to_numpy(), np.where(flipped, -1.0, 1.0),
                   weight=np.where(flipped, 0.0, 1.0))
    inp = tmp_path / "train.parquet"
    df.to_parquet(inp, index=False)
    scored_df = pd.read_parquet(valuekit.score(inp, run, out=tmp_path / "w.parquet"))
    X, y = scored_df[["a", "b", "c"]].to_numpy(), scored_df["label"].to_numpy()
    weighted = LogisticRegression().fit(X, y, sample_weight=scored_df.weight)
    plain = LogisticRegression().fit(X, y)
    assert np.abs(weighted.coef_ - plain.coef_).max() > 0.3
    # Weight 0 drops a row; the clean rows carry weight n/n_clean, i.e. C scaled by that factor.
    clean = ~flipped
    ref = LogisticRegression(C=len(df) / clean.sum()).fit(X[clean], y[clean])
    np.testing.assert_allclose(weighted.coef_, ref.coef_, rtol=1e-3, atol=1e-3)


def test_torch_weighted_sampler_draws_heavy_rows_more(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import WeightedRandomSampler

    ids = np.arange(20)
    weight = np.where(ids < 5, 4.0, 1.0)  # 5 heavy rows
    run = make_run(tmp_path / "run", ids, -ids.astype(float), weight=weight)
    df = valuekit.score(pd.DataFrame({"id": ids, "x": ids * 2.0}), run)
    draws = 40_000
    # The Series itself (df.weight.to_numpy() works too, but pandas 3 hands torch a read-only array: a warning).
    sampler = WeightedRandomSampler(df.weight, num_samples=draws, replacement=True,
                                    generator=torch.Generator().manual_seed(0))
    freq = np.bincount(np.fromiter(iter(sampler), dtype=np.int64), minlength=20) / draws
    np.testing.assert_allclose(freq, weight / weight.sum(), atol=0.01)
    assert freq[:5].mean() > 3 * freq[5:].mean()


def test_hf_datasets_loads_pruned_parquet(scored, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "pruned.parquet"
    valuekit.score(scored["path"], scored["run"], out=out, keep_fraction=0.5, subset_only=True)
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert ds.num_rows == 30
    assert ds["id"] == pq.read_table(out).column("id").to_pylist()


# ---------------------------------------------------------------- with a real run and the CLI


def test_cli_scores_a_trained_run(tables, tmp_path, capsys):
    from valuekit.cli.main import main

    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.training.loop import run_training

    train_ds = load_table(tables["train"])
    dev_ds = load_table(tables["dev"], like=train_ds, name="dev")
    run = run_training(train_ds, dev_ds, out=tmp_path / "run",
                config=TrainConfig(method="uniform", model="linear", steps=2, batch_size=16, progress=False))
    out = tmp_path / "scored.csv"
    assert main(["score", str(tables["train"]), "--run", str(run.path), "-o", str(out), "--keep-fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "45 selected" in printed
    assert "  value: minus the row's mean training loss over the run" in printed  # what value is, for this method
    got = pd.read_csv(out)
    original = pd.read_parquet(tables["train"])
    pd.testing.assert_frame_equal(got[["id", "label"]], original[["id", "label"]])
    np.testing.assert_allclose(got[["f0", "f1"]].to_numpy(), original[["f0", "f1"]].to_numpy(), rtol=1e-6)
    vals = read_run(run.path).values().set_index("example_id").loc[got["id"]]
    np.testing.assert_array_equal(got["value"].to_numpy(), vals["value"].to_numpy())
    assert got["weight"].mean() == pytest.approx(1.0) and got["selected"].sum() == 45
    # Never-seen rows (value NaN: 2 steps of 16 rows see at most 32 of 90) rank last.
    unseen = got["value"].isna()
    assert unseen.any() and got.loc[unseen, "rank"].min() > got.loc[~unseen, "rank"].max()
    # --rank-by: the top fifth by the run's aum column instead (same value column)
    by_aum = tmp_path / "aum.csv"
    assert main(["score", str(tables["train"]), "--run", str(run.path), "-o", str(by_aum), "--keep-fraction", "0.2",
                 "--rank-by", "aum"]) == 0
    got_aum = pd.read_csv(by_aum)
    np.testing.assert_array_equal(got_aum["value"].to_numpy(), vals["value"].to_numpy())
    np.testing.assert_array_equal(got_aum["rank"].to_numpy(), rank_by_value(vals["aum"].to_numpy()))
    assert (got_aum["selected"] == (got_aum["rank"] <= 18)).all() and got_aum["selected"].sum() == 18
    assert not np.array_equal(got_aum["rank"].to_numpy(), got["rank"].to_numpy())

    # --method trains then exports in one command; a bad id prints one line and exits 2.
    out2 = tmp_path / "one.parquet"
    assert main(["score", str(tables["train"]), "--method", "uniform", "--dev", str(tables["dev"]), "--model",
                 "linear", "--steps", "3", "-o", str(out2), "--top-k", "10", "--subset-only"]) == 0
    assert pq.read_table(out2).num_rows == 10 and (tmp_path / "one.parquet.run" / "values.parquet").exists()
    assert main(["score", str(tables["dev"]), "--run", str(run.path), "-o", str(tmp_path / "x.parquet")]) == 2
    assert "are not in run" in capsys.readouterr().err


def test_temporaries_of_killed_exports_are_removed(tmp_path):
    """A SIGKILLed export leaves .NAME.PID.tmp; the next export to that path removes it (live ones are kept)."""
    import os
    import subprocess
    import sys

    from valuekit.export.tablestream import _remove_stale_temporaries

    out = tmp_path / "scored.parquet"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".scored.parquet.{dead.pid}.tmp"
    live = tmp_path / f".scored.parquet.{os.getpid()}.tmp"
    other = tmp_path / ".other.parquet.1.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    _remove_stale_temporaries(out)
    assert not stale.exists() and live.exists() and other.exists()


def _long_row_csv(path, width):
    rows = ["id,text"] + [f"{i},r{i}" for i in range(300)]
    rows[151] = "150," + "x" * width
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_row_longer_than_a_block_doubles_the_block_up_to_its_limit(tmp_path, monkeypatch):
    """A row that straddles blocks makes the stream restart with twice the block, up to 16 x _CSV_MAX_BLOCK;
    past that the export stops with pyarrow's message (limits made small here so the rows stay small)."""
    monkeypatch.setattr(tablestream, "_CSV_MAX_BLOCK", 1 << 12)  # blocks start at 4 KiB, limit 64 KiB
    run = make_run(tmp_path / "run", np.arange(300), np.linspace(0, 1, 300))
    inp = _long_row_csv(tmp_path / "in.csv", 40_000)  # needs a 64 KiB block: four doublings
    valuekit.score(inp, run, out=tmp_path / "o.parquet", batch_rows=10)
    got = pq.read_table(tmp_path / "o.parquet")
    assert got.select(["id", "text"]).equals(pacsv.read_csv(inp))
    too_long = _long_row_csv(tmp_path / "long.csv", 140_000)  # needs 128 KiB: over the limit
    with pytest.raises(InputError, match=r"long\.csv: cannot read table \(straddling object straddles two block"):
        valuekit.score(too_long, run, out=tmp_path / "p.parquet", batch_rows=10)
    assert not (tmp_path / "p.parquet").exists()


def test_row_groups_close_exactly_at_their_row_and_byte_limits(tmp_path, monkeypatch):
    """A row group is written as soon as the gathered batches reach _ROW_GROUP_ROWS rows or _ROW_GROUP_BYTES
    bytes (>=, counted afresh after every flush): numeric batches of 5 rows make groups of exactly 20 rows."""
    n = 60
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "x": np.linspace(0, 1, n)}), inp)
    run = make_run(tmp_path / "run", np.arange(n), np.linspace(1, 0, n))
    sizes, real_write = [], tablestream._FileSink.write
    monkeypatch.setattr(tablestream._FileSink, "write", lambda self, b: sizes.append(b.nbytes) or real_write(self, b))

    def groups(out):
        meta = pq.ParquetFile(out).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    for limit in (20, 16):  # reached exactly by 4 batches / just missed by 3
        monkeypatch.setattr(tablestream, "_ROW_GROUP_ROWS", limit)
        valuekit.score(inp, run, out=tmp_path / f"r{limit}.parquet", batch_rows=5)
        assert groups(tmp_path / f"r{limit}.parquet") == [20, 20, 20], limit
    per_batch = sizes[0]
    assert set(sizes) == {per_batch}  # every 5-row batch has the same size
    monkeypatch.setattr(tablestream, "_ROW_GROUP_ROWS", 10**6)
    for limit in (4 * per_batch, 3 * per_batch + 1):  # reached exactly by 4 batches / just missed by 3
        monkeypatch.setattr(tablestream, "_ROW_GROUP_BYTES", limit)
        valuekit.score(inp, run, out=tmp_path / f"b{limit}.parquet", batch_rows=5)
        assert groups(tmp_path / f"b{limit}.parquet") == [20, 20, 20], limit


def test_dataframe_to_csv_writes_no_index_column(tmp_path):
    """A DataFrame scored into a CSV: its columns and the added ones, no pandas index column."""
    df = pd.DataFrame({"id": [5, 6, 7], "x": [0.5, 1.5, 2.5]}, index=[10, 11, 12])
    run = make_run(tmp_path / "run", [5, 6, 7], [0.2, 0.9, 0.4])
    valuekit.score(df, run, out=tmp_path / "o.csv")
    got = pd.read_csv(tmp_path / "o.csv")
    assert list(got.columns) == ["id", "x", "weight", "value", "value_std", "rank"]
    assert got.id.tolist() == [5, 6, 7] and got["rank"].tolist() == [3, 1, 2]


def test_unknown_table_suffix_is_named(tmp_path):
    run = make_run(tmp_path / "run", [1, 2], [0.1, 0.2])
    for name, shown in (("t.txt", "'.txt'"), ("table", "'(no extension)'")):
        (tmp_path / name).write_text("id\n1\n2\n")
        with pytest.raises(
            InputError, match=rf"{name}: score reads \.parquet or \.csv tables, not {re.escape(shown)}$"
        ):
            valuekit.score(tmp_path / name, run)
