"""The dependency contract, read from the code: every package the engine imports is accounted for.

Each third-party import in ``MedSegAILib`` and in the training package (what Fine-tune runs) is one
of: shipped by every supported Slicer (``shared/slicer-python``), listed in
``Resources/requirements.txt`` (checked and offered by the panel), or a command-line-only extra
whose absence gives one clear ``error:`` line. A new import that is none of these fails here, before
it fails in a user's Slicer. ``test_slicer_python.py`` then runs the panel's paths in Slicer's Python.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from MedSegAILib.slicer_bridge import dependencies

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = REPO_ROOT / "MedSegAI" / "MedSegAILib"
TRAINING = REPO_ROOT / "training" / "medsegai_training"
SLICER_LISTS = REPO_ROOT.parent / "shared" / "slicer-python"
SUPPORTED = ("5.8.1", "5.10.0", "5.12.3")

# import name -> distribution name, where they differ
DISTRIBUTION = {"SimpleITK": "simpleitk", "yaml": "pyyaml", "dicomweb_client": "dicomweb-client", "PIL": "pillow"}
# Slicer's own modules (built with Slicer, not on PyPI)
SLICER_BUILT = {"slicer", "vtk", "qt", "ctk", "mrml"}
# Packages that come with a listed requirement (keras with tensorflow).
COMES_WITH = {"keras": "tensorflow"}
# Command-line-only extras: the panel never takes these paths; without the package the CLI says so.
CLI_ONLY = {
    "slicerio": "writing/reading .seg.nrrd files (segfile.py); the panel writes a plain .nrrd labelmap",
    "matplotlib": "the demo's preview.png and evaluation figures",
    "yaml": "--config FILE.yaml for training (JSON configs need nothing)",
    "ai_edge_litert": "--backend tflite, preferred over TensorFlow's own TFLite interpreter when installed",
    "highdicom": "DICOM SEG output (segment -o X.dcm, --dicom-seg, --dicomweb, watch); Slicer ships it from 5.12",
}


def _third_party_imports(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("MedSegAILib", "medsegai_training"):
                    found.setdefault(top, set()).add(path.name)
    return found


def _shipped_by_every_slicer() -> set[str]:
    shipped = None
    for release in SUPPORTED:
        names = set()
        for line in (SLICER_LISTS / f"slicer-{release}.txt").read_text(encoding="utf-8").splitlines():
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
            if match:
                names.add(match.group(1).lower().replace("_", "-"))
        shipped = names if shipped is None else shipped & names
    return shipped or set()


@pytest.mark.parametrize("folder", [ENGINE, TRAINING], ids=["engine", "training"])
def test_every_import_is_shipped_listed_or_cli_only(folder: Path) -> None:
    shipped = _shipped_by_every_slicer()
    assert {"numpy", "scipy", "simpleitk", "pydicom"} <= shipped
    listed = set(dependencies.read_requirements())
    unaccounted = {}
    for module, files in _third_party_imports(folder).items():
        distribution = DISTRIBUTION.get(module, module.lower())
        if (distribution in shipped or module in SLICER_BUILT or distribution in listed
                or COMES_WITH.get(module) in listed or module in CLI_ONLY):
            continue
        unaccounted[module] = sorted(files)
    assert not unaccounted, f"imports neither shipped by Slicer, in requirements.txt nor CLI-only: {unaccounted}"


def test_what_slicer_ships_is_checked_but_never_installed() -> None:
    assert set(dependencies.SHIPPED_BY_SLICER) <= _shipped_by_every_slicer()
    assert not set(dependencies.read_requirements()) & _shipped_by_every_slicer()


@pytest.mark.parametrize("module", ["slicerio", "matplotlib"])
def test_a_missing_cli_only_package_is_one_clear_line(module: str, tmp_path: Path, ct_small: Path) -> None:
    """Without the extra, the command that needs it says what to install (exit 2), never 'unexpected failure'."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        f"class _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r} or name.startswith({module!r} + '.'):\n"
        f"            raise ModuleNotFoundError(\"No module named '\" + name + \"'\", name=name)\n"
        "sys.meta_path.insert(0, _Block())\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    if module == "slicerio":
        command = ["-m", "MedSegAILib.cli", "segment", str(ct_small), "-o", str(tmp_path / "out.seg.nrrd"),
                   "--progress", "none"]
    else:
        command = ["-m", "MedSegAILib.demo", "--output", str(tmp_path / "out")]
    completed = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=env,
                               check=False)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and module in lines[0], lines
    assert not list(tmp_path.glob("out*")) or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("folder", [ENGINE, TRAINING], ids=["engine", "training"])
def test_no_helper_process_opens_a_console_window(folder: Path) -> None:
    """On Windows a console child of the (window-less) engine flashes a console: every subprocess call
    outside process_tree.py passes hidden_window_flags(), and process_tree adds CREATE_NO_WINDOW itself."""
    offenders = []
    for path in folder.rglob("*.py"):
        if path.name == "process_tree.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                    and node.func.attr in ("run", "Popen", "call", "check_call", "check_output")):
                if not any(keyword.arg == "creationflags" and "hidden_window_flags" in ast.unparse(keyword.value)
                           for keyword in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"subprocess calls that may open a console window on Windows: {offenders}"
