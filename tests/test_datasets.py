import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs

from valuekit.data.bundled import flip_labels, long_tail, prepare
from valuekit.data.tables import load_table
from valuekit.errors import InputError


def test_parquet_csv_npz_dataframe_load_the_same(tmp_path):
    df = blobs(20, seed=0)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    df.to_csv(tmp_path / "t.csv", index=False)
    codes = pd.Categorical(df.label).codes
    np.savez(tmp_path / "t.npz", x=df[["f0", "f1", "f2", "f3"]].to_numpy(), y=codes, ids=df.id.to_numpy())
    a = load_table(tmp_path / "t.parquet")
    b = load_table(tmp_path / "t.csv")
    c = load_table(df)
    d = load_table(tmp_path / "t.npz")
    for other in (b, c):
        assert other.classes == a.classes == ["c0", "c1", "c2"]
        assert np.array_equal(other.ids, a.ids)
        assert np.allclose(other.x.numpy(), a.x.numpy())
        assert np.array_equal(other.y.numpy(), a.y.numpy())
    assert d.classes == ["0", "1", "2"]
    assert np.array_equal(d.y.numpy(), a.y.numpy())
    assert a.feature_cols == ["f0", "f1", "f2", "f3"] and a.x.shape == (20, 4)
    assert a.path.endswith("t.parquet") and len(a.file_sha256) == 64


def test_list_column_with_image_shape_metadata_and_eval_columns(tmp_path):
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    t = pa.table({"id": ["a", "b", "c", "d", "e", "f"], "label": [1, 0, 1, 0, 1, 0],
                  "img": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4),
                  "is_noisy": [True, False, False, False, False, False], "clean_label": [0, 0, 1, 0, 1, 0],
                  "source": ["s1", "s2", "s1", "s2", "s1", "s2"]})
    t = t.replace_schema_metadata({b"valuekit.image_shape": json.dumps([1, 2, 2]).encode()})
    pq.write_table(t, tmp_path / "img.parquet")
    d = load_table(tmp_path / "img.parquet")
    assert d.image_shape == (1, 2, 2) and d.id_type == "string"
    assert np.array_equal(d.x.numpy(), x)
    assert d.is_noisy.tolist() == [True] + [False] * 5
    assert d.clean_label.tolist() == [0, 0, 1, 0, 1, 0]
    assert d.sources == ["s1", "s2"]
    view = d.trainer_view()
    assert view.is_noisy is None and view.clean_label is None
    assert view.fingerprint() == d.fingerprint()


def test_feature_cols_option_and_custom_column_names():
    df = blobs(10).rename(columns={"id": "key", "label": "target"})
    df["note"] = "x"
    d = load_table(df, id_col="key", label_col="target", feature_cols=["f0", "f2"])
    assert d.feature_cols == ["f0", "f2"] and d.x.shape == (10, 2)


def test_source_column_holds_one_string_object_per_distinct_source(tmp_path):
    # a million-row table's source column costs a pointer a row, not a str object a row (valuekit.data.memory)
    df = blobs(12).assign(source=[f"s{i % 3}" for i in range(12)])
    df.to_parquet(tmp_path / "t.parquet")
    d = load_table(tmp_path / "t.parquet")
    assert d.source.dtype == object and list(d.source) == list(df.source)
    assert len({id(v) for v in d.source}) == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop(columns="label"), "missing column 'label'"),
    (lambda df: df.drop(columns="id"), "missing column 'id'"),
    (lambda df: df.assign(id=[0] * len(df)), "duplicate id 0"),
    (lambda df: df.assign(f1=np.where(df.index == 3, np.nan, df.f1)), "column 'f1' has value nan at id 3"),
    (lambda df: df.assign(f2=np.where(df.index == 4, np.inf, df.f2)), "column 'f2' has value inf at id 4"),
    (lambda df: df.iloc[:0], "table is empty"),
    (lambda df: df.assign(comment="hello"), "column 'comment' is not numeric"),
    (lambda df: df.assign(label=["c0"] * len(df)), "single class 'c0'"),
    (lambda df: df.assign(label=df.label.where(df.index != 2, None)), "null label at id 2"),
])
def test_bad_tables_name_the_problem(tmp_path, mutate, message):
    p = tmp_path / "bad.parquet"
    mutate(blobs(12)).to_parquet(p, index=False)
    with pytest.raises(InputError, match=message) as err:
        load_table(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_unknown_format_and_corrupt_parquet(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_table(tmp_path / "nope.parquet")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown table format '.xlsx'"):
        load_table(tmp_path / "t.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match="cannot read train table"):
        load_table(tmp_path / "bad.parquet")


def test_dev_must_match_train():
    train = load_table(blobs(20), name="train")
    dev = blobs(8, seed=5)
    dev.loc[0, "label"] = "c9"
    with pytest.raises(InputError, match="label 'c9' not present in the training table"):
        load_table(dev, like=train, name="dev")
    with pytest.raises(InputError, match="feature column .f3. not found"):
        load_table(blobs(8, seed=5).rename(columns={"f3": "g3"}), like=train, name="dev")
    ok = load_table(blobs(8, seed=5), like=train, name="dev")
    assert ok.classes == train.classes


def test_flip_labels_exact_count_and_kinds():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    f = flip_labels(y, 0.3, "symmetric", 5, rng)
    assert (f != y).sum() == 30
    p = flip_labels(y, 0.2, "pair", 5, np.random.default_rng(1))
    changed = p != y
    assert changed.sum() == 20 and np.all(p[changed] == (y[changed] + 1) % 5)


def test_long_tail_ratio():
    y = np.repeat(np.arange(4), 100)
    keep = long_tail(y, 10.0, 4, np.random.default_rng(0))
    counts = np.bincount(y[keep], minlength=4)
    assert counts[0] == 100 and counts[-1] == 10
    uneven = np.concatenate([np.zeros(50), np.ones(80), np.full(70, 2)]).astype(int)
    c2 = np.bincount(uneven[long_tail(uneven, 5.0, 3, np.random.default_rng(0))])
    assert c2.max() / c2.min() == 5.0
    assert np.all(np.diff(counts) < 0)


def test_prepare_digits_splits(tmp_path):
    paths = prepare("digits", tmp_path, noise=0.2, imbalance=1.0, dev_size=50, seed=3)
    train, dev, test = (pd.read_parquet(paths[s]) for s in ("train", "dev", "test"))
    assert len(train) + len(dev) + len(test) == 1797
    assert len(dev) == 50 and dev.label.value_counts().nunique() == 1  # class-balanced
    assert not set(train.id) & set(dev.id) and not set(train.id) & set(test.id)
    assert train.is_noisy.sum() == round(0.2 * len(train))
    assert (train.label != train.clean_label).sum() == train.is_noisy.sum()
    assert "is_noisy" not in dev.columns
    d = load_table(paths["train"])
    assert d.image_shape == (1, 8, 8) and d.x.shape[1] == 64 and float(d.x.max()) <= 1.0


def test_prepare_imbalance_and_unknown(tmp_path):
    paths = prepare("wine", tmp_path, imbalance=5.0, dev_size=9, seed=0)
    counts = pd.read_parquet(paths["train"]).label.value_counts()
    assert counts.max() / counts.min() == pytest.approx(5.0, rel=0.1)
    with pytest.raises(InputError, match="unknown dataset 'nope'"):
        prepare("nope", tmp_path)


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion-mnist", tmp_path / "out", from_dir=str(tmp_path))
