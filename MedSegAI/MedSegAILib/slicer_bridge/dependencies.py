"""What Segment and Fine-tune need in the engine's Python, and an install that never changes Slicer's packages.

The dependency contract: everything the engine imports, directly or lazily, on the paths the Slicer
panel runs is either shipped by every supported Slicer (numpy, scipy, SimpleITK, pydicom — see
``shared/slicer-python``) or listed in ``Resources/requirements.txt`` and checked here:

- **Segment** needs one inference backend: ONNX Runtime for models with a ``model.onnx`` (proposed
  first; TensorFlow also runs them), TensorFlow for ``.keras``-only models.
- **Fine-tune** needs TensorFlow (training), tf2onnx + onnx (the ONNX copy of the new model) and
  ONNX Runtime (which checks that copy against Keras).

Installing uses pip in the engine's Python with *constraints*: every package the Python held
before MedSegAI first installed anything into it (Slicer's numpy, scipy, SimpleITK, pydicom,
requests ..., and whatever the user or other extensions added) is pinned at its installed version,
so pip may add packages but never upgrade or downgrade one of those; what MedSegAI itself added
(onnxruntime and its dependencies, say) stays free for the next install (TensorFlow may need
another protobuf). That baseline is recorded once per Python in ``~/.medsegai`` (or
``$MEDSEGAI_HOME``). When the constraints cannot be met, pip fails and nothing is changed. :class:`PipInstallRun` runs pip as a separate process, followed like the engine
(the panel stays responsive, the log shows pip's output, Cancel stops it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..model.backends import BACKENDS
from .engine_process import (
    EngineFailedError,
    EngineProcess,
    check_python_executable,
    default_python_executable,
    engine_environment,
    module_folder,
    same_python,
)
from ..core.errors import MedSegAIError, MedSegAIInputError
from .process_tree import hidden_window_flags

__all__ = [
    "PURPOSES",
    "SHIPPED_BY_SLICER",
    "PROTECTED_PACKAGES",
    "PipInstallRun",
    "baseline_versions",
    "installed_versions",
    "missing_packages",
    "needed_packages",
    "read_requirements",
    "requirements_to_install",
    "write_constraints",
]

PURPOSES = ("segment", "fine-tune")
# What the engine imports that every supported Slicer ships: checked, never installed by MedSegAI.
SHIPPED_BY_SLICER = ("numpy", "scipy", "simpleitk", "pydicom")
# Never listed in requirements.txt and never installed or upgraded (Slicer builds VTK itself).
PROTECTED_PACKAGES = frozenset(SHIPPED_BY_SLICER) | {"vtk"}
# import name of each distribution the check looks for
_IMPORT_NAMES = {
    "numpy": "numpy", "scipy": "scipy", "simpleitk": "SimpleITK", "pydicom": "pydicom",
    "onnxruntime": "onnxruntime", "tensorflow": "tensorflow", "tf2onnx": "tf2onnx", "onnx": "onnx",
    "ai-edge-litert": "ai_edge_litert",
}
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[A-Za-z0-9.]+)?$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return _normalise(match.group(1)) if match else ""


def read_requirements(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{package name (normalised): requirement line}`` of ``Resources/requirements.txt``.

    Raises:
        MedSegAIError: the file lists a package Slicer ships.
    """
    path = Path(path) if path else module_folder() / "Resources" / "requirements.txt"
    requirements: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        name = _requirement_name(line)
        if name:
            requirements[name] = line
    bad = sorted(PROTECTED_PACKAGES & set(requirements))
    if bad:
        raise MedSegAIError(f"requirements.txt lists packages Slicer ships ({', '.join(bad)}); remove them.")
    return requirements


def needed_packages(purpose: str = "segment", backend: str = "auto", card: Any = None) -> list[tuple[str, ...]]:
    """What ``purpose`` needs, as groups of alternatives (any one package of a group will do).

    Args:
        purpose: ``"segment"`` or ``"fine-tune"``.
        backend: the panel's backend choice (one of :data:`MedSegAILib.model.backends.BACKENDS`).
        card: the selected model's card; with ``auto``, a model without ``model.onnx`` needs TensorFlow
            (its ``model.keras``, or the TFLite interpreter for a ``model.tflite``-only folder).

    Raises:
        ValueError: unknown purpose or backend.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    groups: list[tuple[str, ...]] = [(name,) for name in SHIPPED_BY_SLICER]
    if purpose == "fine-tune":
        return [*groups, ("tensorflow",), ("tf2onnx",), ("onnx",), ("onnxruntime",)]
    files = getattr(card, "files", None) or {}
    if backend == "auto" and card is not None:
        backend = "onnx-or-tensorflow" if "onnx" in files else "tensorflow" if "keras" in files else "tflite"
    groups.append({
        "onnx": ("onnxruntime",),
        "tensorflow": ("tensorflow",),
        "tflite": ("tensorflow", "ai-edge-litert"),  # the TFLite interpreter of either
    }.get(backend, ("onnxruntime", "tensorflow")))
    return groups


def missing_packages(purpose: str = "segment", backend: str = "auto", python_executable: str | None = None,
                     card: Any = None) -> list[str]:
    """Packages ``purpose`` needs that the engine's Python cannot import (first choice of each group).

    Raises:
        ValueError: unknown purpose or backend.
        MedSegAIInputError: a chosen engine Python that cannot be run.
    """
    groups = needed_packages(purpose, backend, card)
    names = sorted({name for group in groups for name in group})
    found = _importable(names, python_executable)
    return [group[0] for group in groups if not any(found[name] for name in group)]


def _runs_in_this_python(python_executable: str | None) -> bool:
    # No engine Python chosen: the engine runs with Slicer's own Python (PythonSlicer), whose
    # packages are the ones this interpreter sees.
    return not python_executable or same_python(python_executable, sys.executable)


def _run_probe(python_executable: str, code: str, arguments: Sequence[str] = ()) -> Any:
    """Run ``code`` in another Python; returns the JSON it printed last."""
    try:
        output = subprocess.run([python_executable, "-c", code, *arguments], capture_output=True, text=True,
                                timeout=60, env=engine_environment(python_executable), check=True,
                                creationflags=hidden_window_flags(), encoding="utf-8", errors="replace").stdout
        return json.loads(output.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        raise MedSegAIInputError(
            f"The engine Python {python_executable} could not be checked ({e}); choose a working Python under Advanced."
        ) from e


def _importable(names: list[str], python_executable: str | None) -> dict[str, bool]:
    modules = [_IMPORT_NAMES[name] for name in names]
    if _runs_in_this_python(python_executable):
        importlib.invalidate_caches()
        return {name: importlib.util.find_spec(module) is not None for name, module in zip(names, modules)}
    python = check_python_executable(python_executable)
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([importlib.util.find_spec(m) is not None for m in sys.argv[1:]]))")
    flags = _run_probe(python, code, modules)
    return dict(zip(names, (bool(flag) for flag in flags)))


def requirements_to_install(missing: Sequence[str], requirements: Mapping[str, str] | None = None) -> list[str]:
    """Requirement lines (from ``requirements.txt``) for the missing packages.

    Raises:
        MedSegAIInputError: a missing package is one Slicer ships (the Python is broken or not
            Slicer's), or is not listed in ``requirements.txt``.
    """
    requirements = dict(requirements) if requirements is not None else read_requirements()
    lines = []
    for name in missing:
        key = _normalise(name)
        if key in PROTECTED_PACKAGES:
            raise MedSegAIInputError(
                f"{name} is missing from the engine's Python; Slicer ships it, so reinstall Slicer, or install "
                f"{name} into the engine Python you chose under Advanced."
            )
        if key not in requirements:
            raise MedSegAIInputError(f"{name} is needed but not listed in requirements.txt; install it manually with pip.")
        lines.append(requirements[key])
    return lines


def installed_versions(python_executable: str | None = None) -> dict[str, str]:
    """``{normalised name: version}`` of every distribution installed in the engine's Python."""
    code = ("import json; from importlib import metadata; "
            "print(json.dumps({d.metadata['Name']: d.version for d in metadata.distributions() if d.metadata['Name']}))")
    if _runs_in_this_python(python_executable):
        from importlib import metadata

        found = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    else:
        found = _run_probe(check_python_executable(python_executable), code)
    return {_normalise(name): str(version) for name, version in found.items()}


def _baseline_file(python: str) -> Path:
    home = Path(os.environ.get("MEDSEGAI_HOME", Path.home() / ".medsegai")).expanduser()
    key = hashlib.sha256(os.path.normcase(os.path.abspath(python)).encode("utf-8")).hexdigest()[:16]
    return home / f"packages-before-medsegai-{key}.json"


def baseline_versions(python_executable: str | None = None) -> dict[str, str]:
    """What the engine's Python held before MedSegAI first installed into it: the packages never changed.

    Recorded at the first call for that Python (the current installed versions), read back later.
    """
    python = python_executable or default_python_executable()
    path = _baseline_file(python)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(recorded, dict) and recorded.get("python") == python and isinstance(recorded.get("versions"), dict):
            return {str(name): str(version) for name, version in recorded["versions"].items()}
    except (OSError, ValueError):
        pass
    versions = installed_versions(python_executable)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"python": python, "versions": versions}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
    return versions


def write_constraints(path: str | os.PathLike[str], versions: Mapping[str, str]) -> Path:
    """Write pip constraints ``name==version`` that keep those packages as they are.

    Versions pip could not parse (a development build's label) are left out.
    """
    path = Path(path)
    lines = [f"{name}=={version}" for name, version in sorted(versions.items()) if _VERSION.match(version)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class PipInstallRun(EngineProcess):
    """``python -m pip install -c CONSTRAINTS LINES...`` in the engine's Python, followed like the engine.

    Args:
        lines: requirement lines (from :func:`requirements_to_install`).
        python_executable: the engine's Python; None = Slicer's own (``PythonSlicer``).

    Every package of :func:`baseline_versions` that is installed is pinned; after pip ended,
    :meth:`finish` checks that none of them changed version.
    """

    stage_weights: dict[str, float] = {}

    def __init__(self, lines: Sequence[str], python_executable: str | None = None) -> None:
        super().__init__()
        self.lines = [str(line) for line in lines]
        self.python_executable = python_executable
        self.versions_before: dict[str, str] = {}
        self.protected_versions: dict[str, str] = {}

    def start(self) -> "PipInstallRun":
        """Write the constraints and start pip; returns self."""
        if self.tree is not None:
            raise RuntimeError("this install was already started")
        if not self.lines:
            raise ValueError("nothing to install")
        python = check_python_executable(self.python_executable)
        baseline = baseline_versions(self.python_executable)
        self.versions_before = installed_versions(self.python_executable)
        kept = {name: version for name, version in self.versions_before.items() if name in baseline}
        self.temp_dir = Path(tempfile.mkdtemp(prefix="medsegai-pip-"))
        constraints = write_constraints(self.temp_dir / "constraints.txt", kept)
        self.protected_versions = kept
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        command = [python, "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints), *self.lines]
        try:
            self._launch(command, env)
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self) -> list[str]:
        """The installed requirement lines.

        Raises:
            EngineFailedError: pip failed or was cancelled, or a package that was there changed.
        """
        self.check_succeeded(
            "pip", "The installation was cancelled; packages pip had finished may remain.",
            f"pip could not install {', '.join(self.lines)} without changing packages that are already "
            "installed (see the log); install them into another Python and choose it under Advanced.",
        )
        try:
            after = installed_versions(self.python_executable)
            changed = sorted(name for name, version in self.protected_versions.items() if after.get(name) != version)
            if changed:
                raise EngineFailedError(f"pip changed installed packages ({', '.join(changed)}); reinstall Slicer.")
            return list(self.lines)
        finally:
            self.cleanup()
