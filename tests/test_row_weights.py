"""Fixed per-row loss weights (load_table / valuekit.train weight_col): loaded once, honoured by uniform only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import blobs

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.errors import InputError
from valuekit.training.context import Batch
from valuekit.training.loop import make_trainer


def _weighted(n: int = 24, seed: int = 1):
    df = blobs(n, seed=seed)
    df["w"] = np.arange(n) % 4 * 2.0  # 0, 2, 4, 6: mean 3, some rows left out entirely
    return df


def test_weights_are_read_rescaled_to_mean_one_and_are_no_feature():
    df = _weighted()
    ds = load_table(df, weight_col="w")
    assert ds.feature_cols == ["f0", "f1", "f2", "f3"]
    np.testing.assert_allclose(ds.weight, df.w.to_numpy() / 3.0)
    assert ds.trainer_view().weight is ds.weight
    assert ds.fingerprint() != load_table(df.drop(columns="w")).fingerprint()


@pytest.mark.parametrize("value, message", [(-1.0, "id 5: -1.0 is not a finite weight >= 0"),
                                            (float("nan"), "id 5: nan is not a finite weight >= 0")])
def test_a_bad_weight_names_the_column_and_the_row(value, message):
    df = _weighted()
    df.loc[5, "w"] = value
    with pytest.raises(InputError, match=f"column 'w' at {message}"):
        load_table(df, weight_col="w")
    with pytest.raises(InputError, match="every weight is 0"):
        load_table(df.assign(w=0.0), weight_col="w")
    with pytest.raises(InputError, match="missing column 'weight'"):
        load_table(df, weight_col="weight")


def test_the_weighted_batch_loss_is_the_hand_computed_weighted_mean():
    df = _weighted()
    ds = load_table(df, weight_col="w")
    trainer, _, ctx = make_trainer(ds, load_table(blobs(9, seed=2, id_start=100), like=ds),
                                   TrainConfig(steps=2, device="cpu", progress=False))
    before = copy.deepcopy(trainer.model)
    seen = []
    ctx.scale = lambda loss: seen.append(loss.detach()) or loss  # the scalar the step backpropagates
    idx = torch.tensor([0, 1, 2, 3, 5, 7, 10, 11])
    rec = trainer.step(Batch(step=1, idx=idx, x=ctx.x[idx], y=ctx.y[idx]))
    w = df.w.to_numpy()[idx.numpy()] / df.w.mean()
    by_hand = sum(w[i] * torch.nn.functional.cross_entropy(before(ctx.x[idx[i]][None]), ctx.y[idx[i]][None]).item()
                  for i in range(len(idx))) / len(idx)
    assert seen[0].item() == pytest.approx(by_hand, rel=1e-5)
    np.testing.assert_allclose(rec.weight.numpy(), w, rtol=1e-6)


def test_a_learned_method_refuses_fixed_weights_and_train_reads_the_column(tmp_path):
    import valuekit

    df, dev = _weighted(), blobs(9, seed=2, id_start=100)
    with pytest.raises(InputError, match="method 'dds' learns its own weights .* methods that do: uniform"):
        valuekit.train(df, dev, out=tmp_path / "dds", method="dds", steps=2, device="cpu", progress=False,
                       weight_col="w")
    run = valuekit.train(df, dev, out=tmp_path / "uni", steps=3, device="cpu", progress=False, weight_col="w")
    got = run.steps(["step", "example_id", "weight"]).to_pandas().sort_values(["step", "example_id"])
    np.testing.assert_allclose(got.weight.to_numpy(), df.w.to_numpy()[got.example_id.to_numpy()] / 3.0, rtol=1e-6)
