"""The engine's boundaries, checked on its source (issue 18): who may import Slicer, Keras, the training package.

- Only ``MedSegAILib/slicer_bridge/`` imports ``slicer`` (or Qt, CTK, VTK).
- Importing any engine module leaves TensorFlow, Keras, ONNX Runtime and the training package
  unimported; ``model/keras_layers.py`` (MedSegAI's own Keras layers) is the one module whose job is
  Keras code, and no engine module imports it at module level.
- The engine imports the training package only inside functions (the ``train``/``export``/``dataset``
  plug-in of ``cli.py``, the fine-tune plan, rebuilding a network), never at module level.
- No import cycles between files of the engine and the training package, lazy imports included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = REPO_ROOT / "MedSegAI" / "MedSegAILib"
TRAINING = REPO_ROOT / "training" / "medsegai_training"
SLICER_BRIDGE = ENGINE / "slicer_bridge"
SLICER_MODULES = {"slicer", "qt", "ctk", "vtk", "mrml", "vtkSegmentationCorePython"}
HEAVY_MODULES = ("tensorflow", "keras", "onnxruntime", "tf2onnx", "onnx", "medsegai_training")
KERAS_MODULE = "MedSegAILib.model.keras_layers"


def _module_name(path: Path) -> str:
    root, package = (ENGINE, "MedSegAILib") if path.is_relative_to(ENGINE) else (TRAINING, "medsegai_training")
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> list[Path]:
    return sorted([*ENGINE.rglob("*.py"), *TRAINING.rglob("*.py")])


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(absolute module name, at module level)`` of every import in ``path``; ``from X import y``
    gives ``X.y`` when that is a module of ours, else ``X``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level if/try still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(child) for child in ast.walk(node)}
    ours = {_module_name(f) for f in _files()}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.append((candidate if candidate in ours else module, id(node) in top_level))
    return found


def test_only_the_slicer_bridge_imports_slicer() -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {module}"
        for path in ENGINE.rglob("*.py")
        if not path.is_relative_to(SLICER_BRIDGE)
        for module, _ in _imports(path)
        if module.split(".")[0] in SLICER_MODULES
    ]
    assert not offenders, offenders
    assert any(module == "slicer" for path in SLICER_BRIDGE.rglob("*.py") for module, _ in _imports(path)), \
        "the check would pass vacuously: the Slicer bridge imports slicer nowhere"


def test_engine_never_imports_training_or_keras_at_module_level() -> None:
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for module, module_level in _imports(path):
            if not module_level:
                continue
            if module.split(".")[0] == "medsegai_training":
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
            if module == KERAS_MODULE or (module.split(".")[0] in HEAVY_MODULES and _module_name(path) != KERAS_MODULE):
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not offenders, offenders


def test_importing_every_engine_module_loads_no_inference_library() -> None:
    """In a fresh interpreter: every engine module but the Keras layers imported, none of TensorFlow,
    Keras, ONNX Runtime or the training package loaded."""
    modules = sorted(_module_name(p) for p in ENGINE.rglob("*.py") if _module_name(p) != KERAS_MODULE)
    assert len(modules) > 30
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})))\n"
    )
    env_path = str(REPO_ROOT / "MedSegAI")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_no_import_cycles_between_files() -> None:
    graph = {_module_name(path): {m for m, _ in _imports(path)} for path in _files()}
    graph = {name: {m for m in targets if m in graph and m != name} for name, targets in graph.items()}
    for name in list(graph):  # a package's __init__ is not an edge of its own modules' cycles
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)
