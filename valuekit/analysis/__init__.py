"""Analyses of run directories (pandas/pyarrow/numpy only, no torch): class balance, source usage,
mislabel audit, subset value. Import the submodule you need, e.g. `from valuekit.analysis import balance`."""
