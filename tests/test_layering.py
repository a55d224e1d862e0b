"""Imports flow one way: the layer order of docs/architecture.md (its ```layers block, the one place it is
written), checked on every import of the package, function-local and TYPE_CHECKING ones included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "cpmbee"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"

# Upward imports that exist today and are owned by other work; each must still occur (remove it when fixed).
KNOWN_UPWARD = {
    ("cpmbee.train.pretrain", "cpmbee.__main__"): "pretrain --live starts the dashboard through the CLI",
    ("cpmbee.serve.app", "cpmbee"): "the server reads cpmbee.__version__",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _layers() -> list[list[str]]:
    """The ```layers block: one ``name: module …`` line per layer, bottom first (names relative to cpmbee;
    ``cpmbee`` alone is the package's ``__init__``)."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert block, f"{ARCHITECTURE} has no ```layers block"
    layers = []
    for line in block.group(1).splitlines():
        if line.strip():
            _, _, names = line.partition(":")
            layers.append([n if n == "cpmbee" else f"cpmbee.{n}" for n in names.split()])
    return layers


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of the longest entry that is ``module`` or a package above it."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(layers):
        for name in names:
            covers = module == name or (name != "cpmbee" and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every cpmbee module ``module`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:  # `from cpmbee.x import name` → cpmbee.x
                target = target.rpartition(".")[0]
            if target.startswith("cpmbee") and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    layers = _layers()
    missing = sorted(m for m in _modules() if _layer_of(m, layers) is None)
    assert not missing, f"add these modules to the ```layers block of docs/architecture.md: {missing}"


def test_no_upward_imports():
    layers = _layers()
    upward = {}
    for module, targets in _graph().items():
        for target in targets:
            if (_layer_of(target, layers) or 0) > (_layer_of(module, layers) or 0):
                upward[(module, target)] = f"{module} imports {target}, a higher layer"
    new = sorted(v for k, v in upward.items() if k not in KNOWN_UPWARD)
    assert not new, "imports against the layer order of docs/architecture.md:\n" + "\n".join(new)
    fixed = sorted(f"{m} → {t}" for m, t in KNOWN_UPWARD if (m, t) not in upward)
    assert not fixed, f"no longer upward, remove from KNOWN_UPWARD: {fixed}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" → ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_local_imports(tmp_path):
    """A self-check: an import inside a function body is found like a top-level one."""
    fake = tmp_path / "cpmbee" / "tokenizer.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from .generation import generate\n", encoding="utf-8")
    modules = {"cpmbee.tokenizer": fake, "cpmbee.generation": fake}
    assert _imports("cpmbee.tokenizer", fake, modules) == {"cpmbee.generation"}
    layers = _layers()
    assert _layer_of("cpmbee.generation", layers) > _layer_of("cpmbee.tokenizer", layers)
