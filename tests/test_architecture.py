"""The house rules that keep the layers apart: one owner of the run directory, one atomic write, one option
path, a checked method contract, and a method kit that is the same for one process and torchrun."""

import ast
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from valuekit.config import METHODS, TrainConfig
from valuekit.errors import InputError
from valuekit.runs import atomic, layout, reader
from valuekit.training import checkpoint, options
from valuekit.training import context as api
from valuekit.training.method import REGISTRY, Method, MethodValues, method_spec, register
from valuekit.training.samplers import Sampler

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("valuekit/**/*.py"), *ROOT.glob("cli/**/*.py")])


def _constants(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def test_run_directory_file_names_are_spelled_only_in_runs_layout():
    names = {layout.VALUES, layout.CHECKPOINT, layout.RUN_JSON, layout.LOCK}
    assert names == {"values.parquet", "checkpoint.pt", "run.json", ".lock"}
    offenders = {str(p.relative_to(ROOT)): sorted(names & set(_constants(p)))
                 for p in SOURCES if p != ROOT / "valuekit/runs/layout.py" and names & set(_constants(p))}
    assert offenders == {}


def test_only_runs_atomic_renames_files_into_place():
    users = [str(p.relative_to(ROOT)) for p in SOURCES if "os.replace(" in p.read_text()]
    assert users == ["valuekit/runs/atomic.py"]


def test_analysis_report_export_and_runs_import_without_torch():
    code = ("import sys; import valuekit.analysis.balance, valuekit.analysis.curves, valuekit.analysis.usage, "
            "valuekit.analysis.mislabel, valuekit.reporting, valuekit.export.scoring, valuekit.export.instructions, "
            "valuekit.runs.layout, valuekit.runs.reader, valuekit.runs.writer, valuekit.runs.paths; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    atomic.write_text_atomic("one", target)

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(target, broken)
    assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    assert checkpoint.load_checkpoint(tmp_path) is None
    checkpoint.save_checkpoint(tmp_path, {"step": 3, "w": torch.arange(4.0)})
    got = checkpoint.load_checkpoint(tmp_path)
    assert got["step"] == 3 and torch.equal(got["w"], torch.arange(4.0))
    torch.save({"obj": types.SimpleNamespace(a=1)}, tmp_path / layout.CHECKPOINT)  # not plain data
    with pytest.raises(Exception):  # noqa: B017 - torch's own unpickling error type differs between versions
        checkpoint.load_checkpoint(tmp_path)


def test_open_run_accepts_paths_and_runs(tmp_path):
    atomic.write_json_atomic(
        {"schema_version": layout.SCHEMA_VERSION, "status": "completed"}, tmp_path / layout.RUN_JSON
    )
    run = reader.open_run(tmp_path)
    assert reader.open_run(run) is run and run.path == tmp_path and not run.finished


# ---------------------------------------------------------------- options


def test_bounds_are_declared_and_checked_with_one_message_shape():
    from valuekit.methods import bads, dds, hostcp, lrdi, multidds

    for mod in (dds, hostcp, bads, lrdi, multidds):
        options.check(mod.Config())  # the documented defaults are valid
    with pytest.raises(InputError, match=r"^fraction=1.0: must be a finite number in \(0, 1\)$"):
        options.check(hostcp.Config(fraction=1.0))
    with pytest.raises(InputError, match=r"^unroll=0: must be in \[1, 5\]$"):
        options.check(lrdi.Config(unroll=0))
    with pytest.raises(InputError, match=r"^scorer='tree': choose from mlp, same$"):
        options.check(dds.Config(scorer="tree"))
    with pytest.raises(InputError, match=r"^lr_w=nan: must be a finite number > 0$"):
        options.check(bads.Config(lr_w=float("nan")))
    with pytest.raises(InputError, match=r"^steps=0: must be >= 1$") as err:
        options.check_loop(TrainConfig(steps=0))
    assert err.value.cli == "--steps 0: must be >= 1"  # the command line's form of the same message
    with pytest.raises(InputError, match=r"^log_every=0: must be >= 1$") as err:
        options.check_loop(TrainConfig(log_every=0))
    assert err.value.cli == "--set log_every=0: must be >= 1"


def test_resolve_types_set_pairs_for_both_configs():
    cfg, mcfg, spec = options.resolve(TrainConfig(method="l2rw"), {"unroll": 2},
                                      overrides=["eval_every=7", "virtual_lr=0.5"])
    assert cfg.eval_every == 7 and (mcfg.variant, mcfg.unroll, mcfg.virtual_lr) == ("l2rw", 2, 0.5)
    assert spec.name == "l2rw" and spec.distributed and spec.cls.evaluate is Method.evaluate
    with pytest.raises(InputError, match="unroll=9"):
        options.resolve(TrainConfig(method="lrdi"), overrides=["unroll=9"])
    with pytest.raises(InputError, match="unknown setting 'nope'"):
        options.resolve(TrainConfig(method="dds"), {"nope": 1})
    assert options.resolve(TrainConfig(method="multidds"))[2].cls.evaluate is not Method.evaluate


def test_make_trainer_validates_like_train(tables):
    from valuekit.data.tables import load_table
    from valuekit.training.loop import make_trainer

    tr = load_table(tables["train"])
    dev = load_table(tables["dev"], like=tr, name="dev")
    with pytest.raises(InputError, match="fraction=2.0"):
        make_trainer(tr, dev, TrainConfig(method="hostcp", device="cpu"), {"fraction": 2.0})
    trainer, sampler, ctx = make_trainer(tr, dev, TrainConfig(method="uniform", device="cpu", batch_size=8))
    assert isinstance(trainer, Method) and isinstance(sampler, Sampler)


# ---------------------------------------------------------------- the method contract


def test_contract_is_checked_when_a_method_is_registered():
    @dataclass
    class Config:
        a: int = 1

    class Good(Method):
        def step(self, batch): ...
        def state_dict(self): ...
        def load_state_dict(self, s): ...
        def values(self): ...

    class NoValues(Method):
        def step(self, batch): ...
        def state_dict(self): ...
        def load_state_dict(self, s): ...

    class NotAMethod:
        def step(self, batch): ...

    @dataclass
    class NoDefault:
        a: int

    try:
        assert register("toy", config=Config, a=2)(Good) is Good
        spec = method_spec("toy")
        assert spec.cls is Good and spec.Config is Config and spec.overrides == {"a": 2} and not spec.distributed
    finally:
        REGISTRY.pop("toy", None)
    with pytest.raises(TypeError, match="lacks values"):
        register("toy", config=Config)(NoValues)
    with pytest.raises(TypeError, match="need documented defaults"):
        register("toy", config=NoDefault)(Good)
    with pytest.raises(TypeError, match="needs a Config dataclass"):
        register("toy", config=int)(Good)
    with pytest.raises(TypeError, match="not a subclass"):
        register("toy", config=Config)(NotAMethod)
    with pytest.raises(TypeError, match="unknown Config fields"):
        register("toy", config=Config, b=2)(Good)
    assert "toy" not in REGISTRY


def test_every_listed_method_registers_itself_with_its_module():
    for name, module in METHODS.items():
        spec = method_spec(name)
        assert spec.name == name and spec.cls.__module__ == module and issubclass(spec.cls, Method)
    assert (method_spec("mwnet").overrides, method_spec("l2rw").overrides) == (
        {"variant": "mwnet", "meta_every": 4}, {"variant": "l2rw"})


def test_method_values_take_exactly_one_of_learned_and_value():
    assert MethodValues(learned=[1.0]).value is None and MethodValues(value=[1.0]).learned is None
    for bad in ({}, {"learned": [1.0], "value": [1.0]}, {"value": [1.0], "columns": {"value": [1.0]}}):
        with pytest.raises(TypeError):
            MethodValues(**bad)


# ---------------------------------------------------------------- the method kit


def _ctx(n=10, **kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, generator=g), torch.arange(n) % 2
    return api.TrainContext(config=TrainConfig(eval_batch_size=3), device=torch.device("cpu"), generator=g, x=x, y=y,
                            ids=None, num_classes=2, classes=["0", "1"], dev_x=x[:4], dev_y=y[:4], **kw)


def test_kit_reductions_are_plain_means_for_one_process():
    ctx = _ctx()
    v = torch.randn(7, dtype=torch.float64)
    assert torch.equal(ctx.global_mean(v), v.mean()) and torch.equal(ctx.mean_share(v, 100), v.mean())
    logits = torch.randn(4, 2)
    torch.testing.assert_close(ctx.dev_loss(logits, ctx.dev_y), api.per_example_loss(logits, ctx.dev_y).mean())
    assert ctx.global_rows(5) == 5 and torch.equal(ctx.local_slice(v, 3), v)


def test_score_rows_chunks_in_eval_mode_and_restores_each_modules_mode():
    ctx = _ctx()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    net.train()
    net[2].eval()  # mixed per-module flags come back as they were
    seen = []

    def fn(x, y):
        seen.append((len(y), net.training, net[1].training, torch.is_grad_enabled()))
        return net(x).squeeze(1) + y

    out = ctx.score_rows(fn, net)
    with torch.no_grad():
        net.eval()
        expected = net(ctx.x).squeeze(1) + ctx.y
    torch.testing.assert_close(out, expected)
    assert [s[0] for s in seen] == [3, 3, 3, 1] and not any(s[1] or s[2] or s[3] for s in seen)
    net.train()
    net[2].eval()
    ctx.score_rows(fn, net)
    assert net.training and net[1].training and not net[2].training


def test_score_rows_fills_one_tensor_with_multi_column_results_in_row_order():
    ctx = _ctx()
    out = ctx.score_rows(lambda x, y: torch.stack([x.sum(1), y.double()], 1), chunk=2)
    torch.testing.assert_close(out, torch.stack([ctx.x.sum(1), ctx.y.double()], 1))
    assert out.shape == (len(ctx.y), 2)


# ---------------------------------------------------------------- ARCHITECTURE.md


def _doc():
    return (ROOT / "ARCHITECTURE.md").read_text()


def test_architecture_page_is_short_and_has_at_most_ten_steps():
    text = _doc()
    steps = [line for line in text.split("## How to add a method")[1].splitlines() if line[:3].rstrip(". ").isdigit()]
    assert 1 <= len(steps) <= 10 and len(text.splitlines()) <= 100


def test_a_toy_method_added_through_the_documented_steps_trains(tables, tmp_path, monkeypatch):
    """Steps 1-8 of ARCHITECTURE.md, literally: its example module, registered and listed in METHODS, trained."""
    import numpy as np

    from valuekit.data.tables import load_table
    from valuekit.training import method as method_module
    from valuekit.training.loop import run_training

    code = _doc().split("```python\n")[1].split("```")[0]
    (tmp_path / "toy_method.py").write_text(code)                               # step 1
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "toy", "toy_method")                           # step 8
    monkeypatch.setattr(method_module, "REGISTRY", dict(REGISTRY))  # the toy's registration ends with the test
    tr = load_table(tables["train"])
    dev = load_table(tables["dev"], like=tr, name="dev")
    cfg = TrainConfig(method="toy", steps=12, batch_size=16, eval_every=6, log_every=6, checkpoint_every=6,
                      progress=False, device="cpu")
    with pytest.raises(InputError, match=r"temperature=0.0: must be a finite number > 0"):
        run_training(tr, dev, out=tmp_path / "bad", config=cfg, method_config={"temperature": 0.0})
    run = run_training(tr, dev, out=tmp_path / "run", config=cfg, method_config={"temperature": 2.0})
    assert run.meta["status"] == "completed" and run.meta["method_config"] == {"temperature": 2.0}
    assert run.meta["acc_metric"] == run.acc_metric == "accuracy"
    steps = run.steps().to_pandas()
    assert len(steps) == 12 * 16
    np.testing.assert_allclose(steps.groupby("step").weight.mean(), 1.0, rtol=1e-5)  # softmax x B has mean 1
    # value = minus the final model's loss on every row, recomputed here from the checkpointed model
    import toy_method

    from valuekit.training.loop import build_context

    ctx = build_context(tr.trainer_view(), dev, cfg, torch.device("cpu"))
    trainer = toy_method.Trainer(ctx, toy_method.Config())
    trainer.load_state_dict(checkpoint.load_checkpoint(run.path)["trainer"])
    with torch.no_grad():
        trainer.model.eval()
        expected = -api.per_example_loss(trainer.model(ctx.x), ctx.y).double().numpy()
    np.testing.assert_allclose(run.values()["value"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_old_runs_meta_step_dev_loss_reads_back_as_meta_loss(tmp_path):
    """Runs written before meta_loss existed logged lrdi/hostcp's meta-step dev loss as scorer_loss."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pa.schema([f for f in layout.METRICS_SCHEMA if f.name != "meta_loss"])
    for method, path in (("hostcp", tmp_path / "h"), ("dds", tmp_path / "d")):
        (path / "metrics").mkdir(parents=True)
        cols = {f.name: pa.array([1.0, 2.0] if f.name != "step" else [1, 2], f.type) for f in old}
        pq.write_table(pa.table(cols, schema=old), path / "metrics" / "part-00000.parquet")
        atomic.write_json_atomic({"schema_version": layout.SCHEMA_VERSION, "method": method, "status": "completed"},
                                 path / layout.RUN_JSON)
    h, d = reader.read_run(tmp_path / "h").metrics(), reader.read_run(tmp_path / "d").metrics()
    assert list(h.columns) == list(d.columns) == layout.METRICS_SCHEMA.names
    assert h.meta_loss.tolist() == [1.0, 2.0] and h.scorer_loss.isna().all()
    assert d.scorer_loss.tolist() == [1.0, 2.0] and d.meta_loss.isna().all() and np.isnan(d.meta_loss).all()


def test_one_label_mlp_serves_dds_and_hostcp_and_reads_old_selector_checkpoints():
    from valuekit.methods import dds, hostcp
    from valuekit.methods.scorers import LabelMLP, label_mlp

    assert dds.MLPScorer is hostcp.Selector is LabelMLP
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(4), torch.rand(4) + 0.5
    net = label_mlp(4, 3, 6, mean=mean, std=std, generator=g, device="cpu")
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(net(x, y), torch.zeros(5))  # zero read-out: uniform weights at step 0
    with torch.no_grad():
        net.label.weight.normal_(generator=g)
    # the layout HOST-CP checkpoints had before the merge: buffers on top, Linear layers at body.0/body.2
    sd = net.state_dict()
    old = {"mean": sd["body.0.mean"], "std": sd["body.0.std"], "body.0.weight": sd["body.1.weight"],
           "body.0.bias": sd["body.1.bias"], "body.2.weight": sd["body.3.weight"], "body.2.bias": sd["body.3.bias"],
           "label.weight": sd["label.weight"], "label_bias.weight": sd["label_bias.weight"]}
    fresh = LabelMLP(4, 3, 6)
    fresh.load_state_dict(old)
    h = torch.relu(torch.relu(((x - mean) / std) @ old["body.0.weight"].T + old["body.0.bias"]) @ old["body.2.weight"].T
                   + old["body.2.bias"])
    expected = (h * old["label.weight"][y]).sum(-1) + old["label_bias.weight"][y, 0]
    torch.testing.assert_close(fresh(x, y), expected)
    torch.testing.assert_close(net(x, y), expected)


def test_run_says_what_its_acc_columns_hold(tmp_path):
    for meta, expected in (({}, "accuracy"), ({"config": {"model": "seq2seq"}}, "chrF/100"),
                           ({"acc_metric": "accuracy", "config": {"model": "mlp"}}, "accuracy")):
        assert reader.Run(tmp_path, meta).acc_metric == expected
