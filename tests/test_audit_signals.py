"""`valuekit audit` label_score combines each run's value with its in-run signals (-mean_loss, aum)."""

import numpy as np
import pandas as pd

from valuekit.analysis.mislabel import audit, roc_auc
from valuekit.analysis.scores import label_score, signal_columns
from valuekit.runs.writer import RunWriter

N = 200


def _run(path, value, **cols):
    w = RunWriter(path, meta={"method": "dds", "id_type": "int64"}, id_type="int64")
    order = np.argsort(-value, kind="stable")
    rank = np.empty(N, dtype=np.int64)
    rank[order] = np.arange(1, N + 1)
    w.write_values(pd.DataFrame({"example_id": np.arange(N), "value": value, "value_std": np.full(N, np.nan),
                                 "weight": np.ones(N), "rank": rank, **cols}))
    w.close("completed")
    return path


def test_label_score_uses_value_loss_and_aum_of_every_run(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.random(N) < 0.2
    table = pd.DataFrame({"id": np.arange(N), "label": rng.choice(["a", "b"], N), "f0": rng.normal(size=N),
                          "is_noisy": noisy})
    weak = rng.normal(size=N)  # a value that knows nothing about the flips
    loss = np.where(noisy, 3.0, 0.5) + rng.normal(0, 0.3, N)
    aum = np.where(noisy, -2.0, 2.0) + rng.normal(0, 1.0, N)
    a = _run(tmp_path / "a", weak, mean_loss=loss, aum=aum)
    b = _run(tmp_path / "b", rng.normal(size=N))  # an older run without the signal columns: value only
    frame = audit([a, b], data=table, predict=False).sort_values("id")
    want = label_score(np.stack([weak, -loss, aum, pd.read_parquet(b / "values.parquet").value.to_numpy()], 1))
    np.testing.assert_allclose(frame.label_score.to_numpy(), want, rtol=1e-12)
    assert roc_auc(noisy, -frame.label_score.to_numpy()) > 0.9 > roc_auc(noisy, -weak) + 0.2
    cols = signal_columns(pd.read_parquet(a / "values.parquet"))
    assert list(cols) == ["value", "neg_mean_loss", "aum"] and np.array_equal(cols["neg_mean_loss"], -loss)
