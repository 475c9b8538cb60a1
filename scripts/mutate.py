"""A small hand-rolled mutation run: change one operator at a time and see whether the tests notice.

    git archive HEAD | tar -x -C /tmp/mutwt
    nice -n 10 python scripts/mutate.py --copy /tmp/mutwt --budget 60 --out reports/mutation.json

Works on a copy of the repository, never on the checkout. For each target (a module, the functions in it that
are mutated, the test files that guard it) every candidate site is listed in source order (line, column):
comparison flips (< <=, > >=, == !=, in / not in, is / is not), arithmetic swaps (+ -, * /, // *, ** *), `and`/`or`,
a dropped `not` or unary minus, True/False, the integer constants 0 <-> 1 and the name `min` <-> `max`.
Docstrings and annotations are never touched. When a target has more sites than --budget an evenly spaced
sample of --budget of them is taken (deterministic: the same commit gives the same list).

Speed: the clean run records, with a line tracer, which tests execute each line of the target file; a mutant
then runs only the tests that execute its line (all the target's tests when none does, and for default arguments
and decorators, which run when the module is imported). The parent process imports the heavy third-party modules once
(torch, pandas, pyarrow, ...; never
valuekit), then for every mutant writes the mutated module into the copy and forks a child that runs
`pytest -x -q -p no:cacheprovider` on the target's test files in-process, so each mutant pays for its tests
only. Bytecode caching is off, so the child always compiles the file as it is on disk. The per-mutant time
limit is `--factor` x the clean run's time + `--slack` seconds.

`--rerun OLD.json` re-runs only OLD's survivors and timeouts (its `after` verdict when it has one) after tests
were added, and writes every row of OLD with the newest verdict in `after` (`outcome` stays the first run's).

Outcomes: killed (tests fail), survived (tests pass), timeout (over the limit; re-run once with 3x the limit,
and reported, not counted as killed, when it still does not finish). With --wide, survivors are re-run
against the target's wider test selection (every test file that exercises the module) and the second verdict
is recorded too. Results: a JSON list (one object per mutant) and a per-target summary on stdout.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

# name: (module file, functions mutated (None = every function), fast tests, wider tests)
TARGETS = {
    "export": ("valuekit/export.py", None, ["tests/test_export.py", "tests/test_per_class.py"],
               ["tests/test_badinput.py", "tests/test_cli.py", "tests/test_llm.py", "tests/test_promises.py"]),
    "tablestream": ("valuekit/tablestream.py", None, ["tests/test_export.py"],
                    ["tests/test_badinput.py", "tests/test_cli.py", "tests/test_promises.py"]),
    "selection": ("valuekit/selection.py", None, ["tests/test_selection.py"],
                  ["tests/test_per_class.py", "tests/test_subsets.py", "tests/test_hostcp.py", "tests/test_bads.py"]),
    "mislabel": ("valuekit/analysis/mislabel.py", None, ["tests/test_audit.py", "tests/test_audit_signals.py"],
                 ["tests/test_promises.py", "tests/test_report.py", "tests/test_reliability.py"]),
    "signals": ("valuekit/trainers/signals.py", None, ["tests/test_signals.py"],
                ["tests/test_audit_signals.py", "tests/test_dds.py", "tests/test_loop.py"]),
    "values.dds": ("valuekit/trainers/dds.py", ["values"], ["tests/test_dds.py"], ["tests/test_balance.py"]),
    "values.lrdi": ("valuekit/trainers/lrdi.py", ["values"], ["tests/test_lrdi.py"],
                    ["tests/test_lrdi_teacher_inputs.py"]),
    "values.hostcp": ("valuekit/trainers/hostcp.py", ["values"], ["tests/test_hostcp.py"], []),
    "values.bads": ("valuekit/trainers/bads.py", ["values"], ["tests/test_bads.py"], []),
    "values.multidds": ("valuekit/trainers/multidds.py", ["values"], ["tests/test_multidds.py"], []),
    "values.uniform": ("valuekit/trainers/uniform.py", ["values"], ["tests/test_loop.py"], ["tests/test_signals.py"]),
}

HEAVY = ("numpy", "pandas", "pyarrow", "pyarrow.csv", "pyarrow.parquet", "pyarrow.compute", "scipy", "scipy.stats",
         "torch", "sklearn", "cvxpy", "cvxpylayers.torch", "matplotlib", "hypothesis", "pytest")

SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
        ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
        ast.Pow: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings and annotations (they change nothing the tests can see)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            out.update(id(n) for n in ast.walk(body[0]))
        for ann in [getattr(node, "returns", None), getattr(node, "annotation", None)]:
            if ann is not None:
                out.update(id(n) for n in ast.walk(ann))
    return out


def _describe(node: ast.AST) -> str | None:
    if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP:
        return f"{type(node.ops[0]).__name__} -> {SWAP[type(node.ops[0])].__name__}"
    if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAP:
        return f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        return f"drop {'not' if isinstance(node.op, ast.Not) else 'unary -'}"
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return f"{node.value} -> {not node.value}"
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value in (0, 1):
        return f"{node.value} -> {1 - node.value}"
    if isinstance(node, ast.Name) and node.id in ("min", "max"):
        return f"{node.id} -> {'max' if node.id == 'min' else 'min'}"
    return None


def sites(tree: ast.AST, functions) -> list[tuple[int, int, int, str]]:
    """(line, column, index into ast.walk order, description) of every mutable node inside the chosen functions,
    sorted by position in the file."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (functions is None or node.name in functions):
            inside.update(id(n) for n in ast.walk(node))
    skip = _skipped(tree)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in inside and id(node) not in skip and (desc := _describe(node)):
            out.append((node.lineno, node.col_offset, i, desc))
    return sorted(out)


def import_time(tree: ast.AST) -> set[int]:
    """Indices (ast.walk order) of nodes evaluated when the module is imported, not when a test calls the function:
    default arguments and decorators. Their line's coverage says only which test imported the module first."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for part in [node.args, *node.decorator_list]:
                ids.update(id(n) for n in ast.walk(part))
    return {i for i, node in enumerate(ast.walk(tree)) if id(node) in ids}


def mutate(tree: ast.AST, index: int) -> ast.AST:
    tree = copy.deepcopy(tree)
    node = list(ast.walk(tree))[index]
    if isinstance(node, ast.Compare):
        node.ops[0] = SWAP[type(node.ops[0])]()
    elif isinstance(node, (ast.BinOp, ast.BoolOp)):
        node.op = SWAP[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):
        return _drop_unary(tree, node)
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else 1 - node.value
    elif isinstance(node, ast.Name):
        node.id = "max" if node.id == "min" else "min"
    return tree


def _drop_unary(tree: ast.AST, target: ast.AST) -> ast.AST:
    class Drop(ast.NodeTransformer):
        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            return node.operand if node is target else node

    return ast.fix_missing_locations(Drop().visit(tree))


class _LineCover:
    """pytest plugin for the clean run: which tests execute each line of one file (sys.settrace, main thread)."""

    def __init__(self, path: Path):
        self.path, self.current, self.hits = str(path), None, {}

    def _local(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.hits.setdefault(frame.f_lineno, set()).add(self.current)
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename == self.path else None

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        sys.settrace(self._global)

    def pytest_runtest_logfinish(self, nodeid, location):
        sys.settrace(None)
        self.current = None


def run_tests(copy_dir: Path, tests: list[str], timeout: float, log: Path, cover: Path | None = None,
              cover_out: Path | None = None) -> tuple[str, float]:
    """Fork; the child runs pytest in-process on the copy (valuekit imported fresh from disk). With `cover`, the
    child also writes {line: [test ids]} of that file to `cover_out`."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy_dir)
            sys.path.insert(0, str(copy_dir))
            import pytest

            plugins = [_LineCover(cover)] if cover else []
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", f"--basetemp=/tmp/mutate-bt-{os.getppid()}",
                              *tests], plugins=plugins)
            if cover:
                cover_out.write_text(json.dumps({str(k): sorted(v) for k, v in plugins[0].hits.items()}))
        except BaseException:  # noqa: BLE001 - any crash of the child is a failing test run
            rc = 99
        os._exit(int(rc))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return ("survived" if rc == 0 else "killed"), time.time() - t0
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.time() - t0
        time.sleep(0.05)


def _apply(f: Path, source: str) -> None:
    f.write_text(source)
    for cache in f.parent.glob("__pycache__"):
        for pyc in cache.glob(f.stem + ".*.pyc"):
            pyc.unlink()


def _summary(results: list[dict], key: str) -> str:
    killed = sum(r[key] == "killed" for r in results)
    timeout = sum(r[key] == "timeout" for r in results)
    survived = sum(r[key] == "survived" for r in results)
    decided = killed + survived
    return (f"{len(results)} mutants: {killed} killed, {survived} survived, {timeout} timeout -> "
            f"{killed}/{decided} = {100 * killed / max(decided, 1):.1f} %")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copy", required=True, type=Path)
    ap.add_argument("--budget", type=int, default=60, help="most mutants per target (evenly spaced sample)")
    ap.add_argument("--only", default=None, help="comma-separated targets")
    ap.add_argument("--factor", type=float, default=3.0, help="time limit = factor x clean time + slack")
    ap.add_argument("--slack", type=float, default=20.0)
    ap.add_argument("--wide", action="store_true", help="re-run survivors on the wider test selection")
    ap.add_argument("--rerun", type=Path, default=None,
                    help="a previous result JSON: re-run its survivors and timeouts (same sample), and write all of "
                         "its rows with the new verdict as `after` (killed ones keep theirs)")
    ap.add_argument("--out", type=Path, default=Path("mutation.json"))
    ap.add_argument("--resume", action="store_true", help="keep the mutants already in --out and run the others")
    args = ap.parse_args()
    copy_dir = args.copy.resolve()
    if (copy_dir / ".git").exists() or Path.cwd().resolve() == copy_dir:
        sys.exit("--copy must be an exported copy (git archive), not a checkout")
    sys.dont_write_bytecode = True
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in HEAVY:  # imported once here; every forked child shares them
        try:
            __import__(name)
        except ImportError:
            pass
    for cache in copy_dir.rglob("__pycache__"):
        for pyc in cache.glob("*.pyc"):
            pyc.unlink()
    previous = json.loads(args.rerun.read_text()) if args.rerun else None
    only = {r["key"] for r in previous if r.get("after", r["outcome"]) != "killed"} if previous else None
    log = Path(f"/tmp/mutate-{os.getpid()}.log")
    results: list[dict] = json.loads(args.out.read_text()) if args.resume and args.out.exists() else []
    done = {r["key"] for r in results}
    for name, (rel, functions, fast, wide) in TARGETS.items():
        if args.only and name not in args.only.split(","):
            continue
        f = copy_dir / rel
        original = f.read_text()
        tree = ast.parse(original)
        candidates = sites(tree, functions)
        step = max(1.0, len(candidates) / args.budget)
        chosen = [candidates[int(k * step)] for k in range(min(args.budget, len(candidates)))]
        if only is not None:
            chosen = [c for c in candidates if f"{name}:{c[0]}:{c[1]}:{c[3]}" in only]
        if not chosen:
            continue
        # run order: golden-ratio interleaving, so that a run stopped early has still spread over the whole file
        chosen = [c for _, c in sorted(((i * 0.6180339887) % 1.0, c) for i, c in enumerate(chosen))]
        chosen = [c for c in chosen if f"{name}:{c[0]}:{c[1]}:{c[3]}" not in done]
        if not chosen:
            continue
        cover_out = Path(f"/tmp/mutate-cover-{os.getpid()}.json")
        clean, clean_s = run_tests(copy_dir, fast, 3600, log, cover=f, cover_out=cover_out)
        if clean != "survived":
            sys.exit(f"{name}: the clean tests fail ({log})")
        covering = {int(k): v for k, v in json.loads(cover_out.read_text()).items()}
        eager = import_time(tree)
        limit = args.factor * clean_s + args.slack
        print(f"{name}: {len(candidates)} sites, {len(chosen)} mutants, clean {clean_s:.1f}s, limit {limit:.0f}s",
              flush=True)
        for line, col, index, desc in chosen:
            try:
                _apply(f, ast.unparse(mutate(tree, index)) + "\n")
                # only the tests that run the mutated line; all of the target's tests for a default argument or
                # decorator (run at import) and for a line no test runs
                tests = fast if index in eager else (covering.get(line) or fast)
                outcome, secs = run_tests(copy_dir, tests, limit, log)
                if outcome == "timeout":
                    outcome, secs = run_tests(copy_dir, tests, 3 * limit, log)
                row = {"target": name, "file": rel, "line": line, "col": col, "mutant": desc, "outcome": outcome,
                       "seconds": round(secs, 1), "key": f"{name}:{line}:{col}:{desc}",
                       "tests": len(tests) if tests is not fast else "all"}
                if args.wide and wide:
                    row["wide"] = outcome if outcome != "survived" else run_tests(copy_dir, fast + wide,
                                                                                  args.factor * 4 * limit, log)[0]
            finally:
                _apply(f, original)
            results.append(row)
            print(f"  {row.get('wide', outcome):9s} {rel}:{line}:{col} {desc} ({secs:.0f}s)", flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    if previous:
        after = {r["key"]: r["outcome"] for r in results}
        results = [{**r, "after": after.get(r["key"], r.get("after", r["outcome"]))} for r in previous]
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name in TARGETS:
        rs = [r for r in results if r["target"] == name]
        if rs:
            print(f"{name}: fast tests: {_summary(rs, 'outcome')}", flush=True)
            if previous:
                print(f"{name}: after the new tests: {_summary(rs, 'after')}", flush=True)
            if args.wide:
                print(
                    f"{name}: with wider tests: "
                    f"{_summary([{**r, 'wide': r.get('wide', r['outcome'])} for r in rs], 'wide')}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
