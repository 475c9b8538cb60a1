"""Load and validate training tables; prepare bundled real data sets with label noise and imbalance.

Tables come as Parquet, CSV, `.npz` or a pandas DataFrame. Columns: `id`, `label`,
features (numeric columns, or one list<float> column such as a flattened image),
optional `source`, and the evaluation-only columns `is_noisy` / `clean_label`,
which trainers never see (`ValueDataset.trainer_view()` leaves them out).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from valuekit.data.memory import fix_mmap_threshold, shared_strings
from valuekit.errors import InputError, refusal

if TYPE_CHECKING:  # the tensors of a ValueDataset; torch itself is imported when a table is loaded
    import torch

EVAL_COLUMNS = ("is_noisy", "clean_label")
IMAGE_SHAPE_KEY = b"valuekit.image_shape"
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".npz")


@dataclass
class ValueDataset:
    """One table in memory: what trainers see (ids, x, y, source) and what only evaluation sees."""

    ids: np.ndarray  # int64 or object (str)
    x: torch.Tensor  # float32 (N, D), D = prod(image_shape) for images
    y: torch.Tensor  # int64 class codes (N,)
    classes: list[str]  # class code -> original label, as text
    source: np.ndarray | None = None  # object (str) per row
    is_noisy: np.ndarray | None = None  # evaluation only
    clean_label: np.ndarray | None = None  # evaluation only, class codes (-1 unknown)
    image_shape: tuple[int, ...] | None = None
    feature_cols: list[str] = field(default_factory=list)
    name: str = "table"
    path: str | None = None
    file_sha256: str | None = None
    group: np.ndarray | None = None  # text-pair tables: int64 target-sentence id per row (load_text_pairs)
    text: dict | None = None  # a tokenized text column: the tokenizer's describe(), text_col, max_len (run.json)
    where: str | None = None  # how messages name a table that is not a file ("dev table (argument `dev`)")
    weight: np.ndarray | None = None  # fixed float64 per-row loss weights, mean 1 (load_table's weight_col)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def id_type(self) -> str:
        return "int64" if self.ids.dtype.kind in "iu" else "string"

    @property
    def sources(self) -> list[str]:
        return [] if self.source is None else sorted(set(self.source.tolist()))

    def trainer_view(self) -> ValueDataset:
        """The same data without the evaluation-only columns: the only form trainers receive."""
        return ValueDataset(
            ids=self.ids, x=self.x, y=self.y, classes=self.classes, source=self.source,
            image_shape=self.image_shape, feature_cols=self.feature_cols, name=self.name,
            path=self.path, file_sha256=self.file_sha256, group=self.group, text=self.text, where=self.where,
            weight=self.weight,
        )

    def fingerprint(self) -> str:
        """Hash of what a trainer sees (ids, features, labels, sources); stable across file rewrites."""
        h = hashlib.sha256()
        h.update(np.asarray(self.ids).astype(str).tobytes() if self.ids.dtype == object else self.ids.tobytes())
        for part in (self.x, self.y):  # packed token rows hash as their dense form, a block at a time
            if hasattr(part, "feed"):
                part.feed(h)
            else:
                h.update(part.digest() if hasattr(part, "digest") else part.numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        if self.source is not None:
            h.update("\x00".join(self.source.tolist()).encode())
        if self.group is not None:
            h.update(np.asarray(self.group, dtype=np.int64).tobytes())
        if self.weight is not None:
            h.update(b"weight" + np.asarray(self.weight, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name, "path": self.path, "file_sha256": self.file_sha256,
            "n_rows": len(self), "fingerprint": self.fingerprint(), **({"text": self.text} if self.text else {}),
        }


# ---------------------------------------------------------------- reading


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_any(source, *, name: str = "table", defer_images: bool = False) -> tuple[pd.DataFrame, dict, str | None]:
    """Read a path or DataFrame into (DataFrame, metadata, path). Raises InputError naming the file.
    `defer_images`: a Parquet file's encoded-image columns are not read; their names: metadata["deferred_images"]."""
    if isinstance(source, pd.DataFrame):
        return source, dict(source.attrs), None
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file ({name} table)")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {'/'.join(TABLE_SUFFIXES)} file ({name} table)")
    suffix = path.suffix.lower()
    meta: dict = {}
    try:
        if suffix in (".parquet", ".pq"):
            schema = pq.read_schema(path)
            deferred = [f.name for f in schema if arrow_image_type(f.type) is not None] if defer_images else []
            table = pq.read_table(path, columns=[c for c in schema.names if c not in deferred] if deferred else None)
            if deferred:
                meta["deferred_images"] = deferred
            raw = table.schema.metadata or {}
            if IMAGE_SHAPE_KEY in raw:
                try:
                    declared = json.loads(raw[IMAGE_SHAPE_KEY])
                except ValueError:
                    declared = raw[IMAGE_SHAPE_KEY][:40].decode(errors="replace")
                meta["image_shape"] = check_image_shape(declared, f"{path}: metadata {IMAGE_SHAPE_KEY.decode()}")
            # encoded image columns stay Arrow-backed (no Python object per row; valuekit.data.images.packed_column)
            df = table.to_pandas(types_mapper=arrow_image_type)
        elif suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix == ".npz":
            df, meta = _npz_to_frame(path)
        else:
            raise InputError(
                f"{path}: unknown table format {suffix or '(no extension)'!r}; use one of {', '.join(TABLE_SUFFIXES)}"
            )
    except InputError:
        raise
    except Exception as exc:  # pyarrow/pandas errors on corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read {name} table ({first})") from None
    return df, meta, str(path)


def arrow_image_type(t):
    """pd.ArrowDtype for binary columns and {bytes, path} structs, None (pandas' default) otherwise."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pd.ArrowDtype(t)
    if (
        pa.types.is_struct(t)
        and t.get_field_index("bytes") >= 0
        and {t.field(i).name for i in range(t.num_fields)} <= {"bytes", "path"}
    ):
        return pd.ArrowDtype(t)
    return None


def _npz_to_frame(path: Path) -> tuple[pd.DataFrame, dict]:
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if "x" not in keys or "y" not in keys:
            raise InputError(f"{path}: .npz needs arrays 'x' and 'y' (found {sorted(keys)})")
        x, y = z["x"], z["y"]
        ids = z["ids"] if "ids" in keys else np.arange(len(y))
        extra = {k: z[k] for k in ("source", *EVAL_COLUMNS) if k in keys}
    meta = {}
    if x.ndim > 2:
        shape = list(x.shape[1:])
        meta["image_shape"] = [1, *shape] if len(shape) == 2 else shape
    flat = x.reshape(len(x), -1).astype(np.float32)
    df = pd.DataFrame({"id": ids, "label": y})
    if x.ndim > 2:
        df["x"] = list(flat)
    else:
        for j in range(flat.shape[1]):
            df[f"x{j}"] = flat[:, j]
    for k, v in extra.items():
        df[k] = v
    return df, meta


# ---------------------------------------------------------------- validation


def _show(v) -> str:
    """repr of a value as the user wrote it (numpy scalars shown as plain Python values)."""
    return repr(v.item() if isinstance(v, np.generic) else v)


#: the largest image side valuekit accepts in a declared shape (a larger one is a damaged or hostile file)
MAX_IMAGE_SIDE = 65536


def check_image_shape(shape, what: str) -> tuple[int, ...]:
    """A declared image shape (C,H,W; or H,W / a length): 1 to 4 whole numbers in [1, 65536], else one InputError
    `what is ...`."""
    ok = isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in shape)
    if not ok:
        try:
            shown = json.dumps(shape, default=str)
        except ValueError:
            shown = repr(shape)
        raise InputError(f"{what} is {shown[:60]}; expected 1 to 4 whole numbers in [1, {MAX_IMAGE_SIDE}] "
                         f"like [1, 28, 28]")
    return tuple(int(v) for v in shape)


def _where(path, name, where=None) -> str:
    """How messages name a table: its file, else `where` (the argument it came in), else "NAME table (a DataFrame)"."""
    return path or where or f"{name} table (a DataFrame)"


def _require_rows_and_columns(df: pd.DataFrame, where: str, columns) -> None:
    """InputError unless the text table `df` has rows and every one of `columns`."""
    if len(df) == 0:
        raise InputError(f"{where}: table is empty")
    for col in columns:
        if col not in df.columns:
            raise InputError(f"{where}: missing column {col!r} (columns: {list(df.columns)[:12]})")


def _ids(ids: pd.Series, where: str, id_col: str) -> np.ndarray:
    """The id column as int64 (integer ids) or str objects; null and duplicate ids are errors."""
    if ids.isna().any():
        raise InputError(f"{where}: column {id_col!r} has a null id at row {int(np.flatnonzero(ids.isna())[0])}")
    ids_np = ids.to_numpy()
    if ids_np.dtype == object:
        odd = next((i for i, v in enumerate(ids_np) if not isinstance(v, (str, bytes, int, float, np.generic))), None)
        if odd is not None:
            raise refusal(f"{where}: column {id_col!r} holds {type(ids_np[odd]).__name__} values (row {odd}), "
                             f"not ids; give the id column with --id-col")
    ids_np = ids_np.astype(np.int64) if ids_np.dtype.kind in "iu" else ids.astype(str).to_numpy(dtype=object)
    if ids_np.dtype == object:  # an empty field of a text file is a missing id, not the id ''
        blank = np.flatnonzero([not v.strip() for v in ids_np])
        if len(blank):
            raise InputError(f"{where}: column {id_col!r} has an empty id at row {int(blank[0])}")
    # duplicates are looked for after the conversion: 1 and '1' are one id in values.parquet
    dup = pd.Series(ids_np)
    dup = dup[dup.duplicated()]
    if len(dup):
        raise InputError(f"{where}: column {id_col!r} has duplicate id {_show(dup.iloc[0])} ({len(dup)} duplicates"
                         f"{', after reading every id as text' if ids.to_numpy().dtype == object else ''})")
    return ids_np


def _labels(labels: pd.Series, where: str, label_col: str, ids_np: np.ndarray, like):
    """(classes, class -> code, codes): classes sorted from the table, or the training table's (`like`)."""
    if labels.isna().any():
        row = int(np.flatnonzero(labels.isna())[0])
        raise InputError(f"{where}: column {label_col!r} has a null label at id {_show(ids_np[row])}")
    if labels.dtype == object:
        odd = next((i for i, v in enumerate(labels.to_numpy()) if isinstance(v, (list, tuple, dict, np.ndarray))), None)
        if odd is not None:
            raise refusal(f"{where}: column {label_col!r} holds {type(labels.iloc[odd]).__name__} values (id "
                             f"{_show(ids_np[odd])}), not labels; give the label column with --label-col")
    texts = label_text(labels)
    if like is None:
        classes = sorted(set(texts.tolist()), key=_class_sort_key)
        if len(classes) < 2:
            raise InputError(f"{where}: column {label_col!r} has a single class {classes[0]!r}; need at least 2")
    else:
        classes = like.classes
        unknown = sorted(set(texts.tolist()) - set(classes), key=_class_sort_key)
        if unknown:
            raise InputError(
                f"{where}: column {label_col!r} has label {unknown[0]!r} not present in the training table "
                f"(train classes: {classes[:10]})"
            )
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[t] for t in texts], dtype=np.int64)
    return classes, code, y


def load_table(
    source,
    *,
    id_col: str = "id",
    label_col: str = "label",
    source_col: str = "source",
    feature_cols: list[str] | None = None,
    image_shape: tuple[int, ...] | None = None,
    image_size: tuple[int, int] | None = None,
    stream: bool | str = "auto",
    like: ValueDataset | None = None,
    name: str = "train",
    tokenizer=None,
    text_col: str = "text",
    max_len: int = 256,
    where: str | None = None,
    weight_col: str | None = None,
) -> ValueDataset:
    """Load a table and validate it once; `like` aligns a dev/test table to the training table. Messages name the
    file, or for a DataFrame `where` (the argument it came in, e.g. "dev table (argument `dev`)").

    `weight_col` names a column of fixed per-row loss weights (finite, >= 0, not all 0; e.g. the `weight` column
    `valuekit score` writes): it is no feature, and it is rescaled to mean 1 (`ValueDataset.weight`) so that the
    weights change which rows count, not the step size.

    An image column (encoded PNG/JPEG bytes, the Hugging Face `{bytes, path}` struct, or paths relative
    to the table's folder) is decoded with PIL into (C, H, W) images scaled to [0, 1]: grey images give
    C = 1, any colour image makes every row RGB (C = 3, alpha dropped); `image_size` (H, W) resizes
    every image, otherwise all must have the same size. `stream` (True / False / "auto": when the
    decoded pixels would pass STREAM_BYTES) keeps the images encoded and decodes the rows a batch needs
    (`valuekit.data.images.ImageRows`): a Parquet file's bytes in a temporary file, read a row group at a time
    (`spill_image_column`), a DataFrame's in its own buffer; numeric tables are always held in memory.
    Errors name the file, the column and the offending value (for images: the row's id and the image file).
    With a `tokenizer`, see `_tokenize_text`.
    """
    import torch
    fix_mmap_threshold()  # $VALUEKIT_MALLOC=steady: before the table's arrays (valuekit.data.memory)
    if stream not in (True, False, "auto"):
        raise InputError(f"stream={stream!r}: use True, False or 'auto'")
    if image_shape is not None:
        image_shape = check_image_shape(image_shape, f"image_shape={image_shape!r}")
    df, meta, path = read_any(source, name=name, defer_images=stream is not False)
    deferred = meta.get("deferred_images", [])
    where = _where(path, name, where)
    if len(df) == 0:
        raise InputError(f"{where}: table is empty")
    for col, opt in ((id_col, "--id-col"), (label_col, "--label-col"), (weight_col, "--weight-col")):
        if col is not None and col not in df.columns:
            raise InputError(
                f"{where}: missing column {col!r} (choose another with {opt}; columns: {list(df.columns)[:12]})"
            )
    ids_np = _ids(df[id_col], where, id_col)
    classes, code, y = _labels(df[label_col], where, label_col, ids_np, like)

    src = None
    if source_col in df.columns:
        if df[source_col].isna().any():
            row = int(np.flatnonzero(df[source_col].isna())[0])
            raise InputError(f"{where}: column {source_col!r} has a null source at id {_show(ids_np[row])}")
        src = shared_strings(df[source_col])

    # a text classification table (with a tokenizer): the text column becomes token-id lists
    df, text = _tokenize_text(df, tokenizer, text_col, max_len=max_len, like=like, where=where, ids=ids_np)
    feature_cols = feature_cols or ([text_col] if text else None)
    reserved = {id_col, label_col, source_col, *EVAL_COLUMNS, *([weight_col] if weight_col else [])}
    weight = None if weight_col is None else _weights(df[weight_col], where, weight_col, ids_np)
    if like is not None and feature_cols is None:
        feature_cols = like.feature_cols
    base = Path(path).parent if path else Path.cwd()
    image_col = _image_column(df, reserved, feature_cols, where, deferred=deferred)
    if image_col is not None:
        want = tuple(like.image_shape) if like is not None and like.image_shape else None
        how = dict(where=where, col=image_col, ids=ids_np, base=base, size=image_size,
                   channels=want[0] if want else None, expect_hw=want[1:] if want and image_size is None else None)
        x, decoded_shape = _image_rows(df, path, stream, deferred=image_col in deferred, want=want, **how)
        if image_shape is not None and tuple(int(v) for v in image_shape) != decoded_shape:
            raise refusal(f"{where}: --image-shape {tuple(image_shape)} differs from the decoded images' "
                             f"{decoded_shape} in column {image_col!r} (leave it out, or use --image-size H,W)")
        feature_cols, image_shape = [image_col], decoded_shape
    else:
        x, feature_cols, list_shape = feature_matrix(df, where, reserved, feature_cols, ids_np)
    # A dev/test table's own image shape (file metadata or option) must agree with the training table's.
    shape = image_shape or meta.get("image_shape") or (like.image_shape if like is not None else None)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        if int(np.prod(shape)) != x.shape[1]:
            raise InputError(f"{where}: image shape {shape} does not match {x.shape[1]} feature values per row")
    if like is not None:
        if feature_cols != like.feature_cols:
            raise InputError(
                f"{where}: feature columns {feature_cols[:8]} differ from the training table's {like.feature_cols[:8]}"
            )
        if x.shape[1] != like.x.shape[1]:
            raise InputError(f"{where}: {x.shape[1]} feature values per row, the training table has {like.x.shape[1]}")
        if shape != like.image_shape:
            raise InputError(f"{where}: image shape {shape} differs from the training table's {like.image_shape}")

    is_noisy = df["is_noisy"].to_numpy().astype(bool) if "is_noisy" in df.columns else None
    clean = None
    if "clean_label" in df.columns:
        clean = np.array([code.get(t, -1) for t in label_text(df["clean_label"])], dtype=np.int64)

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, dtype=np.float32))
    return ValueDataset(
        ids=ids_np, x=x, y=torch.from_numpy(y), classes=classes, source=src,
        is_noisy=is_noisy, clean_label=clean, image_shape=shape, feature_cols=feature_cols, name=name,
        path=path, file_sha256=_file_sha256(Path(path)) if path else None, text=text, where=where, weight=weight,
    )


def _weights(col: pd.Series, where: str, name: str, ids: np.ndarray) -> np.ndarray:
    """A weight column as float64 rescaled to mean 1; InputError naming the first bad row."""
    w = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where}: column {name!r} at id {_show(ids[row])}: {col.iloc[row]} is not a finite "
                         "weight >= 0")
    if not w.sum() > 0:
        raise InputError(f"{where}: column {name!r}: every weight is 0")
    return w / w.mean()


def _tokenize_text(df: pd.DataFrame, tokenizer, text_col: str, *, max_len: int, like, where: str,
                   ids) -> tuple[pd.DataFrame, dict | None]:
    """The table with the string column `text_col` replaced by each row's token ids, cut to `max_len` and padded
    to the longest training row (dev/test: to the training width), the one feature of a user's text model;
    and what run.json records of it (the tokenizer's describe(), text_col, max_len). Without a tokenizer: the
    table as it is and None. A dev/test table (`like`) must be tokenized as the training table was."""
    if tokenizer is None:
        if like is not None and like.text is not None:
            raise InputError(f"{where}: the training table's column {like.text['text_col']!r} was tokenized; "
                             f"give this table the same tokenizer")
        return df, None
    from valuekit.data.text import token_id_rows

    if text_col not in df.columns:
        raise refusal(f"{where}: missing text column {text_col!r} for --tokenizer (choose it with --text-col; "
                         f"columns: {list(df.columns)[:12]})")
    width = like.x.shape[1] if like is not None else None
    rows = token_id_rows(df[text_col].to_numpy(dtype=object), tokenizer, max_len=max_len, width=width, where=where,
                         col=text_col, ids=ids)
    describe = getattr(tokenizer, "describe", None)
    text = {"tokenizer": describe() if callable(describe) else {"kind": type(tokenizer).__name__},
            "text_col": text_col, "max_len": int(max_len)}
    if like is not None and text != like.text:
        raise InputError(f"{where}: tokenized with {text}, the training table with {like.text}")
    return df.assign(**{text_col: pd.Series(rows, index=df.index)}), text


def _class_sort_key(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def label_text(labels: pd.Series) -> np.ndarray:
    """Class names as text; integral floats (CSV round trips) are written without '.0'."""
    values = labels.to_numpy()
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    return np.array([str(v) for v in values], dtype=object)


def _is_list_column(s: pd.Series) -> bool:
    if len(s) == 0:
        return False
    first = s.iloc[0]
    return isinstance(first, (list, tuple, np.ndarray))


def feature_matrix(df, where, reserved, feature_cols, ids):
    if feature_cols is None:
        candidates = [c for c in df.columns if c not in reserved]
    else:
        missing = [c for c in feature_cols if c not in df.columns]
        if missing:
            raise InputError(f"{where}: feature column {missing[0]!r} not found (columns: {list(df.columns)[:12]})")
        candidates = list(feature_cols)
    if not candidates:
        raise InputError(f"{where}: no feature columns (every column is id/label/source/evaluation)")
    list_cols = [c for c in candidates if df[c].dtype == object and _is_list_column(df[c])]
    if list_cols:
        if len(candidates) > 1:
            raise refusal(
                f"{where}: list column {list_cols[0]!r} must be the only feature column "
                f"(also found {[c for c in candidates if c != list_cols[0]][:5]}; choose with --feature-cols)"
            )
        col = list_cols[0]
        rows = df[col].to_numpy()
        for i, r in enumerate(rows):
            if r is None or not isinstance(r, (list, tuple, np.ndarray)):
                raise InputError(f"{where}: column {col!r} has a missing value at id {_show(ids[i])}")
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise InputError(f"{where}: column {col!r} has rows of different lengths {sorted(lengths)[:5]}")
        if lengths == {0}:
            raise InputError(f"{where}: column {col!r} holds only empty lists (no feature values)")
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: named below, no warning
                x = np.stack([np.asarray(r, dtype=np.float32) for r in rows])
        except (TypeError, ValueError):
            raise InputError(f"{where}: column {col!r} holds non-numeric values") from None
        _check_finite(x, where, [col] * x.shape[1], ids, original=lambda r, c: np.asarray(rows[r])[c])
        return x, [col], x.shape[1:]
    for c in candidates:
        kind = df[c].dtype.kind
        if kind not in "biuf":
            example = df[c].dropna().iloc[0] if df[c].notna().any() else None
            raise refusal(
                f"{where}: column {c!r} is not numeric (e.g. {example!r}); declare features with --feature-cols "
                f"or drop it" + ("; a text column: tokenize it with --tokenizer DIR (--text-col NAME)"
                                 if isinstance(example, str) else "")
            )
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: named below, no warning
        x = df[candidates].to_numpy(dtype=np.float32, na_value=np.nan)
    _check_finite(x, where, candidates, ids, original=lambda r, c: df[candidates[c]].iloc[r])
    return x, [str(c) for c in candidates], None


IMAGE_FORMATS = ("array", "png", "folder")
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face datasets' Image layout
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_kind(s: pd.Series) -> str | None:
    """'bytes' (encoded image bytes), 'struct' ({bytes, path} as Hugging Face datasets writes), 'path' (image
    file names) or None, judged from the column's first non-null value."""
    if isinstance(s.dtype, pd.ArrowDtype):
        t = s.dtype.pyarrow_dtype
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t):
            return "packed" if arrow_image_type(t) is not None else None
    if not (s.dtype == object or pd.api.types.is_string_dtype(s.dtype)) or not s.notna().any():
        return None
    first = s[s.notna()].iloc[0]
    if isinstance(first, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(first, dict) and set(first) & {"bytes", "path"} and set(first) <= {"bytes", "path"}:
        return "struct"
    if isinstance(first, str) and first.lower().endswith(IMAGE_SUFFIXES):
        return "path"
    return None


def _image_column(df: pd.DataFrame, reserved, feature_cols, where: str = "table", *, deferred=()) -> str | None:
    """The image column among the feature candidates (it must be the only feature column), or None.
    `deferred`: image columns of the file that `df` does not hold (`read_any(defer_images=True)`)."""
    columns = [*df.columns, *deferred]
    candidates = [c for c in columns if c not in reserved] if feature_cols is None else list(feature_cols)
    found = [c for c in candidates if c in deferred or (c in df.columns and image_kind(df[c]) is not None)]
    if not found:
        return None
    if len(candidates) > 1:
        others = [c for c in candidates if c != found[0]][:5]
        raise refusal(
            f"{where}: image column {found[0]!r} must be the only feature column (also found {others}; choose "
            f"with --feature-cols)"
        )
    return found[0]


STREAM_BYTES = 1 << 30  # stream="auto": keep images encoded when the decoded pixels would exceed 1 GiB


def decode_image_column(values: pd.Series, *, where: str, col: str, ids, base: Path,
                        size: tuple[int, int] | None = None, channels: int | None = None,
                        expect_hw: tuple[int, int] | None = None, stream: bool = False):
    """Decode an image column into float32 rows (N, C*H*W) in [0, 1] (or an `ImageRows` that decodes on
    indexing, when `stream`) and the shape (C, H, W); see `valuekit.data.images.read_image_column`."""
    from valuekit.data.images import packed_column, read_image_column

    kind = image_kind(values)
    assert kind is not None, col  # the caller found an image column here
    data = packed_column(pa.array(values.array)) if kind == "packed" else values.tolist()
    return read_image_column(data, kind, where=where, col=col, ids=ids, base=base,
                             size=size, channels=channels, expect_hw=expect_hw, stream=stream)


def _image_rows(df: pd.DataFrame, path, stream, *, deferred: bool, want, **how):
    """(rows, (C, H, W)) of column how["col"]: spilled a row group at a time if deferred and streamed, else decoded."""
    col, size = how["col"], how["size"]
    if deferred and stream == "auto":
        stream = _decoded_bytes(_parquet_column(path, col, rows=64), size, want, rows=len(df)) > STREAM_BYTES
    if deferred and stream:
        from valuekit.data.images import spill_image_column

        return spill_image_column(path, **how)
    values = _parquet_column(path, col) if deferred else df[col]
    if stream == "auto":
        stream = _decoded_bytes(values, size, want) > STREAM_BYTES
    return decode_image_column(values, stream=bool(stream), **how)


def _parquet_column(path, col: str, rows: int | None = None) -> pd.Series:
    """Column `col` of a Parquet file (its first `rows` values only, when given), Arrow-backed as `read_any`."""
    table = pq.read_table(path, columns=[col]) if rows is None else \
        pa.Table.from_batches([next(pq.ParquetFile(path).iter_batches(batch_size=rows, columns=[col]))])
    return table.to_pandas(types_mapper=arrow_image_type)[col]


def _decoded_bytes(values: pd.Series, size, want, *, rows: int | None = None) -> int:
    """Bytes of the decoded float32 pixels of `rows` rows (default len(values)), estimated from the first image
    (its size, or `size`; 3 channels)."""
    if want is not None:
        per_row = int(np.prod(want))
    elif size is not None:
        per_row = 3 * size[0] * size[1]
    else:
        from valuekit.data.images import _open

        present = values[values.notna()]
        if present.empty:
            return 0  # no image among these rows: decide eagerly (validation names the empty rows)
        v = present.iloc[0]
        data = v.get("bytes") if isinstance(v, dict) else v
        data = data.as_py() if data is not None and hasattr(data, "as_py") else data
        if not isinstance(data, (bytes, bytearray)):
            return 0  # file paths: decide eagerly (the files are small or the user says --stream)
        try:
            w, h = _open(bytes(data)).size
        except Exception:  # undecodable: decide eagerly, where decoding names the file, column and row
            return 0
        per_row = 3 * w * h
    return 4 * per_row * (len(values) if rows is None else rows)


def encode_png(image: np.ndarray) -> bytes:
    """(C, H, W) or (H, W) floats in [0, 1] (or uint8) -> PNG bytes (grey for C = 1, RGB for C = 3)."""
    import io

    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (a.astype(np.float64) * 255.0).round().clip(0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _check_finite(x, where, cols, ids, original=None):
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        value = x[r, c] if original is None else original(r, c)
        if isinstance(value, (int, float, np.number)) and np.isfinite(value):  # finite in the file: beyond float32
            raise InputError(f"{where}: column {cols[c]!r} has value {value:g} at id {_show(ids[r])}; beyond float32")
        raise InputError(
            f"{where}: column {cols[c]!r} has value {value} at id {_show(ids[r])}; features must be finite"
        )


# ---------------------------------------------------------------- text pairs (translation)


def load_text_pairs(
    source,
    *,
    src_col: str = "src_text",
    tgt_col: str = "tgt_text",
    id_col: str = "id",
    source_col: str = "source",
    group_col: str = "group",
    max_len: int = 80,
    name: str = "train",
) -> ValueDataset:
    """Load a translation table (e.g. `valuekit data prepare multilingual`) as byte-id tensors.

    x: (N, max_len) float32 source byte ids (valuekit.models.builtin.encode_bytes: bytes + 3, EOS = 2, PAD = 0),
    y: (N, max_len) int64 target byte ids; `classes` are the vocabulary's token names, so `num_classes`
    is the vocabulary size; `group` (int64) identifies the target sentence. Use with `--model seq2seq`.
    """
    from valuekit.models.builtin import BYTE_VOCAB, encode_bytes

    df, _, path = read_any(source, name=name)
    where = _where(path, name)
    _require_rows_and_columns(df, where, (id_col, src_col, tgt_col))
    if max_len < 2:
        raise InputError(f"max_len {max_len}: must be >= 2")
    ids_np = _ids(df[id_col], where, id_col)
    for col in (src_col, tgt_col):
        bad = df[col].isna() | (df[col].astype(str).str.len() == 0)
        if bad.any():
            raise InputError(f"{where}: column {col!r} has an empty text at id {ids_np[int(np.flatnonzero(bad)[0])]!r}")
    src = shared_strings(df[source_col]) if source_col in df.columns else None
    group = None
    if group_col in df.columns:
        if df[group_col].dtype.kind not in "iu":
            raise InputError(f"{where}: column {group_col!r} must hold integer sentence ids")
        group = df[group_col].to_numpy().astype(np.int64)
    x = encode_bytes(df[src_col].astype(str).tolist(), max_len).float()
    y = encode_bytes(df[tgt_col].astype(str).tolist(), max_len)
    classes = ["<pad>", "<bos>", "<eos>"] + [f"0x{b:02x}" for b in range(256)]
    assert len(classes) == BYTE_VOCAB
    return ValueDataset(
        ids=ids_np, x=x, y=y, classes=classes, source=src, feature_cols=[src_col], name=name, path=path,
        file_sha256=_file_sha256(Path(path)) if path else None, group=group,
    )
