"""Packed instruction rows (valuekit.data.token_rows): the dense rows they stand for, chunked loading, memory."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import valuekit.data.instructions as instructions
from valuekit.data.instructions import load_instructions
from valuekit.data.text import ByteTokenizer
from valuekit.data.token_rows import IGNORE, PAD_INPUT, TokenRows, pack_sequences
from valuekit.errors import InputError
from valuekit.models.lm import token_lengths


def _dense_reference(prompts, responses, tok, max_len):
    """The unpacked (N, max_len) inputs and targets, written out row by row."""
    x = np.full((len(prompts), max_len), PAD_INPUT, dtype=np.float32)
    y = np.full((len(prompts), max_len), IGNORE, dtype=np.int64)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        head, tail = [tok.bos_id] + tok.encode(p), tok.encode(r) + [tok.eos_id]
        tail = tail[:max_len]
        while len(head) + len(tail) > max_len + 1:
            head = head[1:]
        seq = head + tail
        for t in range(len(seq) - 1):
            x[i, t] = seq[t]
            if t + 1 >= len(head):
                y[i, t] = seq[t + 1]
    return x, y


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    letters = list("abcdefghij é")
    prompts = ["".join(rng.choice(letters, rng.integers(1, 30))) for _ in range(n)]
    responses = ["".join(rng.choice(letters, rng.integers(1, 12))) + "z" for _ in range(n)]
    return prompts, responses


def test_packed_rows_equal_the_dense_rows_under_every_index():
    tok, L = ByteTokenizer(), 24  # long prompts are cut from the left
    prompts, responses = _texts(40)
    ref_x, ref_y = _dense_reference(prompts, responses, tok, L)
    x, y = TokenRows.x_and_y(*pack_sequences(prompts, responses, tok, L)[:3], L)
    assert x.shape == y.shape == (40, L) and len(x) == 40 and x.dim() == 2
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), ref_x)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    idx = torch.tensor([5, 0, 39, 5])
    assert torch.equal(x[idx], torch.from_numpy(ref_x[[5, 0, 39, 5]]))
    assert torch.equal(y[idx], torch.from_numpy(ref_y[[5, 0, 39, 5]]))
    assert torch.equal(y[3:9], torch.from_numpy(ref_y[3:9]))
    mask = torch.arange(40) % 3 == 0
    assert torch.equal(x[mask], torch.from_numpy(ref_x[mask.numpy()]))
    assert torch.equal(x[-1], torch.from_numpy(ref_x[-1])) and torch.equal(
        y[torch.tensor(7)], torch.from_numpy(ref_y[7])
    )
    assert torch.equal(token_lengths(x), token_lengths(torch.from_numpy(ref_x)))
    assert x.to("cpu")[idx].device.type == "cpu" and x.cpu().kind == "x"


def test_loading_in_chunks_and_row_groups_gives_the_same_table(tmp_path, monkeypatch):
    prompts, responses = _texts(23, seed=1)
    df = pd.DataFrame({"id": np.arange(100, 123), "prompt": prompts, "response": responses,
                       "task": [f"t{i % 3}" for i in range(23)], "is_noisy": np.arange(23) % 5 == 0})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "t.parquet", row_group_size=7)
    whole = load_instructions(df, max_len=20)  # one chunk
    monkeypatch.setattr(instructions, "CHUNK_ROWS", 3)  # chunks that straddle the 7-row groups
    parts = load_instructions(tmp_path / "t.parquet", max_len=20)
    ref_x, ref_y = _dense_reference(prompts, responses, ByteTokenizer(), 20)
    for ds in (whole, parts):
        np.testing.assert_array_equal(ds.x.numpy(), ref_x)
        np.testing.assert_array_equal(ds.y.numpy(), ref_y)
        assert ds.ids.tolist() == list(range(100, 123)) and ds.source.tolist() == df.task.tolist()
        assert ds.is_noisy.tolist() == df.is_noisy.tolist()
    # the fingerprint hashes the dense rows, so it is the unpacked table's (runs resume across the change)
    dense = type(whole)(ids=whole.ids, x=torch.from_numpy(ref_x), y=torch.from_numpy(ref_y), classes=whole.classes,
                        source=whole.source)
    assert whole.fingerprint() == parts.fingerprint() == dense.fingerprint()


def test_a_bad_row_in_a_later_chunk_names_its_id(tmp_path, monkeypatch):
    prompts, responses = _texts(12, seed=2)
    responses[9] = "   "
    df = pd.DataFrame({"id": [f"r{i}" for i in range(12)], "prompt": prompts, "response": responses})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "t.parquet", row_group_size=5)
    monkeypatch.setattr(instructions, "CHUNK_ROWS", 2)
    with pytest.raises(
        InputError, match=r"t.parquet \(train table\): column 'response' has an empty response at id 'r9'"
    ):
        load_instructions(tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"missing column 'prompt'"):
        df.drop(columns="prompt").to_parquet(tmp_path / "u.parquet")
        load_instructions(tmp_path / "u.parquet")


def test_packed_rows_hold_their_tokens_not_the_padded_width():
    prompts, responses = _texts(500, seed=3)
    ds = load_instructions(pd.DataFrame({"id": np.arange(500), "prompt": prompts, "response": responses}), max_len=256)
    packed = ds.x.tokens.nbytes + ds.x.offsets.nbytes + ds.x.starts.nbytes
    tokens = int(token_lengths(ds.x).sum()) + 500  # every row's sequence is its inputs plus one token
    assert packed == 4 * tokens + 8 * 501 + 4 * 500  # int32 tokens, int64 offsets, int32 response starts
    assert ds.x.tokens is ds.y.tokens  # x and y are two views of one storage
    assert packed * 20 < 500 * 256 * (4 + 8)  # what the dense float32 x and int64 y took


def test_feed_hashes_like_the_dense_bytes(monkeypatch):
    import valuekit.data.token_rows as token_rows

    monkeypatch.setattr(token_rows, "HASH_ROWS", 4)
    prompts, responses = _texts(10, seed=4)
    x, y = TokenRows.x_and_y(*pack_sequences(prompts, responses, ByteTokenizer(), 16)[:3], 16)
    for part in (x, y):
        h = hashlib.sha256()
        part.feed(h)
        assert h.hexdigest() == hashlib.sha256(part.numpy().tobytes()).hexdigest()


def test_streamed_rows_read_the_same_tokens_from_a_file_that_goes_with_the_table(tmp_path, monkeypatch):
    import gc
    import os

    import valuekit.data.token_rows as token_rows

    prompts, responses = _texts(30, seed=5)
    df = pd.DataFrame({"id": np.arange(30), "prompt": prompts, "response": responses})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "t.parquet", row_group_size=8)
    monkeypatch.setattr(instructions, "CHUNK_ROWS", 5)
    ref_x, ref_y = _dense_reference(prompts, responses, ByteTokenizer(), 18)
    kept = load_instructions(tmp_path / "t.parquet", max_len=18, stream=False)
    spilled = load_instructions(tmp_path / "t.parquet", max_len=18, stream=True)
    monkeypatch.setattr(token_rows, "AUTO_STREAM_TOKENS", 100)  # "auto" moves to a file after the first chunks
    auto = load_instructions(tmp_path / "t.parquet", max_len=18, stream="auto")
    assert not kept.x.streamed and spilled.x.streamed and auto.x.streamed
    for ds in (spilled, auto):
        np.testing.assert_array_equal(ds.x.numpy(), ref_x)
        np.testing.assert_array_equal(ds.y.numpy(), ref_y)
        idx = torch.tensor([29, 3, 4, 5, 3])  # scattered rows, and a contiguous chunk read in one piece
        assert torch.equal(ds.y[idx], torch.from_numpy(ref_y[idx.numpy()])) and torch.equal(
            ds.x[7:19], torch.from_numpy(ref_x[7:19])
        )
        assert ds.fingerprint() == kept.fingerprint()
    # memory holds 12 bytes a row; the tokens are in the file
    assert spilled.x.resident_bytes() == 8 * 31 + 4 * 30
    assert kept.x.resident_bytes() == 8 * 31 + 4 * 30 + 4 * (int(token_lengths(kept.x).sum()) + 30)
    path = spilled.x.tokens.path
    assert os.path.basename(path).startswith("valuekit-tokens-") and os.path.getsize(path) == 4 * (
        int(token_lengths(kept.x).sum()) + 30
    )
    del spilled
    gc.collect()
    assert not os.path.exists(path)


def test_a_streamed_instruction_run_equals_the_in_memory_run(tmp_path):
    from valuekit.config import TrainConfig
    from valuekit.training.loop import run_training

    prompts, responses = _texts(40, seed=6)
    df = pd.DataFrame({"id": np.arange(40), "prompt": prompts, "response": responses})
    dev = pd.DataFrame({"id": np.arange(8), "prompt": prompts[:8], "response": responses[:8]})
    runs = {}
    for stream in (False, True):
        tr, dv = (
            load_instructions(df, max_len=32, stream=stream),
            load_instructions(dev, max_len=32, name="dev", stream=stream),
        )
        cfg = TrainConfig(method="dds", model="causal-lm", steps=6, batch_size=8, seed=0, device="cpu", progress=False,
                          eval_every=3, checkpoint_every=6)
        runs[stream] = run_training(tr, dv, out=tmp_path / f"run-{stream}", config=cfg).values()
    pd.testing.assert_frame_equal(runs[False], runs[True])
    assert len(runs[True]) == 40 and runs[True]["value"].notna().all()


def test_llm_memory_bench_child_measures_each_layout(tmp_path):
    from valuekit.bench.llm_memory import instruction_rows_file, llm_memory_child
    from valuekit.bench.suites_llm import MAX_LEN

    prompts, responses = _texts(7, seed=7)
    base = pd.DataFrame({"id": np.arange(7) + 100, "prompt": prompts, "response": responses,
                         "task": ["a", "b"] * 3 + ["a"]})
    base.to_parquet(tmp_path / "train.parquet")
    base.iloc[:4].to_parquet(tmp_path / "dev.parquet")
    path = instruction_rows_file(tmp_path, 30)
    table = pd.read_parquet(path)
    assert table["id"].tolist() == list(range(30)) and table["prompt"].tolist() == [prompts[i % 7] for i in range(30)]
    assert pq.ParquetFile(path).metadata.num_rows == 30
    got = {layout: llm_memory_child(str(tmp_path), "causal-lm", "uniform", 30, 2, layout)
           for layout in ("streamed", "packed", "dense")}
    assert all(r["values_rows"] == 30 and r["peak_rss_mib"] >= r["rss_after_load_mib"] > 0 for r in got.values())
    tokens = sum(len(p.encode()) + len(r.encode()) + 2 for p, r in zip(table.prompt, table.response))  # BOS, EOS
    assert got["streamed"]["table_mib"] * 2**20 == 8 * 31 + 4 * 30
    assert got["packed"]["table_mib"] * 2**20 == 8 * 31 + 4 * 30 + 4 * tokens
    assert got["dense"]["table_mib"] * 2**20 == 30 * MAX_LEN * (4 + 8)
