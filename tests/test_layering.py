"""The layering contract: packages import one way (import-linter, `[tool.importlinter]` in pyproject.toml), and no
module takes a private name from another package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recipes", "curator_pipelines", "launchers")


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": str(lint.parent)})
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout and "4 kept" in res.stdout


def private_imports() -> list[str]:
    """`from a.b import _name` where a.b is not the importer's own package (or inside it)."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            own = ".".join(parts if path.name == "__init__.py" else parts[:-1])
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                    continue
                if node.module == own or node.module.startswith(own + "."):
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_a_private_name_from_another_package(tmp_path, monkeypatch):
    assert private_imports() == []
    # the check itself finds one when there is one
    planted = tmp_path / "recipes" / "evaluation"
    planted.mkdir(parents=True)
    (planted / "x.py").write_text("from recipes.rl.rollout import _hidden\nfrom recipes.evaluation.y import _ok\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert private_imports() == ["recipes/evaluation/x.py:1: recipes.rl.rollout._hidden"]
