"""Longest functions and modules in valuekit/ and cli/ (lines incl. docstrings): python scripts/sizes.py [ROOT]."""
import ast
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
funcs, mods = [], []
for f in sorted([*root.glob("valuekit/**/*.py"), *root.glob("cli/**/*.py")]):
    text = f.read_text()
    mods.append((len(text.splitlines()), str(f.relative_to(root))))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((node.end_lineno - node.lineno + 1, f"{f.relative_to(root)}:{node.name}"))
for title, rows in (("functions", funcs), ("modules", mods)):
    print(title)
    for n, name in sorted(rows, reverse=True)[:8]:
        print(f"  {n:5d} {name}")
