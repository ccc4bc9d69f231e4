"""The import picture: every arrow between the package's layers points down, as README's layout says.

Read from the source with ``ast`` (no import runs), so a new arrow that runs up a layer fails here
whatever the test machine has installed.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer -> the layers of ours it may import. A layer is a subpackage or a top-level module.
ALLOWED = {
    "atomic": {"graph_runtime"},  # its errors
    "graph_runtime": set(),
    "lora": {"atomic", "graph_runtime"},
    "bases": {"atomic", "graph_runtime", "lora"},
    "nodes": {"atomic", "graph_runtime", "lora", "bases"},
    "fixtures": {"atomic", "lora", "bases"},
    "comfy_integration": {"graph_runtime"},
    "comfy_v3": {"comfy_integration", "graph_runtime"},
    "sweep": {"atomic", "comfy_integration", "graph_runtime", "nodes"},
    "api": {"graph_runtime", "nodes", "sweep"},
    "server": {"atomic", "graph_runtime", "nodes", "api", "sweep"},
    "cli": {"atomic", "graph_runtime", "nodes", "api", "fixtures", "server", "sweep"},
    "__init__": {"comfy_integration", "comfy_v3", "nodes", "api", "graph_runtime", "lora", "bases", "server", "sweep"},
}
THIRD_PARTY_BANNED = {"graph_runtime": {"torch", "diffusers", "peft", "transformers", "safetensors"}}


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", "build") or rel.parts[0].startswith("."):
            continue
        yield rel, ast.parse(path.read_text(), filename=str(rel))


def _layer(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _our_imports(rel: Path, tree: ast.AST):
    """(line, target layer, module path) of every relative import in a file."""
    package = list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > len(package):
                continue
            base = package[: len(package) - up] + (node.module.split(".") if node.module else [])
            targets = [base] if base else [[alias.name] for alias in node.names]
            for target in targets:
                yield node.lineno, target[0], ".".join(target)


def _third_party(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module.split(".")[0]


SOURCES = list(_sources())


def test_every_layer_is_known():
    unknown = sorted({_layer(rel) for rel, _ in SOURCES} - set(ALLOWED))
    assert not unknown, f"new layer(s) {unknown}: add them to ALLOWED with the arrows they may have"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_arrow_runs_up_a_layer(layer):
    wrong = [f"{rel}:{line} imports {module}"
             for rel, tree in SOURCES if _layer(rel) == layer
             for line, target, module in _our_imports(rel, tree)
             if target != layer and target not in ALLOWED[layer]]
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(wrong)


def test_graph_runtime_never_imports_torch_or_the_model_libraries():
    wrong = [f"{rel}:{line} imports {name}" for rel, tree in SOURCES if _layer(rel) == "graph_runtime"
             for line, name in _third_party(tree) if name in THIRD_PARTY_BANNED["graph_runtime"]]
    assert not wrong, "\n".join(wrong)


def test_nodes_use_the_graph_runtime_public_api_only():
    wrong = [f"{rel}:{line} imports {module}" for rel, tree in SOURCES if _layer(rel) == "nodes"
             for line, target, module in _our_imports(rel, tree)
             if target == "graph_runtime" and module != "graph_runtime"]
    assert not wrong, "nodes/ import `from ..graph_runtime import X`, not its submodules:\n" + "\n".join(wrong)


def test_the_checker_sees_an_upward_arrow(tmp_path):
    tree = ast.parse("from ..nodes.common import MODEL\n")
    found = list(_our_imports(Path("lora/x.py"), tree))
    assert found == [(1, "nodes", "nodes.common")]
    assert "nodes" not in ALLOWED["lora"]
