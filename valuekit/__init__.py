"""valuekit: learn what each training example is worth while the model trains.

Public entry points are imported lazily so that `import valuekit` stays cheap and
analysis code can be used without importing torch. No subpackage shares a public
function's name, so importing one never shadows a function.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_table": ("valuekit.data.tables", "load_table"),
    "ValueDataset": ("valuekit.data.tables", "ValueDataset"),
    "train": ("valuekit.api", "train"),
    "clean": ("valuekit.pipeline", "clean"),
    "predict": ("valuekit.pipeline", "predict"),
    "TrainConfig": ("valuekit.config", "TrainConfig"),
    "Hook": ("valuekit.training.hooks", "Hook"),
    "read_run": ("valuekit.runs.reader", "read_run"),
    "score": ("valuekit.export.scoring", "score"),
    "audit": ("valuekit.analysis.mislabel", "audit"),
    "audit_summary": ("valuekit.analysis.mislabel", "audit_summary"),
    "report": ("valuekit.reporting", "write_report"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'valuekit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY) + ["__version__"]
