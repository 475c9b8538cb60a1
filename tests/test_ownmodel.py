"""A user's own model: the `--model pkg.mod:factory` resolver, torchvision/timm extras, `valuekit.train`,
per-example gradient dots for any module (BatchNorm, LayerNorm, Embedding, attention), feature hooks."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import usermodels
from torch import nn
from valuekit.cli.main import main

import valuekit
from valuekit.errors import InputError
from valuekit.models.features import features_and_logits, last_linear
from valuekit.models.user import build_user_model
from valuekit.ops.gradients import LayerTape, per_example_dots, per_example_dots_loop


def image_frame(n: int, *, seed: int, start: int = 0, side: int = 8) -> pd.DataFrame:
    """3 classes of side x side grey images: a bright square in a class-specific corner, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0.2, 0.1, size=(n, side, side)).astype(np.float32)
    h = side // 2
    for i, c in enumerate(y):
        r, q = (0, 0) if c == 0 else (0, h) if c == 1 else (h, 0)
        x[i, r: r + h, q: q + h] += 0.7
    return pd.DataFrame({"id": np.arange(start, start + n), "label": [f"c{c}" for c in y],
                         "pixels": list(x.reshape(n, -1).clip(0, 1))})


def write_images(tmp_path, side=8):
    paths = {}
    for name, n, seed, start in (("train", 48, 1, 0), ("dev", 12, 2, 1000)):
        p = tmp_path / f"{name}.parquet"
        image_frame(n, seed=seed, start=start, side=side).to_parquet(p, index=False)
        paths[name] = p
    return paths


# ---------------------------------------------------------------- resolver


def test_factory_is_built_reproducibly_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a = build_user_model("usermodels:resnet", num_classes=4, input_shape=(1, 8, 8),
                         generator=torch.Generator().manual_seed(3))
    b = build_user_model("usermodels:resnet", num_classes=4, input_shape=(1, 8, 8),
                         generator=torch.Generator().manual_seed(3))
    c = build_user_model("usermodels:resnet", num_classes=4, input_shape=(1, 8, 8),
                         generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.net.fc.weight, b.net.fc.weight) and not torch.equal(a.net.fc.weight, c.net.fc.weight)
    assert isinstance(a.net, usermodels.TinyResNet)
    assert a(torch.rand(5, 64)).shape == (5, 4)  # flat table rows are reshaped to (N, 1, 8, 8)


@pytest.mark.parametrize("spec, fragment", [
    ("nosuchmodule_xyz:f", "cannot import module 'nosuchmodule_xyz'"),
    ("usermodels:nothere", "has no attribute 'nothere'"),
    ("usermodels:raises", "usermodels:raises: the factory raised RuntimeError: no GPU here"),
    ("usermodels:not_a_module", "usermodels:not_a_module: the factory returned str, not a torch.nn.Module"),
    ("usermodels:wrong_output", "usermodels:wrong_output: output has shape (2, 4) for 2 rows; expected (2, 3)"),
    ("resnet18", "not a built-in model"),
])
def test_bad_model_gives_one_line_exit_2_and_writes_nothing(tmp_path, capsys, spec, fragment):
    paths = write_images(tmp_path)
    out = tmp_path / "run"
    code = main(["train", str(paths["train"]), "--dev", str(paths["dev"]), "--model", spec, "--image-shape", "1,8,8",
                 "--steps", "2", "--batch-size", "16", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and fragment in err, err
    assert not out.exists()


def test_hub_model_without_the_extra_names_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name in ("torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    for spec, extra in (("torchvision:resnet18", "valuekit[vision]"), ("timm:resnet18", "valuekit[timm]")):
        with pytest.raises(InputError) as exc:
            build_user_model(spec, num_classes=3, input_shape=(1, 8, 8))
        assert "is not installed" in str(exc.value) and extra in str(exc.value)


@pytest.mark.vision
def test_torchvision_resnet_dots_match_a_per_example_loop():
    """Needs the `vision` extra (torchvision importable beside this torch): `pytest -m vision`. Not in the
    default command: the CPU torch build of the set-up has no torchvision wheel that imports beside it."""
    try:
        importlib.import_module("torchvision")
    except Exception:
        pytest.skip("torchvision is not importable here")
    model = build_user_model("torchvision:resnet18", num_classes=3, input_shape=(1, 16, 16),
                             generator=torch.Generator().manual_seed(0)).double().train()
    x, y = torch.rand(3, 256, dtype=torch.float64), torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    np.testing.assert_allclose(per_example_dots(model, x, y, v, batch_stats="fixed"), reference_dots(model, x, y, v),
                               rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- Python API


def test_python_api_takes_paths_frames_datasets_modules_and_factories(tmp_path):
    paths = write_images(tmp_path)
    frame = pd.read_parquet(paths["train"])
    kw = dict(steps=4, batch_size=16, device="cpu", progress=False, eval_every=2, table_kw={"image_shape": (1, 8, 8)})
    a = valuekit.train(paths["train"], dev=paths["dev"], model="usermodels:resnet", out=tmp_path / "a", **kw)
    b = valuekit.train(frame, dev=pd.read_parquet(paths["dev"]), model=usermodels.resnet, out=tmp_path / "b", **kw)
    va, vb = pd.read_parquet(a.path / "values.parquet"), pd.read_parquet(b.path / "values.parquet")
    np.testing.assert_allclose(va.value, vb.value)  # same seed, same factory: same run
    assert b.meta["config"]["model"] == "python:usermodels.resnet"
    module = usermodels.TinyResNet(3)
    before = {k: t.clone() for k, t in module.state_dict().items()}
    c = valuekit.train(a.meta["data"]["train"]["path"], dev=paths["dev"], model=module, method="dds",
                       out=tmp_path / "c", scorer_lr=0.01, **kw)
    assert c.meta["method_config"]["scorer_lr"] == 0.01 and c.meta["config"]["steps"] == 4
    assert all(torch.equal(before[k], t) for k, t in module.state_dict().items())  # the run trains a copy
    with pytest.raises(InputError, match="unknown setting 'scorer_lrr'"):
        valuekit.train(frame, dev=paths["dev"], model=module, method="dds", out=tmp_path / "d", scorer_lrr=1, **kw)
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- per-example gradient dots


def reference_dots(model, x, y, v):
    """Independent reference: a copy of the model whose training-mode batch-norm layers get the batch's
    (biased) statistics as running statistics and run in eval mode; then one example at a time,
    torch.autograd.grad and an explicit dot with v."""
    import copy

    ref = copy.deepcopy(model)
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    stats = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: stats.__setitem__(
        mod, (a[0].mean([0, *range(2, a[0].dim())]), a[0].var([0, *range(2, a[0].dim())], unbiased=False))))
        for m in bns]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    for m in bns:
        m.running_mean.copy_(stats[m][0])
        m.running_var.copy_(stats[m][1])
        m.eval()
    params = [p for p in ref.parameters()]
    names = [n for n, _ in ref.named_parameters()]
    out = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(ref(x[i: i + 1]), y[i: i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(sum((g * v[n]).sum() for n, g in zip(names, grads) if g is not None).item())
    return np.array(out)


def test_batchnorm_residual_dots_match_a_per_example_loop_and_do_not_leak():
    torch.manual_seed(0)
    model = usermodels.TinyResNet(3, width=4).double().train()
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    want = reference_dots(model, x, y, v)
    for method in ("exact", "vmap"):
        np.testing.assert_allclose(
            per_example_dots(model, x, y, v, method=method, batch_stats="fixed").numpy(), want, rtol=1e-9, atol=1e-10
        )
    np.testing.assert_allclose(per_example_dots_loop(model, x, y, v).numpy(), want, rtol=1e-9, atol=1e-10)
    # the batch-coupled gradient (through the statistics) differs: the held-fixed choice is not a no-op here
    coupled = torch.func.jvp(lambda p: nn.functional.cross_entropy(
        torch.func.functional_call(model, {**{k: b.clone() for k, b in model.named_buffers()}, **p}, (x,)), y,
        reduction="none"), (dict(model.named_parameters()),), (v,))[1].detach()
    assert np.abs(coupled.numpy() - want).max() > 1e-3
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())  # running statistics not updated


def test_sum_of_dots_equals_batch_gradient_with_statistics_held_fixed():
    """Σ_i ∇ℓ_i·v equals the directional derivative of Σ_i ℓ_i when the batch statistics are constants:
    a finite difference of the frozen forward along v (independent of the per-example machinery)."""
    torch.manual_seed(1)
    model = usermodels.TinyResNet(2, width=4).double().train()
    x, y = torch.rand(5, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dots = per_example_dots(model, x, y, v, batch_stats="fixed")
    import copy

    ref = copy.deepcopy(model)
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen = {}
    hs = [m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(mod, a[0].detach())) for m in bns]
    with torch.no_grad():
        train_losses = nn.functional.cross_entropy(ref(x), y, reduction="none")
    for h in hs:
        h.remove()
    for m in bns:
        a = seen[m]
        d = [0, *range(2, a.dim())]
        m.running_mean.copy_(a.mean(d))
        m.running_var.copy_(a.var(d, unbiased=False))
        m.eval()
    with torch.no_grad():
        frozen_losses = nn.functional.cross_entropy(ref(x), y, reduction="none")
        np.testing.assert_allclose(frozen_losses, train_losses, rtol=1e-6)  # eps of BN aside, same forward
        eps = 1e-6
        for n, p in ref.named_parameters():
            p.add_(eps * v[n])
        up = nn.functional.cross_entropy(ref(x), y, reduction="sum")
        for n, p in ref.named_parameters():
            p.sub_(2 * eps * v[n])
        down = nn.functional.cross_entropy(ref(x), y, reduction="sum")
    assert dots.sum().item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6)


def test_embedding_layernorm_attention_text_model_dots_match_a_loop():
    torch.manual_seed(2)
    model = usermodels.TextClassifier(3).double().train()
    ids = torch.randint(1, 50, (5, 7))
    ids[:, 5:] = 0
    ids[2, 3:] = 0  # rows of different lengths
    y = torch.tensor([0, 1, 2, 1, 0])
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    want = reference_dots(model, ids, y, v)
    for method in ("exact", "vmap"):
        np.testing.assert_allclose(
            per_example_dots(model, ids, y, v, method=method).numpy(), want, rtol=1e-9, atol=1e-11
        )


def test_fused_tape_refuses_batchnorm_and_methods_fall_back_to_exact():
    with pytest.raises(NotImplementedError, match="couples the rows"):
        LayerTape(usermodels.TinyResNet(3))


# ---------------------------------------------------------------- features from a hook


def test_feature_hook_reads_the_last_linear_input_and_named_layers(tmp_path):
    from valuekit.models.builtin import build_model
    from valuekit.models.features import feature_module

    m = build_model("mlp", in_features=5, num_classes=3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 5)
    feats, logits = features_and_logits(m, x, last_linear(m)[1])
    assert torch.equal(feats, m.features(x)) and torch.equal(logits, m(x))  # built-ins: the same state as before
    user = build_user_model("usermodels:resnet", num_classes=3, input_shape=(1, 8, 8))
    assert feature_module(user, "block") is user.net.block and feature_module(user, "net.block") is user.net.block
    feats, _ = features_and_logits(user.eval(), torch.rand(2, 64), feature_module(user, "block"))
    assert feats.shape == (2, 8 * 8 * 8)  # block input (N, 8, 8, 8) flattened
    with pytest.raises(InputError, match="feature_layer=nope: no such layer"):
        feature_module(user, "nope")
    paths = write_images(tmp_path)
    run = valuekit.train(paths["train"], dev=paths["dev"], model="usermodels:resnet", method="lrdi", steps=3,
                         batch_size=16, device="cpu", progress=False, out=tmp_path / "r", feature_layer="pool.1",
                         table_kw={"image_shape": (1, 8, 8)})
    assert run.meta["method_config"]["feature_layer"] == "pool.1"
    ckpt = torch.load(run.path / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["teacher"]["net.0.weight"].shape[1] == 8 + 1 + 1 + 1 + 1 + 8  # 8 features + signals


@pytest.mark.parametrize("method, settings", [
    ("dds", ["--set", "scorer=same"]), ("hostcp", ["--set", "selector_input=embedding"]),
])
def test_scorer_and_selector_from_the_users_model(tmp_path, capsys, method, settings):
    paths = write_images(tmp_path)
    assert main(["train", str(paths["train"]), "--dev", str(paths["dev"]), "--model", "usermodels:resnet",
                 "--image-shape", "1,8,8", "--method", method, "--steps", "8", "--batch-size", "16",
                 "--out", str(tmp_path / "r"), "--device", "cpu", *settings]) == 0
    vals = pd.read_parquet(tmp_path / "r" / "values.parquet")
    assert len(vals) == 48 and vals.value.notna().all()


# ---------------------------------------------------------------- images as encoded bytes


def png_tables(tmp_path, layout="struct", side=8):
    """train/dev tables with the images of `image_frame` as PNG bytes ({bytes, path} struct or plain bytes) or files."""
    import pyarrow as pa

    from valuekit.data.tables import IMAGE_STRUCT, encode_png

    paths, arrays = {}, {}
    for name, n, seed, start in (("train", 48, 1, 0), ("dev", 12, 2, 1000)):
        df = image_frame(n, seed=seed, start=start, side=side)
        pngs = [encode_png(np.asarray(p).reshape(side, side)) for p in df.pop("pixels")]
        arrays[name] = np.stack(
            [np.round(np.asarray(p) * 255) / 255 for p in image_frame(n, seed=seed, side=side).pixels]
        )
        if layout == "struct":
            col = pa.array([{"bytes": b, "path": None} for b in pngs], IMAGE_STRUCT)
        elif layout == "bytes":
            col = pa.array(pngs, pa.binary())
        else:
            (tmp_path / "img").mkdir(exist_ok=True)
            for i, b in zip(df.id, pngs):
                (tmp_path / "img" / f"{i}.png").write_bytes(b)
            col = pa.array([f"img/{i}.png" for i in df.id], pa.string())
        table = pa.Table.from_pandas(df, preserve_index=False).append_column("image", col)
        p = tmp_path / f"{name}.parquet"
        import pyarrow.parquet as pq

        pq.write_table(table, p)
        paths[name] = p
    return paths, arrays


@pytest.mark.parametrize("layout", ["struct", "bytes", "paths"])
def test_png_image_columns_decode_to_the_pixels(tmp_path, layout):
    from valuekit.data.tables import load_table

    paths, arrays = png_tables(tmp_path, layout)
    ds = load_table(paths["train"])
    assert ds.image_shape == (1, 8, 8) and ds.feature_cols == ["image"]
    np.testing.assert_allclose(ds.x.numpy(), arrays["train"], atol=1e-6)
    small = load_table(paths["train"], image_size=(4, 4))
    assert small.image_shape == (1, 4, 4) and small.x.shape == (48, 16)


def test_rgb_and_jpeg_images_and_mixed_modes(tmp_path):
    import io

    from PIL import Image

    from valuekit.data.tables import load_table

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)

    def enc(a, fmt):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        return buf.getvalue()

    jpeg = enc(rgb, "JPEG")
    df = pd.DataFrame({"id": [1, 2, 3], "label": ["a", "b", "a"], "img": [enc(grey, "PNG"), enc(rgb, "PNG"), jpeg]})
    ds = load_table(df)
    assert ds.image_shape == (3, 6, 5)  # one colour image makes every row RGB
    x = ds.x.numpy().reshape(3, 3, 6, 5)
    np.testing.assert_allclose(x[0, 0], grey / 255, atol=1e-6)
    np.testing.assert_allclose(x[0, 2], grey / 255, atol=1e-6)
    np.testing.assert_allclose(x[1], rgb.transpose(2, 0, 1) / 255, atol=1e-6)
    want = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1) / 255  # lossy: PIL's decode
    np.testing.assert_allclose(x[2], want, atol=1e-6)


def test_bad_images_give_one_line_naming_the_row_or_file(tmp_path, capsys):
    paths, _ = png_tables(tmp_path, "paths")
    df = pd.read_parquet(paths["train"])
    (tmp_path / "img" / "5.png").unlink()
    out = tmp_path / "run"
    base = ["--dev", str(paths["dev"]), "--out", str(out), "--steps", "2", "--device", "cpu"]
    assert main(["train", str(paths["train"]), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at id 5: image file" in err and "5.png not found" in err, err
    (tmp_path / "s").mkdir()
    struct_paths, _ = png_tables(tmp_path / "s", "struct")
    bad = pd.read_parquet(struct_paths["train"])
    bad.at[3, "image"] = {"bytes": b"\x89PNG not really", "path": "broken.png"}
    bad_path = tmp_path / "bad.parquet"
    bad.to_parquet(bad_path, index=False)
    assert main(["train", str(bad_path), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"column 'image' at id {bad.id[3]}: image file broken.png cannot be decoded" in err, err
    sizes = pd.read_parquet(struct_paths["dev"])
    from valuekit.data.tables import encode_png

    sizes.at[0, "image"] = {"bytes": encode_png(np.zeros((1, 6, 6))), "path": None}
    sizes_path = tmp_path / "sizes.parquet"
    sizes.to_parquet(sizes_path, index=False)
    assert main(["train", str(struct_paths["train"]), "--dev", str(sizes_path), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "image is 6x6" in err and "--image-size" in err, err
    assert not out.exists()
    del df


@pytest.mark.parametrize("method", ["uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads", "multidds"])
def test_every_method_trains_a_batchnorm_resnet_on_png_bytes_from_the_cli(tmp_path, capsys, method):
    paths, _ = png_tables(tmp_path, "struct")
    if method == "multidds":  # needs a source column: two "annotators"
        for name in ("train", "dev"):
            df = pd.read_parquet(paths[name])
            df["source"] = np.where(df.id % 2 == 0, "a", "b")
            df.to_parquet(paths[name], index=False)
    out = tmp_path / "run"
    assert main(["train", str(paths["train"]), "--dev", str(paths["dev"]), "--model", "usermodels:resnet",
                 "--method", method, "--steps", "8", "--batch-size", "16", "--out", str(out), "--device", "cpu",
                 "--set", "eval_every=4"]) == 0, capsys.readouterr().err
    vals = pd.read_parquet(out / "values.parquet")
    assert sorted(vals.example_id) == list(range(48)) and vals.value.notna().all(), method
    assert np.isfinite(vals.weight).all()


def test_python_api_on_png_bytes_with_every_method(tmp_path):
    paths, _ = png_tables(tmp_path, "struct")
    for method in ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads"):
        run = valuekit.train(paths["train"], dev=paths["dev"], model=usermodels.resnet, method=method, steps=6,
                             batch_size=16, device="cpu", progress=False, out=tmp_path / method)
        vals = pd.read_parquet(run.path / "values.parquet")
        assert len(vals) == 48 and vals.value.notna().all(), method
        assert run.meta["image_shape"] == [1, 8, 8]


def test_data_prepare_png_and_folder_layouts_decode_to_the_array_layout(tmp_path, capsys):
    from valuekit.data.tables import load_table

    for fmt in ("array", "png", "folder"):
        assert main(["data", "prepare", "digits", "-o", str(tmp_path / fmt), "--format", fmt, "--max-train", "60"]) == 0
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "png" / "train.parquet")
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    ref = load_table(tmp_path / "array" / "train.parquet")
    for fmt in ("png", "folder"):
        got = load_table(tmp_path / fmt / "train.parquet")
        assert got.image_shape == (1, 8, 8) and list(got.ids) == list(ref.ids)
        # digits are 0..16 levels scaled to [0, 1]; PNG keeps 8 bits: within half a grey level
        np.testing.assert_allclose(got.x.numpy(), ref.x.numpy(), atol=0.5 / 255 + 1e-6)
    assert (tmp_path / "folder" / "images" / "train").is_dir()


# ---------------------------------------------------------------- streamed images


def _spill_table(tmp_path, rows=23, colour_from=None, broken=None):
    """A Parquet file of PNG bytes in row groups of 4 (grey; RGB from row `colour_from`; row `broken` not a PNG)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from valuekit.data.tables import encode_png

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (3, 6, 5) if colour_from is not None and i >= colour_from else (6, 5), dtype=np.uint8)
            for i in range(rows)]
    data = [b"not a png" if i == broken else encode_png(im) for i, im in enumerate(imgs)]
    path = tmp_path / "spill.parquet"
    labels = ["a", "b"] * (rows // 2) + ["a"] * (rows % 2)
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(rows)], "label": labels, "image": pa.array(data, pa.binary())}),
        path,
        row_group_size=4,
    )
    return path, imgs


def test_spilled_image_rows_equal_the_decoded_rows_across_batches_and_in_a_worker_copy(tmp_path):
    import gc
    import pickle

    from valuekit.data.images import spill_image_column
    from valuekit.data.tables import load_table

    path, imgs = _spill_table(tmp_path, colour_from=9)  # rows 9.. are colour: the whole column becomes RGB
    eager = load_table(path, stream=False)
    rows, shape = spill_image_column(path, col="image", where="t", ids=np.arange(23), base=tmp_path, batch_rows=3)
    assert shape == eager.image_shape == (3, 6, 5) and rows.shape == eager.x.shape
    assert torch.equal(rows[torch.arange(23)], eager.x) and torch.equal(rows[10], eager.x[10])
    assert rows.store.size == sum(len(rows.encoded(i)) for i in range(23)) and rows.buf is None
    worker = pickle.loads(pickle.dumps(rows))  # what a decoding worker receives: the file's name, not its bytes
    assert len(pickle.dumps(rows)) < rows.store.size and torch.equal(worker[[0, 22]], eager.x[[0, 22]])
    spill = Path(rows.store.path)
    del worker
    gc.collect()
    assert spill.is_file()  # a worker's copy never deletes the file
    del rows
    gc.collect()
    assert not spill.exists()


def test_a_broken_image_in_a_later_batch_names_its_own_row(tmp_path):
    from valuekit.data.tables import load_table

    path, _ = _spill_table(tmp_path, broken=14)
    with pytest.raises(InputError, match=r"column 'image' at id 'r14': image bytes cannot be decoded"):
        load_table(path, stream=True)


def test_a_dataframe_streams_from_its_own_buffer_and_auto_reads_small_files_eagerly(tmp_path):
    import pyarrow.parquet as pq

    from valuekit.data.tables import arrow_image_type, load_table

    path, _ = _spill_table(tmp_path)
    frame = pq.read_table(path).to_pandas(types_mapper=arrow_image_type)
    from_frame = load_table(frame, stream=True)
    assert from_frame.x.store is None and from_frame.x.buf is not None
    auto = load_table(path)  # 23 small images: far below STREAM_BYTES, decoded up front
    assert isinstance(auto.x, torch.Tensor) and torch.equal(auto.x, from_frame.x[torch.arange(23)])


def test_streamed_images_give_the_same_run_as_decoded_ones(tmp_path):
    from valuekit.data.images import ImageRows
    from valuekit.data.tables import load_table

    paths, arrays = png_tables(tmp_path, "struct")
    eager = load_table(paths["train"], stream=False)
    lazy = load_table(paths["train"], stream=True)
    assert isinstance(lazy.x, ImageRows) and lazy.x.shape == eager.x.shape and len(lazy.x) == 48
    assert lazy.fingerprint() != "" and lazy.image_shape == eager.image_shape
    idx = torch.tensor([5, 0, 47, 5])
    assert torch.equal(lazy.x[idx], eager.x[idx]) and torch.equal(lazy.x[3:9], eager.x[3:9])
    assert torch.equal(lazy.x[7], eager.x[7]) and torch.equal(lazy.x[np.array([2, 1])], eager.x[[2, 1]])
    # a Parquet file's encoded bytes go to a temporary file, not into memory
    assert lazy.x.buf is None and 0 < lazy.x.store.size < eager.x.numel() * 4
    runs = {}
    for mode in (False, True):
        for method in ("uniform", "dds", "lrdi"):
            run = valuekit.train(paths["train"], dev=paths["dev"], model="usermodels:resnet", method=method, steps=6,
                                 batch_size=16, device="cpu", progress=False, out=tmp_path / f"{method}-{mode}",
                                 table_kw={"stream": mode})
            runs[method, mode] = pd.read_parquet(run.path / "values.parquet")
    for method in ("uniform", "dds", "lrdi"):
        pd.testing.assert_frame_equal(runs[method, False], runs[method, True])


def test_streamed_image_files_and_the_cli_flag(tmp_path, capsys):
    paths, _ = png_tables(tmp_path, "paths")
    out = tmp_path / "run"
    assert main(["train", str(paths["train"]), "--dev", str(paths["dev"]), "--model", "usermodels:resnet",
                 "--stream", "yes", "--steps", "4", "--batch-size", "16", "--out", str(out), "--device", "cpu"]) == 0
    vals = pd.read_parquet(out / "values.parquet")
    assert len(vals) == 48 and vals.value.notna().all()


def test_row_stream_prefetches_the_next_batch_without_changing_the_random_stream(tmp_path):
    from valuekit.data.streaming import RowStream
    from valuekit.data.tables import load_table
    from valuekit.training.samplers import RandomSampler

    paths, _ = png_tables(tmp_path, "struct")
    rows = load_table(paths["train"], stream=True).x
    g_ref, g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ref, sampler = RandomSampler(48, g_ref), RandomSampler(48, g)
    stream = RowStream(rows, torch.device("cpu"), workers=2)
    try:
        for _step in range(8):  # 16 rows a step: passes end at steps 3 and 6, where a method's draw intervenes
            want = ref.next(16)
            idx = sampler.next(16)
            assert torch.equal(idx, want)
            assert torch.equal(stream.get(idx), rows[idx])
            torch.randint(0, 10, (1,), generator=g)  # a method drawing from the run's generator
            torch.randint(0, 10, (1,), generator=g_ref)
            stream.predict(sampler, 16)
        assert torch.equal(g.get_state(), g_ref.get_state())  # predicting never advanced the real generator
        assert stream.hits >= 5
    finally:
        stream.close()


def test_token_id_list_column_trains_an_embedding_attention_model_with_every_method(tmp_path):
    """Token ids in a list column arrive as exact float32 ids; the user's model casts them (ids.long())."""
    rng = np.random.default_rng(0)

    def frame(n, start):
        y = rng.integers(0, 3, n)
        ids = rng.integers(1, 50, (n, 6))
        ids[np.arange(n), 0] = 10 + y  # the first token tells the class
        ids[: n // 3, 4:] = 0  # padding
        return pd.DataFrame({"id": np.arange(start, start + n), "label": y, "tokens": list(ids)})

    tr, dv = frame(48, 0), frame(12, 100)
    for method in ("uniform", "dds", "hostcp", "lrdi", "l2rw", "mwnet", "bads"):
        run = valuekit.train(tr, dev=dv, model=usermodels.text, method=method, steps=6, batch_size=16,
                             device="cpu", progress=False, out=tmp_path / method)
        vals = pd.read_parquet(run.path / "values.parquet")
        assert len(vals) == 48 and vals.value.notna().all(), method


# ---------------------------------------------------------------- precision


def test_bf16_autocast_runs_every_step_in_bf16_on_cpu_and_fp16_needs_a_scaler(tmp_path, capsys):
    paths = write_images(tmp_path)
    seen = []

    class Probe:  # records the dtype of the model's output inside each step
        def on_step_end(self, step, batch, record, trainer):
            pass

    kw = dict(steps=4, batch_size=16, device="cpu", progress=False, table_kw={"image_shape": (1, 8, 8)})
    for method in ("uniform", "dds", "lrdi"):
        model = usermodels.TinyResNet(3)
        run = valuekit.train(paths["train"], dev=paths["dev"], model=model, method=method, precision="bf16",
                             out=tmp_path / method, hooks=[Probe()], **kw)
        vals = pd.read_parquet(run.path / "values.parquet")
        assert run.meta["config"]["precision"] == "bf16" and np.isfinite(vals.value).all()
        assert run.metrics()["cuda_mem_mb"].isna().all()  # no CUDA here: the column is null
    # the step really runs under autocast: a forward hook sees bf16 conv outputs
    from valuekit.training.precision import autocast

    net = usermodels.TinyResNet(3)
    net.stem[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with autocast(torch.device("cpu"), "bf16"):
        net(torch.rand(2, 1, 8, 8))
    assert seen == [torch.bfloat16]
    fp16 = valuekit.train(paths["train"], dev=paths["dev"], model="usermodels:resnet", precision="fp16",
                          out=tmp_path / "fp16", **kw)
    assert np.isfinite(pd.read_parquet(fp16.path / "values.parquet").value).all()
    code = main(["train", str(paths["train"]), "--dev", str(paths["dev"]), "--image-shape", "1,8,8", "--method", "dds",
                 "--precision", "fp16", "--out", str(tmp_path / "no"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "use --precision bf16" in err and not (tmp_path / "no").exists()


def test_streamed_run_with_decode_workers_equals_the_in_memory_run_and_resumes(tmp_path):
    paths, _ = png_tables(tmp_path, "struct")
    kw = dict(model="usermodels:resnet", method="dds", steps=10, batch_size=16, device="cpu", progress=False,
              checkpoint_every=4)
    eager = valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "eager", table_kw={"stream": False}, **kw)
    streamed = valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "w2", table_kw={"stream": True},
                              data_workers=2, **kw)
    pd.testing.assert_frame_equal(eager.values(), streamed.values())

    class StopAt:
        def on_step_end(self, step, batch, record, trainer):
            if step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "part", table_kw={"stream": True},
                       data_workers=2, hooks=[StopAt()], **kw)
    resumed = valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "part", table_kw={"stream": True},
                             data_workers=1, resume=True, **kw)
    pd.testing.assert_frame_equal(eager.values(), resumed.values())


def test_augmentation_flips_and_crops_the_rows_a_method_sees_and_resumes_exactly(tmp_path):
    from valuekit.data.tables import load_table

    paths, _ = png_tables(tmp_path, "struct")
    raw = load_table(paths["train"]).x.reshape(-1, 1, 8, 8)
    seen = {}

    class Keep:
        def on_step_end(self, step, batch, record, trainer):
            seen[step] = (batch.idx.clone(), batch.x.reshape(-1, 1, 8, 8).clone())

    kw = dict(model="usermodels:resnet", steps=6, batch_size=16, device="cpu", progress=False, checkpoint_every=3)
    valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "flip", augment="flip", hooks=[Keep()], **kw)
    flips = 0
    for idx, x in seen.values():
        same = (x == raw[idx]).flatten(1).all(1)
        mirrored = (x == raw[idx].flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flips += int((mirrored & ~same).sum())
    assert 20 < flips < 76  # about half of 96 rows
    seen.clear()
    valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "crop", augment="crop", hooks=[Keep()], **kw)
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    for idx, x in seen.values():
        for row, i in zip(x, idx.tolist()):
            windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # (1, 9, 9, 8, 8): every 8x8 window
            assert (windows == row[:, None, None]).flatten(3).all(-1).any()
    full = valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "full", augment="crop+flip", **kw)

    class StopAt:
        def on_step_end(self, step, batch, record, trainer):
            if step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "part", augment="crop+flip",
                       hooks=[StopAt()], **kw)
    resumed = valuekit.train(paths["train"], dev=paths["dev"], out=tmp_path / "part", augment="crop+flip",
                             resume=True, **kw)
    pd.testing.assert_frame_equal(full.values(), resumed.values())
    with pytest.raises(InputError, match="augment='flip' needs an image table"):
        valuekit.train(usermodels_table(), dev=usermodels_table(), out=tmp_path / "no", augment="flip",
                       steps=2, device="cpu", progress=False)


def usermodels_table():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": np.arange(12), "label": np.arange(12) % 2, "f0": rng.normal(size=12)})


def test_valuekit_train_keeps_the_older_dataset_and_config_form(tables, tmp_path):
    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.methods.dds import Config as DDSConfig
    from valuekit.training.loop import run_training as loop_train

    tr = load_table(tables["train"])
    dv, te = load_table(tables["dev"], like=tr, name="dev"), load_table(tables["test"], like=tr, name="test")
    cfg = TrainConfig(method="dds", steps=8, batch_size=16, device="cpu", progress=False)
    a = valuekit.train(tr, dv, te, out=tmp_path / "a", config=cfg, method_config=DDSConfig(scorer_lr=0.01))
    b = loop_train(tr, dv, te, out=tmp_path / "b", config=cfg, method_config={"scorer_lr": 0.01})
    pd.testing.assert_frame_equal(a.values(), b.values())
    c = valuekit.train(tr, dv, out=tmp_path / "c", config=cfg, method_config=DDSConfig(), scorer_lr=0.01)
    pd.testing.assert_frame_equal(a.values(), c.values())
