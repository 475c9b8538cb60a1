"""docs/benchmarks.md: `valuekit bench KIND` runs that one benchmark only, and --seeds / --steps / --datasets /
--methods / --settings reach the runs it makes (the written tables hold exactly the requested grid)."""

from __future__ import annotations

import io
import itertools
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
from valuekit.cli.main import main

from valuekit.bench import suites


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_bench_quality_runs_exactly_the_requested_grid(tmp_path):
    out, runs = tmp_path / "reports", tmp_path / "runs"
    code, printed, err = cli(["bench", "quality", "--quick", "--device", "cpu", "-o", out, "--seeds", "3,5",
                              "--steps", "12", "--datasets", "wine", "--methods", "uniform,l2rw",
                              "--settings", "noise20", "--runs-dir", runs])
    assert code == 0, err
    # one kind: its files and the index, nothing of the other benchmarks
    assert sorted(p.name for p in out.iterdir()) == ["BENCHMARKS.md", "quality.csv", "quality.md",
                                                     "quality_detectors.csv"]
    assert printed.splitlines()[-2:] == [f"quality: {out / 'quality.md'}", f"index: {out / 'BENCHMARKS.md'}"]
    q = pd.read_csv(out / "quality.csv")
    grid = sorted(itertools.product(["wine"], ["noise20"], [3, 5], ["uniform", "l2rw"]))
    assert sorted(q[["dataset", "setting", "seed", "method"]].itertuples(index=False, name=None)) == grid
    for _, row in q.iterrows():  # every run of the grid was made with the requested steps and seed
        meta = json.loads((runs / f"wine-noise20-{row.seed}" / row.method / "run.json").read_text())
        assert meta["steps_done"] == 12 and meta["seed"] == row.seed and meta["method"] == row.method
        assert meta["data"]["train"]["n_rows"] == 178 - 30 - round(0.2 * 178)  # wine minus dev (10/class) and test
    uni = q[q.method == "uniform"]
    np.testing.assert_allclose(uni.auroc, uni.auroc_loss)  # uniform's value is -mean_loss
    assert q[["auroc", "auroc_loss", "test_acc"]].stack().between(0, 1).all()
    md = (out / "quality.md").read_text()
    assert (f"Command: `valuekit bench quality --quick --device cpu -o {out} --seeds 3,5 --steps 12 --datasets wine "
            f"--methods uniform,l2rw --settings noise20 --runs-dir {runs}`") in md
    assert "mean ± std over seeds [3, 5]" in md and "MLP, 12 steps of batch 64" in md
    index = (out / "BENCHMARKS.md").read_text()
    assert "## quality (CPU)" in index and "## speed" not in index and "## layer" not in index


def test_bench_speed_times_only_the_requested_methods(tmp_path):
    out = tmp_path / "reports"
    code, printed, err = cli(["bench", "speed", "--quick", "--device", "cpu", "--methods", "l2rw", "-o", out])
    assert code == 0, err
    speed = pd.read_csv(out / "speed.csv")
    assert list(speed.method) == ["uniform", "l2rw"] and set(speed.model) == {"mlp"}  # uniform: the baseline
    np.testing.assert_allclose(speed.set_index("method").ratio_vs_uniform,
                               speed.set_index("method").median_step_ms / speed.median_step_ms.iloc[0])
    assert (speed.median_step_ms > 0).all()
    assert not (out / "quality.md").exists() and not (out / "layer.md").exists()
    assert (
        f"Command: `valuekit bench speed --quick --device cpu -o {out} --methods l2rw`"
        in (out / "speed.md").read_text()
    )
    assert printed.splitlines()[0] == f"speed: {out / 'speed.md'}"


def test_bench_suite_options_reach_the_suite_runs(tmp_path, monkeypatch):
    """--seeds / --steps / --datasets replace a study suite's own grid (here a two-arm suite on digits)."""
    tiny = suites.Suite("tiny", "Tiny", ("digits",), ("noise20",),
                        (suites.Arm("uniform", "uniform"), suites.Arm("dds k=2", "dds", {"update_every": 2})),
                        seeds=(0, 1, 2), steps=200, batch_size=16)
    monkeypatch.setitem(suites.SUITES, "tiny", tiny)
    out = tmp_path / "reports"
    code, _, err = cli(["bench", "tiny", "--device", "cpu", "-o", out, "--seeds", "4,9", "--steps", "11",
                        "--datasets", "wine"])
    assert code == 0, err
    frame = pd.read_csv(out / "suite-tiny.csv")
    grid = sorted(itertools.product(["wine"], ["noise20"], ["uniform", "dds k=2"], [4, 9]))
    assert sorted(frame[["dataset", "setting", "arm", "seed"]].itertuples(index=False, name=None)) == grid
    md = (out / "suite-tiny.md").read_text()
    assert f"Command: `valuekit bench tiny --device cpu -o {out} --seeds 4,9 --steps 11 --datasets wine`" in md
    assert "data ['wine']" in md and "seeds [4, 9]" in md and "11 steps" in md


def test_bench_epoch_measures_the_full_table_first_and_skips_recorded_measurements(tmp_path, monkeypatch):
    """`valuekit bench epoch` appends each (method, N) to OUT/epoch.jsonl and a later call only measures the
    missing ones, so the methods can be split over processes; the table is made from every record."""
    from valuekit.bench import epoch as bench_epoch

    calls = []

    def fake(data, method, rows, batch_size):
        calls.append((method, rows))
        steps = -(-rows // batch_size)
        t = {"uniform": 1.0, "dds": 1.5}[method] * steps
        return {"method": method, "rows": rows, "batch_size": batch_size, "steps": steps, "epoch_s": t,
                "steps_s_sum": t, "median_step_s": 1.0, "steps_per_s": steps / t, "peak_rss_mib": 100.0 + rows / 100,
                "values_rows": rows, "rows_valued": rows}

    monkeypatch.setattr(bench_epoch, "_measure", fake)
    monkeypatch.setattr(bench_epoch, "_stream_data", lambda folder, quick: (folder, "stub"))
    bench_epoch.bench_epoch(tmp_path, command="c", quick=True, methods=["uniform"])
    assert calls == [("uniform", 1338), ("uniform", 300)]  # the full table first
    bench_epoch.bench_epoch(tmp_path, command="c", quick=True, methods=["uniform", "dds"])
    assert calls[2:] == [("dds", 1338), ("dds", 300)]
    bench_epoch.bench_epoch(tmp_path, command="c", quick=True, methods=["uniform", "dds"])
    assert len(calls) == 4
    frame = pd.read_csv(tmp_path / "epoch.csv")
    assert list(frame.method) == ["uniform", "dds", "uniform", "dds"] and list(frame.rows) == [300, 300, 1338, 1338]
    np.testing.assert_allclose(frame.ratio_vs_uniform, [1.0, 1.5, 1.0, 1.5])
    assert "| dds | 1,338 | 21 | 0.53 | 1.50x |" in (tmp_path / "epoch.md").read_text()


def test_stream_and_epoch_children_load_a_file_of_exactly_n_rows_streamed_from_disk(tmp_path):
    """The memory-vs-N children must hold N rows, not the whole file's (a plain Arrow slice shares the file's
    buffers), and their streamed images are read from a temporary file, not held in memory."""
    import pyarrow.parquet as pq

    from valuekit.bench.stream import child_tables, rows_file
    from valuekit.data.bundled import prepare
    from valuekit.data.tables import load_table

    prepare("digits", tmp_path / "d", image_format="png", seed=0)
    whole = load_table(tmp_path / "d" / "train.parquet", stream=True).x.store.size
    path = rows_file(tmp_path / "d", 100)
    meta = pq.read_metadata(path)
    assert meta.num_rows == 100 and meta.row_group(0).num_rows == 100
    tr, dv = child_tables(tmp_path / "d", 100, stream=True)
    assert len(tr.ids) == 100 and tr.x.buf is None and tr.x.offsets[-1] == tr.x.store.size < whole / 5
    assert list(tr.ids) == pq.read_table(tmp_path / "d" / "train.parquet").column("id").to_pylist()[:100]
    assert dv.image_shape == tr.image_shape

def test_per_row_state_counts_row_sized_arrays_once():
    import types

    import torch

    from valuekit.bench.stream import per_row_state_bytes

    w = torch.zeros(10, dtype=torch.float64)
    a = types.SimpleNamespace(w=w, same=w, counts=np.zeros(10, np.int64), model=torch.zeros(7, 3),
                              buffers=[torch.zeros(10, 4, dtype=torch.float32)], rows=types.SimpleNamespace())
    b = types.SimpleNamespace(x=types.SimpleNamespace(offsets=np.zeros(11, np.int64), shape=(10, 5)), scalar=3)
    assert per_row_state_bytes([a, b], 10) == 80 + 80 + 160 + 88
    # a ring of the last epochs' batches (LRDI's weights: window x batch) grows with the rows too
    ring = types.SimpleNamespace(window=4, ring_w=torch.zeros(4, 8, dtype=torch.float64), other=torch.zeros(3, 8))
    assert per_row_state_bytes([ring], 10) == 4 * 8 * 8


def test_same_steps_trains_the_small_table_for_the_large_tables_epoch(tmp_path, monkeypatch):
    import json

    from valuekit.bench import epoch as bench_epoch

    calls = []
    monkeypatch.setattr(bench_epoch, "_stream_data", lambda folder, quick: (folder, "stub"))
    monkeypatch.setattr(bench_epoch, "_measure", lambda data, m, rows, batch, steps=None: calls.append((m, rows, steps))
                        or {"method": m, "rows": rows, "steps": steps, "peak_rss_mib": 1.0})
    path = bench_epoch.same_steps(tmp_path, methods=["uniform", "bads"], rows=1000, like=6000, batch_size=64)
    assert calls == [("uniform", 1000, 94), ("bads", 1000, 94)]
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["like_rows"] for r in recs] == [6000, 6000] and recs[1]["method"] == "bads"
