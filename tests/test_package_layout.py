"""The house rules of docs/ARCHITECTURE.md, read from the source: arrows point down, comm stands alone,
a strategy family never imports another family's strategy module, blocks import no family, and the
registry imports a strategy's family only when the strategy is asked for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "raylane"
FAMILIES = ("diloco", "gradient_coding", "robust", "lgreco", "gnn", "replicas")


def _imports(path: Path) -> set[str]:
    """Every raylane module a file imports (at any depth: lazy imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylane"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("raylane"))
    return found


def _files(sub: str) -> list[Path]:
    return sorted((ROOT / sub).rglob("*.py"))


def test_comm_imports_nothing_of_raylane_but_itself():
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if not m.startswith("raylane.comm"))
           for p in _files("comm")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("package", ["strategies", "comm"])
def test_lower_layers_never_import_the_orchestrator_or_the_entry_points(package):
    upward = ("raylane.orchestrator", "raylane.train", "raylane.workers", "raylane.report", "raylane.plan")
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(upward)) for p in _files(package)}
    assert not {k: v for k, v in bad.items() if v}


def test_a_family_imports_no_other_family_strategy_module_and_blocks_import_no_family():
    bad = {}
    for family in FAMILIES + ("blocks",):
        others = [f for f in FAMILIES if f != family]
        for path in _files(f"strategies/{family}"):
            # blocks: no family at all; a family: no other family's registered strategy modules
            forbidden = [f"raylane.strategies.{f}" for f in others] if family == "blocks" else \
                [m for f in others for m in _strategy_modules(f)]
            hits = sorted(m for m in _imports(path) if any(m == x or m.startswith(x + ".") for x in forbidden))
            if hits:
                bad[str(path.relative_to(ROOT))] = hits
    assert not bad


def _strategy_modules(family: str) -> list[str]:
    from raylane.strategies.base import BUILTIN

    return [module for module in BUILTIN.values() if module.startswith(f"raylane.strategies.{family}.")]


def test_every_builtin_strategy_lives_in_its_family_or_at_the_top():
    from raylane.strategies.base import BUILTIN

    for name, module in BUILTIN.items():
        parts = module.split(".")
        assert parts[:2] == ["raylane", "strategies"] and (len(parts) == 3 or parts[2] in FAMILIES), (name, module)


def test_asking_for_one_strategy_imports_only_its_family():
    code = ("import sys, raylane.strategies as s; s.get('ddp'); "
            "print(sorted({m.split('.')[2] for m in sys.modules if m.startswith('raylane.strategies.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip()))
    assert not loaded & set(FAMILIES), loaded
    assert "ddp" in loaded
