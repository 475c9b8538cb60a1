"""`valuekit bench ... --quick`: every benchmark writes its markdown, CSV and figure with measured numbers."""

import numpy as np
import pandas as pd
import pytest

from valuekit.cli.main import main


def test_bench_all_quick(tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["bench", "all", "--quick", "--device", "cpu", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for kind in ("speed", "layer", "quality", "scale"):
        md = (out / f"{kind}.md").read_text()
        assert md.startswith("# ") and "Command: `valuekit bench all --quick --device cpu -o" in md, kind
        assert (out / f"{kind}.csv").exists() and f"{kind}: " in printed

    speed = pd.read_csv(out / "speed.csv")
    uni = speed[speed.method == "uniform"]
    assert np.allclose(uni.ratio_vs_uniform, 1.0) and (speed.median_step_ms > 0).all()
    assert {"dds", "bads"} <= set(speed.method)
    ratio = speed.set_index("method").ratio_vs_uniform
    np.testing.assert_allclose(ratio, speed.set_index("method").median_step_ms / uni.median_step_ms.iloc[0])
    assert (out / "speed.png").stat().st_size > 1000

    stream = pd.read_csv(out / "stream.csv")  # a user's BatchNorm ResNet factory on PNG bytes
    assert set(stream.method) == {"uniform"} and set(stream.stream) == {True, False}
    assert (stream.values_rows == stream.rows).all() and (stream.peak_rss_mib >= stream.rss_after_load_mib).all()
    assert (stream.interleaved_step_s > 0).all() and "derived" in (out / "stream.md").read_text()
    assert "## stream (CPU)" in (out / "BENCHMARKS.md").read_text()

    layer = pd.read_csv(out / "layer.csv")
    assert (layer.max_abs_diff_w < 1e-5).all() and (layer.max_abs_diff_grad < 1e-5).all()
    assert (layer.ratio > 1).all()  # the closed form beats the generic conic solver even at n = 64

    quality = pd.read_csv(out / "quality.csv")
    assert {"uniform", "dds", "cleanlab", "knn-shapley"} <= set(quality.method)
    q = quality.set_index("method")
    assert q.loc["uniform", "auroc"] > 0.9 and q.loc["knn-shapley", "auroc"] > 0.8  # digits, 20 % flips
    assert q[["auroc", "f1_at_k"]].stack().between(0, 1).all()
    assert np.isnan(q.loc["cleanlab", "test_acc"]) and 0.5 < q.loc["uniform", "test_acc"] <= 1

    scale = pd.read_csv(out / "scale.csv")
    assert len(scale) == 3 and (scale.seconds > 0).all()
    assert scale.note.iloc[1] == "ok" and "rows/s" in scale.note.iloc[2]

    index = (out / "BENCHMARKS.md").read_text()
    assert "## speed (CPU)" in index and "## quality (CPU)" in index and "No GPU results yet" in index


def test_bench_rejects_unknown_kind(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "nope"])
    assert err.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err

