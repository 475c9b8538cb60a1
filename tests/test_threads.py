import pytest
import torch

from valuekit.errors import InputError
from valuekit.training.threads import apply_threads, default_threads, idle_cores, parse_threads, resolve_threads


def test_parse_threads():
    assert parse_threads(None) is None and parse_threads("") is None
    assert parse_threads("3") == 3 and parse_threads(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(InputError, match="expected a whole number of threads >= 1"):
            parse_threads(bad)


def test_default_policy():
    # small built-in models and CUDA runs: one thread, whatever the machine
    for m in ("linear", "mlp", "cnn", None):
        assert default_threads(m, "cpu", cores=16, load=0.0) == 1
    assert default_threads("resnet", "cuda", cores=16, load=0.0) == 1
    # larger models: the idle cores
    assert default_threads("resnet", "cpu", cores=16, load=0.0) == 16
    assert default_threads("resnet", "cpu", cores=16, load=3.6) == 12
    assert default_threads("resnet", "cpu", cores=2, load=13.0) == 1
    assert default_threads("resnet", "cpu", cores=4, load=None) == 4
    assert idle_cores(8, 0.4) == 8 and idle_cores(8, 0.6) == 7 and idle_cores(2, 50.0) == 1


def test_resolve_order(monkeypatch):
    monkeypatch.delenv("VALUEKIT_THREADS", raising=False)
    assert resolve_threads(None, model="mlp") == 1
    monkeypatch.setenv("VALUEKIT_THREADS", "3")
    assert resolve_threads(None, model="mlp") == 3  # the environment beats the default
    assert resolve_threads("2", model="mlp") == 2  # the option beats the environment
    monkeypatch.setenv("VALUEKIT_THREADS", "lots")
    with pytest.raises(InputError, match=r"\$VALUEKIT_THREADS 'lots'"):
        resolve_threads(None)


def test_apply_threads(monkeypatch):
    monkeypatch.delenv("VALUEKIT_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
        assert apply_threads(None, model="mlp") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_threads_option(tmp_path, monkeypatch):
    """`valuekit train --threads N` sets torch's thread count before training; bad values exit 2 with one line."""
    from valuekit.cli.main import main

    from valuekit.bench.common import BUNDLED

    monkeypatch.delenv("VALUEKIT_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        rc = main(["train", str(BUNDLED / "train.parquet"), "--dev", str(BUNDLED / "dev.parquet"), "--steps", "2",
                   "--out", str(tmp_path / "run"), "--threads", "2"])
        assert rc == 0 and torch.get_num_threads() == 2
        rc = main(["train", str(BUNDLED / "train.parquet"), "--dev", str(BUNDLED / "dev.parquet"), "--steps", "2",
                   "--out", str(tmp_path / "run2")])
        assert rc == 0 and torch.get_num_threads() == 1  # the default for the mlp
        assert main(["train", str(BUNDLED / "train.parquet"), "--dev", str(BUNDLED / "dev.parquet"),
                     "--out", str(tmp_path / "run3"), "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)
