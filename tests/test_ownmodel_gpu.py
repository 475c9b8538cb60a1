"""The CUDA path of a user's model (`-m gpu`; skipped without a CUDA device): streamed PNG rows copied through
pinned memory, bf16/fp16 autocast, peak CUDA memory in metrics/, per-example dots equal to the CPU ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import usermodels
from test_ownmodel import png_tables

import valuekit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method, precision", [("uniform", "fp16"), ("uniform", "bf16"), ("dds", "bf16"),
                                               ("lrdi", "fp32"), ("hostcp", "bf16")])
def test_streamed_png_run_on_cuda(tmp_path, method, precision):
    paths, _ = png_tables(tmp_path, "struct")
    run = valuekit.train(paths["train"], dev=paths["dev"], model="usermodels:resnet", method=method, steps=8,
                         batch_size=16, device="cuda", precision=precision, progress=False, out=tmp_path / "r",
                         table_kw={"stream": True})
    vals = pd.read_parquet(run.path / "values.parquet")
    assert len(vals) == 48 and np.isfinite(vals.value).all()
    mem = run.metrics()["cuda_mem_mb"]
    assert mem.notna().all() and (mem > 0).all()


def test_per_example_dots_on_cuda_match_cpu():
    from valuekit.ops.gradients import per_example_dots

    torch.manual_seed(0)
    model = usermodels.TinyResNet(3).double().train()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    cpu = per_example_dots(model, x, y, v, batch_stats="fixed")
    gpu = per_example_dots(model.cuda(), x.cuda(), y.cuda(), {n: t.cuda() for n, t in v.items()}, batch_stats="fixed")
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-8, atol=1e-10)
