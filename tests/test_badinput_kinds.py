"""A generated bad-input suite for the input kinds beyond plain tables: encoded images, token-id lists,
instruction tables, own-model factories and numeric option bounds.

Hypothesis builds each case with at least one fatal fault; every case runs the CLI's main() in-process and must
end with exit 2, exactly one line on stderr, no traceback, every input byte-identical and no run directory (no
new file at all). Every refusal happens before training, so a case costs a load and a model probe. Derandomised:
the same cases on every run; at least CASES per kind (counted).
"""

from __future__ import annotations

import io
import shutil
import string
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import blobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_badinput import _run, refused

CASES = 100  # per input kind
SETTINGS = settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))
FAST = ["--steps", "2", "--batch-size", "2", "--device", "cpu"]
VOCAB = 20  # the token model's embedding size


def _covered(seen: list, faults: list) -> None:
    """At least CASES cases ran, and the derandomised draw reached most of the faults (sampled, not enumerated)."""
    assert len(seen) >= CASES, len(seen)
    assert len(set(seen)) >= (2 * len(faults)) // 3, sorted(set(faults) - set(seen))


def _case_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vk-kinds-"))


def _check(argv, folder: Path, *roots: Path) -> None:
    """refused(), and nothing at all created in the case folder (no run skeleton, no lock, no temporary)."""
    names = {p.name for p in folder.iterdir()}
    refused(argv, folder, *roots)
    assert {p.name for p in folder.iterdir()} == names, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    train, dev = root / "train.parquet", root / "dev.parquet"
    blobs(30, seed=1, classes=2).to_parquet(train, index=False)
    blobs(10, seed=2, classes=2, id_start=1000).to_parquet(dev, index=False)
    run = root / "run"
    code, err = _run(
        ["train", train, "--dev", dev, "--out", run, "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    )
    assert code == 0, err
    return {"root": root, "train": train, "dev": dev, "run": run}


# ---------------------------------------------------------------- images


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _declaring(w: int, h: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 8)) + _chunk(b"IEND", b""))


IMAGE_FAULTS = ["bomb", "junk", "truncated", "empty_bytes", "null", "missing_file", "other_size", "shape_meta",
                "shape_option"]


@st.composite
def image_case(draw):
    n = draw(st.integers(3, 8))
    side = draw(st.integers(3, 6))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    images = [_png(rng.integers(0, 255, (side, side), dtype=np.uint8)) for _ in range(n)]
    fault = draw(st.sampled_from(IMAGE_FAULTS))
    row = draw(st.integers(0, n - 1))
    where = draw(st.sampled_from(["train", "dev"]))
    layout = draw(st.sampled_from(["bytes", "struct", "path"]))
    stream = draw(st.sampled_from(["yes", "no", "auto"]))
    extra = []
    bad: object = None
    if fault == "bomb":
        bad = _declaring(draw(st.integers(20_000, 2**31 - 1)), draw(st.integers(20_000, 2**31 - 1)))
    elif fault == "junk":
        bad = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not b.startswith((b"\x89PNG", b"\xff\xd8"))))
    elif fault == "truncated":
        bad = images[row][: draw(st.integers(1, len(images[row]) - 20))]
    elif fault == "empty_bytes":
        bad = b""
    elif fault == "null":
        bad = None
    elif fault == "missing_file":
        layout, bad = "path", "nowhere/gone.png"
    elif fault == "other_size":
        bad = _png(rng.integers(0, 255, (side + draw(st.integers(1, 3)), side), dtype=np.uint8))
    elif fault == "shape_option":
        extra = [f"--image-shape={draw(st.sampled_from(['1,-8,-8', '0,3,3', '1,2,3,4,5', 'x,3', '1,' + str(2**20)]))}"]
    raw_shape = draw(st.sampled_from([b'{"c": 1}', b"9", b"[1, -3, -3]", b"[0, 3, 3]", b"[1, 3.5, 3]", b"\xff",
                                      b"[1, 100000, 1]", b"[]", b"null"]))
    return dict(n=n, side=side, images=images, fault=fault, row=row, where=where, layout=layout, stream=stream,
                extra=extra, bad=bad, raw_shape=raw_shape)


def _write_images(case, folder: Path) -> tuple[Path, Path]:
    paths = {}
    for split in ("train", "dev"):
        images = list(case["images"])
        if case["where"] == split and case["fault"] not in ("shape_meta", "shape_option"):
            images[case["row"]] = case["bad"]
        ids = np.arange(len(images)) + (0 if split == "train" else 500)
        label = np.arange(len(images)) % 2
        path = folder / f"{split}.parquet"
        if case["fault"] == "shape_meta":
            t = pa.table({"id": ids, "label": label,
                          "pixels": [np.ones(case["side"] ** 2, dtype=np.float32)] * len(images)})
            if case["where"] == split:
                t = t.replace_schema_metadata({b"valuekit.image_shape": case["raw_shape"]})
            pq.write_table(t, path)
        elif case["layout"] == "path":
            (folder / split).mkdir()
            names = []
            for i, img in enumerate(images):
                if isinstance(img, str) or img is None:
                    names.append(img)
                    continue
                (folder / split / f"{i}.png").write_bytes(img)
                names.append(f"{split}/{i}.png")
            pd.DataFrame({"id": ids, "label": label, "image": names}).to_parquet(path)
        elif case["layout"] == "struct":
            col = [None if b is None else {"bytes": b, "path": None} for b in images]
            pq.write_table(
                pa.table(
                    {
                        "id": ids,
                        "label": label,
                        "image": pa.array(col, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    }
                ),
                path,
            )
        else:
            pq.write_table(pa.table({"id": ids, "label": label, "image": pa.array(images, pa.binary())}), path)
        paths[split] = path
    return paths["train"], paths["dev"]


def test_image_inputs(world):
    seen = []

    @SETTINGS
    @given(case=image_case())
    def check(case):
        folder = _case_dir()
        try:
            train, dev = _write_images(case, folder)
            _check(["train", train, "--dev", dev, "--out", folder / "run", *FAST, "--stream", case["stream"],
                    *case["extra"]], folder, world["root"])
            seen.append(case["fault"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _covered(seen, IMAGE_FAULTS)


# ---------------------------------------------------------------- token lists


class _Tokens(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 4)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.emb(x.long()).mean(1))


def tokens(num_classes, input_shape):
    return _Tokens(num_classes)


TOKEN_FAULTS = ["negative", "too_big", "huge", "fraction", "nan", "ragged", "empty_list", "null_list"]


@st.composite
def token_case(draw):
    n = draw(st.integers(3, 8))
    length = draw(st.integers(1, 5))
    rows = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=length, max_size=length), min_size=n, max_size=n))
    fault = draw(st.sampled_from(TOKEN_FAULTS))
    row, pos = draw(st.integers(0, n - 1)), draw(st.integers(0, length - 1))
    value = {"negative": -draw(st.integers(1, 2**31)), "too_big": draw(st.integers(VOCAB, 10 * VOCAB)),
             "huge": draw(st.sampled_from([2**40, 2**53, 1e30])),
             "fraction": draw(st.integers(0, VOCAB - 2)) + draw(st.sampled_from([0.5, 0.25, 0.75])),
             "nan": float("nan")}.get(fault)
    return dict(rows=rows, fault=fault, row=row, pos=pos, value=value, where=draw(st.sampled_from(["train", "dev"])),
                classes=draw(st.integers(2, 3)))


def _write_tokens(case, folder: Path) -> tuple[Path, Path]:
    paths = {}
    for split in ("train", "dev"):
        rows = [np.asarray(r, dtype=np.float64) for r in case["rows"]]
        if case["where"] == split:
            r, fault = case["row"], case["fault"]
            if case["value"] is not None:
                rows[r] = rows[r].copy()
                rows[r][case["pos"]] = case["value"]
            elif fault == "ragged":
                rows[r] = np.append(rows[r], 1.0)
            elif fault == "empty_list":
                rows = [np.zeros(0) for _ in rows]
            else:
                rows[r] = None
        ids = np.arange(len(rows)) + (0 if split == "train" else 500)
        label = np.arange(len(rows)) % case["classes"]
        path = folder / f"{split}.parquet"
        col = pa.array([None if v is None else v.tolist() for v in rows], pa.list_(pa.float64()))
        pq.write_table(pa.table({"id": ids, "label": label, "tokens": col}), path)
        paths[split] = path
    return paths["train"], paths["dev"]


def test_token_list_inputs(world):
    seen = []

    @SETTINGS
    @given(case=token_case())
    def check(case):
        folder = _case_dir()
        try:
            train, dev = _write_tokens(case, folder)
            _check(["train", train, "--dev", dev, "--out", folder / "run", *FAST, "--model",
                    "test_badinput_kinds:tokens"], folder, world["root"])
            seen.append(case["fault"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _covered(seen, TOKEN_FAULTS)


# ---------------------------------------------------------------- instruction tables

INSTRUCTION_FAULTS = ["null_task", "null_prompt", "empty_response", "blank_response", "null_id", "dup_id",
                      "no_prompt", "no_response", "zero_rows", "method"]


@st.composite
def instruction_case(draw):
    n = draw(st.integers(2, 8))
    words = st.text(string.ascii_lowercase + " ", min_size=1, max_size=12).filter(lambda s: s.strip())
    return dict(
        n=n,
        prompts=draw(st.lists(words, min_size=n, max_size=n)),
        responses=draw(st.lists(words, min_size=n, max_size=n)),
        fault=draw(st.sampled_from(INSTRUCTION_FAULTS)),
        row=draw(st.integers(0, n - 1)),
        where=draw(st.sampled_from(["train", "dev"])),
        fmt=draw(st.sampled_from([".parquet", ".jsonl", ".csv"])),
        method=draw(st.sampled_from(["lrdi", "hostcp", "mwnet"])),
        blank=draw(st.sampled_from(["", " ", "\t", "  \n"])),
    )


def _write_instructions(case, folder: Path) -> tuple[Path, Path]:
    paths = {}
    for split in ("train", "dev"):
        n = case["n"]
        df = pd.DataFrame({"id": np.arange(n) + (0 if split == "train" else 500), "prompt": case["prompts"],
                           "response": case["responses"], "task": [f"t{i % 2}" for i in range(n)]})
        r, fault = case["row"], case["fault"]
        if case["where"] == split:
            if fault == "null_task":
                df["task"] = df["task"].astype(object)
                df.loc[r, "task"] = None
            elif fault == "null_prompt":
                df.loc[r, "prompt"] = None
            elif fault == "empty_response":
                df.loc[r, "response"] = None
            elif fault == "blank_response":
                df.loc[r, "response"] = case["blank"]
            elif fault == "null_id":
                df["id"] = df["id"].astype(object)
                df.loc[r, "id"] = None
            elif fault == "dup_id":
                df.loc[(r + 1) % n if n > 1 else r, "id"] = df.loc[r, "id"] if n > 1 else df.loc[r, "id"]
                if n == 1:
                    df = pd.concat([df, df])
            elif fault == "no_prompt":
                df = df.drop(columns=["prompt"]).rename(columns={"task": "prompt_"})
            elif fault == "no_response":
                df = df.drop(columns=["response"])
            elif fault == "zero_rows":
                df = df.iloc[:0]
        # a CSV writes a missing value as an empty field, which reads back as empty text (an empty prompt is allowed)
        fmt = ".parquet" if fault == "null_task" or (fault == "null_prompt" and case["fmt"] == ".csv") else case["fmt"]
        path = folder / f"{split}{fmt}"
        if fmt == ".parquet":
            df.to_parquet(path, index=False)
        elif fmt == ".csv":
            df.to_csv(path, index=False)
        else:
            df.to_json(path, orient="records", lines=True)
        paths[split] = path
    return paths["train"], paths["dev"]


def test_instruction_inputs(world):
    seen = []

    @SETTINGS
    @given(case=instruction_case())
    def check(case):
        folder = _case_dir()
        try:
            train, dev = _write_instructions(case, folder)
            method = case["method"] if case["fault"] == "method" else "bads"
            _check(["train", train, "--dev", dev, "--out", folder / "run", *FAST, "--model", "causal-lm",
                    "--method", method, "--max-len", "16"], folder, world["root"])
            seen.append(case["fault"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _covered(seen, INSTRUCTION_FAULTS)


# ---------------------------------------------------------------- own-model factories


class _Head(torch.nn.Module):
    """A linear head whose output is then spoiled as `how` says (the generated own models)."""

    def __init__(self, d: int, k: int, how: str):
        super().__init__()
        self.fc = torch.nn.Linear(d, k)
        self.how = how
        if how == "frozen":
            self.fc.requires_grad_(False)

    def forward(self, x):
        y = self.fc(x.reshape(len(x), -1))
        how = self.how
        if how == "int":
            return y.round().long()
        if how == "bool":
            return y > 0
        if how == "nan":
            return y * float("nan")
        if how == "inf":
            return y + float("inf")
        if how == "extra_class":
            return torch.cat([y, y[:, :1]], 1)
        if how == "one_column":
            return y[:, :1]
        if how == "flat":
            return y.reshape(-1)
        if how == "tuple":
            return (y, y)
        if how == "dict":
            return {"logits": y}
        if how == "raises":
            raise RuntimeError("boom")
        if how == "wrong_input":
            return self.fc(x[:, :1])
        return y


MODEL_FAULTS = ["int", "bool", "nan", "inf", "extra_class", "one_column", "flat", "tuple", "dict", "raises",
                "wrong_input", "frozen", "no_params", "factory_raises", "not_a_module", "returns_none",
                "unknown_factory", "unknown_module", "bad_spec"]


def _factory(how: str):
    def make(num_classes, input_shape):
        d = int(np.prod(input_shape))
        if how == "no_params":
            return torch.nn.Flatten()
        if how == "factory_raises":
            raise ValueError("no weights here")
        if how == "not_a_module":
            return "resnet18"
        if how == "returns_none":
            return None
        return _Head(d, num_classes, how)

    return make


for _how in MODEL_FAULTS:
    globals()[f"model_{_how}"] = _factory(_how)


def test_own_model_factories(world):
    seen = []

    @SETTINGS
    @given(how=st.sampled_from(MODEL_FAULTS), method=st.sampled_from(["uniform", "dds", "lrdi", "hostcp", "bads"]),
           n=st.integers(4, 12), classes=st.integers(2, 4), dim=st.integers(1, 5), seed=st.integers(0, 99))
    def check(how, method, n, classes, dim, seed):
        folder = _case_dir()
        try:
            train, dev = folder / "t.parquet", folder / "d.parquet"
            blobs(n, seed=seed, classes=classes, dim=dim).assign(
                label=lambda d: [f"c{i % classes}" for i in range(n)]
            ).to_parquet(train, index=False)
            blobs(classes, seed=seed + 1, classes=classes, dim=dim, id_start=500) \
                .assign(label=[f"c{i}" for i in range(classes)]).to_parquet(dev, index=False)
            spec = {"unknown_factory": "test_badinput_kinds:nope", "unknown_module": "no_such_module_x:make",
                    "bad_spec": "test_badinput_kinds:"}.get(how, f"test_badinput_kinds:model_{how}")
            _check(["train", train, "--dev", dev, "--out", folder / "run", *FAST, "--model", spec, "--method", method],
                   folder, world["root"])
            seen.append(how)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _covered(seen, MODEL_FAULTS)


# ---------------------------------------------------------------- option bounds


@st.composite
def option_case(draw):
    import os

    limit = 4 * len(os.sched_getaffinity(0))
    kind = draw(st.sampled_from(["threads", "seed", "imbalance", "image_shape", "steps", "batch", "lr", "max_len"]))
    command = draw(st.sampled_from(["train", "audit", "prepare", "bench"]))
    if kind == "threads":
        value = str(draw(st.one_of(st.integers(limit + 1, 10**12), st.integers(-10**6, 0))))
    elif kind == "seed":
        value = str(draw(st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**80))))
    elif kind == "imbalance":
        command = "prepare"
        value = draw(st.one_of(st.sampled_from(["inf", "nan", "-inf", "1e400"]),
                               st.floats(-1e6, 0.999, allow_nan=False).map(repr)))
    elif kind == "image_shape":
        command = "train"
        dims = draw(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=6)
                    .filter(lambda v: not (1 <= len(v) <= 4 and min(v) >= 1)))
        value = ",".join(map(str, dims))
    elif kind == "lr":
        command = "train"
        value = draw(st.one_of(st.sampled_from(["inf", "nan", "-inf"]), st.floats(-1e6, 0, allow_nan=False).map(repr)))
    else:
        command = "train"
        value = str(draw(st.integers(-(2**40), 0)))
    return kind, command, value


def test_option_bounds(world):
    seen = []

    @SETTINGS
    @given(case=option_case())
    def check(case):
        kind, command, value = case
        folder = _case_dir()
        try:
            flag = {
                "threads": "--threads",
                "seed": "--seed",
                "imbalance": "--imbalance",
                "image_shape": "--image-shape",
                "steps": "--steps",
                "batch": "--batch-size",
                "lr": "--lr",
                "max_len": "--max-len",
            }[kind]
            if command == "bench" and kind == "seed":
                flag = "--seeds"
            opt = [f"{flag}={value}"]
            argv = {"train": ["train", world["train"], "--dev", world["dev"], "--out", folder / "run", *FAST],
                    "audit": ["audit", world["run"], "-o", folder / "a.parquet", "--no-predict"],
                    "prepare": ["data", "prepare", "wine", "-o", folder / "d"],
                    "bench": ["bench", "layer", "--quick", "-o", folder / "b"]}[command]
            if kind == "max_len":
                argv = ["train", world["train"], "--dev", world["dev"], "--out", folder / "run", *FAST,
                        "--tokenizer", folder / "tok"]
            if kind == "threads" and command in ("prepare", "audit"):
                argv = ["train", world["train"], "--dev", world["dev"], "--out", folder / "run", *FAST]
            _check([*argv, *opt], folder, world["root"])
            seen.append(kind)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    assert len(seen) >= CASES, len(seen)
