"""A small hand-rolled mutation run (issue 22): flip one operator at a time and see whether the tests notice.

    python scripts/mutate.py --copy /tmp/mutwt --budget 30 [--only export]

Works on a copy of the repository (`git archive HEAD | tar -x -C COPY`), never on the checkout. For each
target (a module and the functions in it that are mutated) every candidate site is listed in source order:
comparison flips (< <=, > >=, == !=, in / not in), arithmetic swaps (+ -, * /), `and`/`or`, a dropped
`not`, True/False, the integer constants 0/1 and the argument of `min`/`max` swapped. An evenly spaced
sample of at most --budget sites per target is applied one at a time (ast.unparse of the mutated
tree) and the target's test files run with `pytest -x -q` (killed = the tests fail; survived = they pass;
a timeout is reported and not counted). mutmut was not used: on this shared 2-core machine one mutmut pass over these files did not
fit in the session (it reruns the whole suite's collection per mutant).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {
    # name: (module file, functions mutated (None = every function), test files)
    "export": ("valuekit/export.py", ["check_selection", "_plan", "_normalise_ids", "_extend", "_frame_result",
                                      "_check_out", "_out_schema"], ["tests/test_export.py"]),
    "selection": ("valuekit/selection.py", None, ["tests/test_selection.py"]),
    "mislabel": ("valuekit/analysis/mislabel.py", None, ["tests/test_audit.py"]),
    "values": ("valuekit/trainers/*.py", ["values", "finalize_values"],
               ["tests/test_dds.py", "tests/test_lrdi.py", "tests/test_hostcp.py", "tests/test_bads.py",
                "tests/test_multidds.py", "tests/test_loop.py"]),
}

SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


def sites(tree: ast.AST, functions) -> list[tuple[int, str]]:
    """(index into ast.walk order, description) of every mutable node inside the chosen functions."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (functions is None or node.name in functions):
            inside.update(id(n) for n in ast.walk(node))
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) not in inside:
            continue
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP:
            out.append((i, f"line {line}: {type(node.ops[0]).__name__} -> {SWAP[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAP:
            out.append((i, f"line {line}: {type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            out.append((i, f"line {line}: {type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((i, f"line {line}: drop not"))
        elif isinstance(node, ast.Constant) and (node.value is True or node.value is False):
            out.append((i, f"line {line}: {node.value} -> {not node.value}"))
        elif isinstance(node, ast.Constant) and type(node.value) is int and node.value in (0, 1):
            out.append((i, f"line {line}: {node.value} -> {1 - node.value}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            out.append((i, f"line {line}: {node.func.id} -> {'max' if node.func.id == 'min' else 'min'}"))
    return out


def mutate(tree: ast.AST, index: int) -> ast.AST:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    if isinstance(node, ast.Compare):
        node.ops[0] = SWAP[type(node.ops[0])]()
    elif isinstance(node, (ast.BinOp, ast.BoolOp)):
        node.op = SWAP[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):
        return _drop_not(tree, index)
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else 1 - node.value
    elif isinstance(node, ast.Call):
        node.func.id = "max" if node.func.id == "min" else "min"
    return tree


def _drop_not(tree: ast.AST, index: int) -> ast.AST:
    target = list(ast.walk(tree))[index]

    class Drop(ast.NodeTransformer):
        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            return node.operand if node is target else node

    return ast.fix_missing_locations(Drop().visit(tree))


def run_tests(copy_dir: Path, tests: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(copy_dir), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=copy_dir, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if r.returncode == 0 else "killed"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copy", required=True, type=Path)
    ap.add_argument("--budget", type=int, default=30, help="mutants per target (evenly spaced sample)")
    ap.add_argument("--only", default=None, help="comma-separated targets")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=Path("mutation.json"))
    args = ap.parse_args()
    results = []
    for name, (pattern, functions, tests) in TARGETS.items():
        if args.only and name not in args.only.split(","):
            continue
        files = sorted(args.copy.glob(pattern))
        candidates = []
        for f in files:
            tree = ast.parse(f.read_text())
            candidates += [(f, tree, i, d) for i, d in sites(tree, functions)]
        step = max(1, len(candidates) / args.budget)
        chosen = [candidates[int(k * step)] for k in range(min(args.budget, len(candidates)))]
        print(f"{name}: {len(candidates)} sites, {len(chosen)} mutants", flush=True)
        for f, tree, i, desc in chosen:
            original = f.read_text()
            t0 = time.time()
            try:
                f.write_text(ast.unparse(mutate(tree, i)))
                outcome = run_tests(args.copy, tests, args.timeout)
            finally:
                f.write_text(original)
            rel = str(f.relative_to(args.copy))
            results.append({"target": name, "file": rel, "mutant": desc, "outcome": outcome,
                            "seconds": round(time.time() - t0, 1)})
            print(f"  {outcome:17s} {rel} {desc} ({time.time() - t0:.0f}s)", flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    for name in TARGETS:
        rs = [r for r in results if r["target"] == name]
        if rs:
            killed = sum(r["outcome"] == "killed" for r in rs)
            decided = sum(r["outcome"] != "timeout" for r in rs)
            print(f"{name}: {killed}/{decided} killed ({100 * killed / max(decided, 1):.0f} %), "
                  f"{len(rs) - decided} timed out (not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
