"""The package layout: layers by concern, no import cycles, benchmarks imported by nothing in the product, a
documented subpackage for every concern, and ARCHITECTURE.md naming exactly the subpackages that exist."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "valuekit"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in [*PKG.rglob("*.py"), *(ROOT / "cli").glob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("").parts
        parts = ["valuekit", "cli", *rel[1:]] if rel[0] == "cli" else list(rel)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """module -> valuekit modules it imports anywhere in its body (function-level imports included; imports under
    `if TYPE_CHECKING:` left out: they never run)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("valuekit") else None
                if target and target != mod and not mod.startswith(target + "."):
                    edges.add(target)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert _cycles(_import_graph()) == []


def test_nothing_in_the_product_imports_benchmarks_or_the_cli():
    graph = _import_graph()
    bench = {m: sorted(t for t in ts if t.startswith("valuekit.bench")) for m, ts in graph.items()
             if not m.startswith(("valuekit.bench", "valuekit.cli"))}
    cli = {m: sorted(t for t in ts if t.startswith("valuekit.cli")) for m, ts in graph.items()
           if not m.startswith("valuekit.cli")}
    assert {m: t for m, t in {**bench, **cli}.items() if t} == {}


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed (the test extra)")
def test_import_contract_layers_and_torch_free_packages():
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_package_root_holds_few_modules_and_every_subpackage_says_what_it_owns():
    root_modules = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root_modules) <= 10, root_modules
    for init in sorted(p for p in PKG.rglob("__init__.py") if p.parent != PKG):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split("\n\n")[0].split()) >= 10, init  # a paragraph saying what it owns


def test_architecture_page_names_exactly_the_subpackages_that_exist():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"valuekit/([a-z_]+)/", text)) | set(re.findall(r"\b([a-z_]+)/\s", text.split("```")[1]))
    named -= {"cli"}
    existing = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert named == existing


def test_importing_the_product_pulls_in_no_benchmark_code():
    code = (
        "import sys, valuekit, valuekit.api, valuekit.export.scoring, valuekit.analysis.mislabel, valuekit.reporting, "
        "valuekit.training.loop, valuekit.methods.dds; print(sorted(m for m in sys.modules if "
        "m.startswith('valuekit.bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_module_shares_a_public_functions_name():
    """Importing a submodule binds its name on the package: one named like a public function would replace it."""
    import valuekit

    clashes = [n for n in valuekit._LAZY if (PKG / n).is_dir() or (PKG / f"{n}.py").is_file()]
    assert clashes == []
    assert callable(valuekit.clean) and valuekit.clean.__module__ == "valuekit.pipeline"
