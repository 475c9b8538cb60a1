"""Image columns: encoded bytes (PNG/JPEG...), the Hugging Face `{bytes, path}` struct, or image files
named relative to the table, decoded with PIL into (C, H, W) float32 in [0, 1].

`read_image_column` validates every row once (a missing file or an image that does not decode stops
with an InputError naming the row's id and the file) and returns either the decoded rows (N, C*H*W) or,
when streaming, an `ImageRows`: the encoded bytes packed in one buffer, decoded only when rows are
indexed. `spill_image_column` does the same for a Parquet column one row group at a time and keeps
the encoded bytes in a temporary file (`SpillFile`), so resident memory does not grow with the rows.
`ImageRows` behaves like the read-only (N, C*H*W) float32 tensor it stands for wherever valuekit
indexes training rows (`x[idx]`, `x[i:j]`, `x.shape`, `len(x)`, `x.to(device)`), so trainers need
no change and memory holds the encoded bytes (or, spilled, only their offsets), not the pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

from valuekit.data.rowviews import row_index, to_device
from valuekit.errors import InputError, refusal

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
WIDE_GREY = ("I", "I;16", "F")


def _show(v) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def _open(data: bytes):
    """The image's header (PIL.Image.open); an image past Pillow's decompression-bomb limit raises, the warning
    band below it included (an untrusted table should not make valuekit decode 100M-pixel images)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode(data: bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Encoded image -> uint8 (C, H, W) in `mode` (L or RGB), resized to size = (H, W) when given."""
    from PIL import Image

    img = _open(data)
    img.load()
    if img.mode in WIDE_GREY:  # 16-bit / float grey: scale to 8 bits by the image's own range
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        img = Image.fromarray(((arr - lo) / (hi - lo if hi > lo else 1) * 255).round().astype(np.uint8))
    img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _is_colour(data: bytes) -> bool:
    img = _open(data)  # header only, except palettes, which are colour only if an entry is not grey
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        return not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return img.mode not in GREY_MODES


class ImageRows:
    """Encoded images standing in for a read-only (N, C*H*W) float32 tensor; rows are decoded on indexing.

    `files` (paths) are read when indexed; with a `store` (a `SpillFile`) row i's bytes are its bytes
    offsets[i]:offsets[i+1]; otherwise `buf[offsets[i]:offsets[i+1]]` holds them.
    Indexing returns a torch tensor on `device` (copied with non_blocking from pinned memory on CUDA).
    """

    dtype = None  # set on first use to torch.float32 (torch imported lazily)

    def __init__(self, buf: np.ndarray | None, offsets: np.ndarray | None, files: list[str] | None,
                 image_shape: tuple[int, int, int], size: tuple[int, int] | None, device="cpu",
                 store: SpillFile | None = None):
        import torch

        self.buf, self.offsets, self.files, self.store = buf, offsets, files, store
        self.image_shape = tuple(image_shape)
        self.mode = "L" if self.image_shape[0] == 1 else "RGB"
        self.size = size
        self.device = torch.device(device)
        self.dtype = torch.float32
        n = len(files) if files is not None else len(offsets) - 1
        self.shape = torch.Size((n, int(np.prod(self.image_shape))))

    # ---- tensor-like surface

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 2

    def size_(self, d=None):
        return self.shape if d is None else self.shape[d]

    def to(self, device=None, *args, non_blocking: bool = False, **kw) -> ImageRows:
        import torch

        if device is None or not isinstance(device, (str, torch.device)):
            return self
        out = ImageRows.__new__(ImageRows)
        out.__dict__.update(self.__dict__)
        out.device = torch.device(device)
        return out

    def cpu(self) -> ImageRows:
        return self.to("cpu")

    def encoded(self, i: int) -> bytes:
        if self.files is not None:
            return Path(self.files[i]).read_bytes()
        if self.store is not None:
            return self.store.read(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.buf[self.offsets[i]: self.offsets[i + 1]].tobytes()

    def row(self, i: int) -> np.ndarray:
        """Row i decoded: float32 (C*H*W,) in [0, 1]."""
        return decode(self.encoded(int(i)), self.mode, self.size).reshape(-1) / np.float32(255.0)

    def rows(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), self.shape[1]), dtype=np.float32)
        for k, i in enumerate(index):
            out[k] = self.row(i)
        return out

    def __getitem__(self, key):
        import torch

        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.row(int(key) % len(self))).to(self.device)
        if isinstance(key, torch.Tensor) and key.dim() == 0:
            return self[int(key)]
        return to_device(self.rows(row_index(key, len(self))), self.device)

    def numpy(self) -> np.ndarray:
        """Every row decoded (N, C*H*W): as much memory as the eager path."""
        return self.rows(np.arange(len(self)))

    def sample_stats(self, limit: int = 4096) -> tuple[float, float]:
        """Mean and std of the pixels of at most `limit` evenly spaced rows (all rows when N <= limit)."""
        idx = np.unique(np.linspace(0, len(self) - 1, min(limit, len(self))).round().astype(np.int64))
        import torch

        x = torch.from_numpy(self.rows(idx))
        return float(x.mean()), float(x.std())

    def digest(self) -> bytes:
        """Hash of the encoded rows (what a fingerprint of this table's features uses)."""
        h = hashlib.sha256()
        h.update(repr((self.image_shape, self.size)).encode())
        for i in range(len(self)):
            h.update(hashlib.sha256(self.encoded(i)).digest())
        return h.digest()


def packed_column(array) -> tuple[np.ndarray, np.ndarray, np.ndarray, list | None]:
    """An Arrow binary column, or a `{bytes, path}` struct column, as (buf uint8, offsets int64 (N+1), has_bytes
    bool (N), paths or None) without one Python object per row: the bytes stay in Arrow's buffer."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    paths = None
    if pa.types.is_struct(array.type):
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        if "path" in names:
            paths = array.field("path").to_pylist()
        data = array.field("bytes") if "bytes" in names else pa.nulls(len(array), pa.binary())
        valid = np.asarray(array.is_valid()) if array.null_count else np.ones(len(array), bool)
        valid = valid & np.asarray(data.is_valid())
    else:
        data, valid = array, np.asarray(array.is_valid())
    if pa.types.is_null(data.type):
        data = pa.nulls(len(array), pa.binary())
    if pa.types.is_binary(data.type) or pa.types.is_string(data.type):
        data = data.cast(pa.large_binary())
    bufs = data.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[data.offset: data.offset + len(data) + 1] if bufs[1] else \
        np.zeros(len(data) + 1, np.int64)
    buf = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(0, np.uint8)
    return buf, offsets, valid, paths


def augment(x, image_shape, mode: str, generator, *, total: int | None = None, part: slice | None = None,
            pad: int = 4):
    """Train-time augmentation of flat image rows (B, C*H*W): `flip` mirrors each row left-right with
    probability 1/2, `crop` pads the image by `pad` zero pixels and takes an H x W window at a uniformly
    drawn offset (the usual CIFAR recipe). Draws come from `generator`, for `total` rows of the global
    batch of which this process holds `part` (so a torchrun run augments as one process would)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    total = total or b
    part = part or slice(0, b)
    c, h, w = image_shape
    img = x.reshape(b, c, h, w)
    if "flip" in mode:
        flip = (torch.rand(total, generator=generator) < 0.5)[part].to(img.device)
        img = torch.where(flip[:, None, None, None], img.flip(-1), img)
    if "crop" in mode:
        off = torch.randint(0, 2 * pad + 1, (total, 2), generator=generator)[part].tolist()
        padded = F.pad(img, (pad, pad, pad, pad))
        img = torch.stack([padded[i, :, oy: oy + h, ox: ox + w] for i, (oy, ox) in enumerate(off)])
    return img.reshape(b, -1)


def read_image_column(values, kind: str, *, where: str, col: str, ids, base: Path,
                      size: tuple[int, int] | None = None, channels: int | None = None,
                      expect_hw: tuple[int, int] | None = None, stream: bool = False,
                      first_hw: tuple[int, int] | None = None):
    """Validate and decode an image column; returns (rows, (C, H, W)) with rows a float32 array
    (N, C*H*W) in [0, 1], or an `ImageRows` when `stream` (every row is still decoded once here, so
    bad input fails before training; only the encoded bytes are kept).

    `values` is a list of per-row values (bytes, {bytes, path} dicts or path strings, per `kind`) or the
    result of `packed_column` (kind "packed"). `channels` forces 1 (grey) or 3 (RGB); by default any
    colour image makes the whole column RGB. `expect_hw` (a dev/test table): every image must have the
    training table's (H, W). `first_hw`: the (H, W) of the rows before these (a later batch of one column)."""
    from PIL import Image, UnidentifiedImageError

    if kind == "packed":
        buf, offsets, has_bytes, paths = values
        n = len(has_bytes)
    else:
        n = len(values)

    def source(i) -> tuple[bytes | None, str | None]:
        if kind == "packed":
            if has_bytes[i]:
                return buf[offsets[i]: offsets[i + 1]].tobytes(), (paths[i] if paths else None)
            return None, (paths[i] if paths else None)
        v = values[i]
        if kind == "struct" and isinstance(v, dict):
            return v.get("bytes"), v.get("path")
        if kind == "bytes":
            return v, None
        return None, v  # path

    files: list[str | None] = [None] * n  # rows read from an image file: its resolved name

    def fetch(i) -> tuple[bytes, str | None]:
        data, name = source(i)
        if data is None and isinstance(name, str) and name:
            file = Path(name) if Path(name).is_absolute() else base / name
            if not file.is_file():
                raise InputError(f"{where}: column {col!r} at id {_show(ids[i])}: image file {file} not found")
            files[i] = str(file)
            return file.read_bytes(), str(file)
        if data is None:
            raise InputError(f"{where}: column {col!r} has no image at id {_show(ids[i])}")
        return bytes(data), name

    def fail(i, name, exc):
        what = f"image file {name}" if name else "image bytes"
        why = type(exc).__name__
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            why = "it declares more pixels than Pillow's decompression-bomb limit"
        raise InputError(f"{where}: column {col!r} at id {_show(ids[i])}: {what} cannot be decoded "
                         f"({why})") from None

    errors = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)
    if channels is None:
        channels = 1
        for i in range(n):
            data, name = fetch(i)
            try:
                if _is_colour(data):
                    channels = 3
                    break
            except errors as exc:
                fail(i, name, exc)
    mode = "L" if channels == 1 else "RGB"
    first = tuple(first_hw) if first_hw is not None else None
    out = None
    for i in range(n):
        data, name = fetch(i)
        try:
            arr = decode(data, mode, size)
        except errors as exc:
            fail(i, name, exc)
        hw = arr.shape[1:]
        if expect_hw is not None and hw != tuple(expect_hw):
            raise refusal(f"{where}: column {col!r} at id {_show(ids[i])}: image is {hw[1]}x{hw[0]} (WxH), the "
                             f"training table's are {expect_hw[1]}x{expect_hw[0]}; resize with --image-size H,W")
        if first is None:
            first = hw
            if not stream:
                out = np.empty((n, channels * hw[0] * hw[1]), dtype=np.float32)
        elif hw != first:
            raise refusal(f"{where}: column {col!r} at id {_show(ids[i])}: image is {hw[1]}x{hw[0]} (WxH), the "
                             f"first row's is {first[1]}x{first[0]}; resize with --image-size H,W")
        if out is not None:
            out[i] = arr.reshape(-1) / np.float32(255.0)
    shape = (channels, int(first[0]), int(first[1]))
    if not stream:
        return out, shape
    if all(f is not None for f in files):  # every row is a file: keep the names, read on access
        return ImageRows(None, None, files, shape, size), shape
    if kind == "packed" and not any(f is not None for f in files):  # Arrow's buffer as it is
        return ImageRows(buf, offsets, None, shape, size), shape
    chunks = [fetch(i)[0] for i in range(n)]  # mixed bytes and files: pack everything
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return ImageRows(np.frombuffer(b"".join(chunks), dtype=np.uint8), offsets, None, shape, size), shape


class SpillFile:
    """Encoded images appended to a temporary file and read back with `os.pread`: the bytes live in the
    kernel's page cache, not in the process's resident memory. Deleted when the object that created it is
    garbage-collected (copies made by pickling, e.g. for decoding workers, only read)."""

    def __init__(self, directory: str | None = None, *, prefix: str = "valuekit-images-"):
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=directory)
        self._file = os.fdopen(fd, "w+b")
        self.size = 0
        self._finalizer = weakref.finalize(self, _close_and_remove, self._file, self.path)

    def append(self, data) -> None:
        self._file.write(data)
        self.size += len(data)

    def close_writing(self) -> None:
        self._file.flush()

    def read(self, start: int, stop: int) -> bytes:
        return os.pread(self._file.fileno(), stop - start, start)

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.path, self.size = state["path"], state["size"]
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed with the process)


def _close_and_remove(file, path: str) -> None:
    file.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def spill_image_column(path, *, col: str, where: str, ids, base: Path, size: tuple[int, int] | None = None,
                       channels: int | None = None, expect_hw: tuple[int, int] | None = None,
                       batch_rows: int = 4096, directory: str | None = None):
    """`read_image_column(..., stream=True)` for column `col` of the Parquet file `path`, read a row group at a
    time in slices of `batch_rows` rows, each row's encoded bytes appended to a `SpillFile` (in `directory`,
    default the system's temporary folder; images named by path are copied too). Returns (ImageRows, (C, H, W)).
    Resident memory holds one batch and the N+1 offsets."""
    import pyarrow.parquet as pq

    store = SpillFile(directory)
    offsets, start, shape = [np.zeros(1, np.int64)], 0, None
    for batch in _row_batches(pq.ParquetFile(path), col, batch_rows):
        packed = packed_column(batch)
        n = len(packed[2])
        # channels: given (a dev table follows the training table) or each batch's own; a colour batch makes
        # the column RGB, and the grey batches before it were validated all the same (decoding is per row)
        rows, got = read_image_column(packed, "packed", where=where, col=col, ids=ids[start: start + n], base=base,
                                      size=size, channels=channels, expect_hw=expect_hw, stream=True,
                                      first_hw=shape[1:] if shape else None)
        shape = got if shape is None else (max(shape[0], got[0]), *shape[1:])
        end = offsets[-1][-1]
        if rows.buf is not None:
            lo, hi = int(rows.offsets[0]), int(rows.offsets[-1])
            store.append(memoryview(rows.buf[lo:hi]))
            offsets.append(end + rows.offsets[1:] - lo)
        else:
            lengths = np.empty(n, np.int64)
            for i in range(n):
                data = rows.encoded(i)
                store.append(data)
                lengths[i] = len(data)
            offsets.append(end + np.cumsum(lengths))
        start += n
    store.close_writing()
    return ImageRows(None, np.concatenate(offsets), None, shape, size, store=store), shape


def _row_batches(file, col: str, rows: int):
    """Column `col` of a ParquetFile, one row group at a time, in slices of at most `rows` rows (iter_batches
    reads ahead: 34 MiB of Arrow memory for 60,000 PNG rows against 8 MiB a row group at a time)."""
    for g in range(file.num_row_groups):
        column = file.read_row_group(g, columns=[col]).column(0)
        for lo in range(0, len(column), rows):
            yield column.slice(lo, rows)
