"""Study suites (`valuekit bench SUITE`): the grid they run, the rows and table they write."""

import numpy as np
import pandas as pd
import pytest

from valuekit.bench import suites
from valuekit.errors import InputError


def test_noisy_sources_flip_at_their_rates(tmp_path):
    from valuekit.data.bundled import prepare

    paths = prepare("digits", tmp_path, seed=0)
    before = pd.read_parquet(paths["train"])
    suites._noisy_sources(paths, (0.0, 0.5), seed=0)
    after, dev = pd.read_parquet(paths["train"]), pd.read_parquet(paths["dev"])
    flipped = after["label"].to_numpy() != before["label"].to_numpy()
    assert (flipped == after["is_noisy"].to_numpy()).all()
    assert (after["clean_label"] == before["label"]).all() and set(dev["source"]) == {"s0"}
    s1 = after["source"] == "s1"
    assert not flipped[~s1].any() and 0.4 < flipped[s1].mean() < 0.6
    assert shape(paths["train"]) == shape(paths["test"]) == b"[1, 8, 8]"  # image shape kept


def shape(path):
    import pyarrow.parquet as pq

    return {k: v for k, v in pq.read_schema(path).metadata.items() if b"shape" in k}.popitem()[1]


def test_a_suite_runs_its_grid_and_writes_csv_md_png(tmp_path, monkeypatch):
    tiny = suites.Suite("tiny", "Tiny", ("digits",), ("noise20", "imbalance10"),
                        (suites.Arm("uniform", "uniform"), suites.Arm("dds k=2", "dds", {"update_every": 2})),
                        seeds=(0, 1), steps=20, batch_size=16)
    monkeypatch.setitem(suites.SUITES, "tiny", tiny)
    md = suites.run_suite("tiny", tmp_path, command="valuekit bench tiny", device="cpu")
    frame = pd.read_csv(tmp_path / "suite-tiny.csv")
    assert len(frame) == 1 * 2 * 2 * 2 and (tmp_path / "suite-tiny.png").exists()
    assert set(frame.arm) == {"uniform", "dds k=2"} and set(frame.seed) == {0, 1}
    noise = frame[frame.setting == "noise20"]
    assert noise.auroc.between(0, 1).all() and noise.kl_dev_weights.isna().all()
    imb = frame[frame.setting == "imbalance10"]
    assert imb.auroc.isna().all() and (imb.kl_dev_rows > 0).all() and np.isfinite(imb.kl_dev_weights).all()
    # uniform weights are all 1: its weight mass per class is the row count per class
    np.testing.assert_allclose(imb[imb.arm == "uniform"].kl_dev_weights, imb[imb.arm == "uniform"].kl_dev_rows)
    dds = frame[frame.arm == "dds k=2"]
    assert dds.ess_median.between(0, 1).all() and (dds.ess_p5 <= dds.ess_median).all()
    assert np.isfinite(imb[imb.arm == "dds k=2"].rare_boost).all() and noise.rare_boost.isna().all()
    assert frame[frame.arm == "uniform"].ess_median.isna().all()  # uniform logs no weights
    text = md.read_text()
    assert text.startswith("# Tiny") and "Command: `valuekit bench tiny`" in text
    row = [line for line in text.splitlines() if line.startswith("| digits | noise20 | uniform |")][0]
    mean, std = noise[noise.arm == "uniform"].test_acc.mean(), noise[noise.arm == "uniform"].test_acc.std()
    assert f"{mean:.3f} ± {std:.3f}" in row
    with pytest.raises(InputError, match="unknown suite"):
        suites.run_suite("nope", tmp_path, command="x")


def test_every_suite_names_known_methods_settings_and_data():
    from valuekit.config import METHODS, TrainConfig
    from valuekit.data.bundled import DATASETS
    from valuekit.training import options

    for s in suites.SUITES.values():
        assert set(s.settings) <= set(suites.SETTINGS) and set(s.data) <= set(DATASETS)
        for arm in s.arms:
            assert arm.method in METHODS
            options.resolve(TrainConfig(method=arm.method, **arm.loop), arm.settings)  # settings validate


def test_bench_command_takes_suite_names(tmp_path, monkeypatch):
    from valuekit.cli.main import build_parser

    calls = []
    monkeypatch.setattr(suites, "run_suite", lambda name, out, **kw: calls.append((name, kw)) or out / "x.md")
    args = build_parser().parse_args(
        ["bench", "dds", "--quick", "--seeds", "3", "--device", "cpu", "-o", str(tmp_path)]
    )
    assert args.func(args) == 0
    (name, kw), = calls
    assert name == "dds" and kw["quick"] and kw["seeds"] == (3,)
    assert kw["command"] == f"valuekit bench dds --quick --device cpu -o {tmp_path} --seeds 3"
