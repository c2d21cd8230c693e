"""The package's layers (docs/architecture.md): imports only go down the layer order, no module
imports itself through others, and the torch-free parts import without torch."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "editlib"
# lowest first; a module may import from its own layer and the layers before it
LAYERS = ["io", "model", "data", "eval", "editing", "methods", "toy", "study"]
TORCH_FREE = ["editlib.methods", "editlib.methods.registry", "editlib.editing.hparams", "editlib.study.config",
              "editlib.study.stages", "editlib.study.tables", "editlib.study.findings", "editlib.study.plotting",
              "editlib.study.ablations", "editlib.study.plan", "editlib.study.compare", "editlib.study.pinned_editor", "editlib.toy.recipe", "editlib.toy.world", "editlib.toy.pinned",
              "editlib.data.records", "editlib.data.downstream_tasks", "editlib.editing.statistics_memory", "editlib.model.architectures",
              "editlib.eval.metric_names"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the editlib modules it imports (at the top or inside a function)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges[name].update(c for c in candidates if c in modules and c != name and not name.startswith(c + "."))
    return edges


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "editlib"


def test_imports_only_go_down_the_layers():
    wrong = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                   if layer(a) in LAYERS and layer(b) in LAYERS and LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert not wrong, wrong


def test_every_subpackage_is_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {"io"}
    assert packages == set(LAYERS)


def test_no_import_cycle():
    edges = imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_parts_import_without_torch(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-1500:]
