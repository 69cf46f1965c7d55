"""Virtual environments built like 3D Slicer's own Python, for the Slicer-Python tests.

Each supported Slicer release ships a fixed Python with a fixed package set; ``shared/slicer-python``
lists them (``slicer-<version>.txt``: first line the Python version, then ``name==version`` lines
taken from Slicer's SuperBuild). A *base* environment per release holds exactly that list and is
cached under ``$MEDSEGAI_CACHE`` (default ``~/.cache/medsegai``), keyed by the list's content, so
it is built once; each test works on a fresh copy of it (the tests install packages into it, as
the panel does in a real Slicer). pip's own cache keeps the downloads between runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["SLICER_PYTHON_LISTS", "interpreter_for", "base_environment", "fresh_environment", "environment_python"]

_SHARED = (Path(os.environ["MEDSEGAI_SHARED_DATA"]).parent if os.environ.get("MEDSEGAI_SHARED_DATA")
           else Path(__file__).resolve().parents[3] / "shared")
SLICER_PYTHON_LISTS = _SHARED / "slicer-python"
_BUILD_TIMEOUT = 1800


def _list_file(version: str) -> Path:
    return SLICER_PYTHON_LISTS / f"slicer-{version}.txt"


def python_version_of(version: str) -> str:
    """``"3.9"`` for Slicer 5.8.1: the ``major.minor`` named on the list's first line."""
    first = _list_file(version).read_text(encoding="utf-8").splitlines()[0]
    match = re.match(r"#\s*python\s+(\d+\.\d+)", first)
    if not match:
        raise ValueError(f"{_list_file(version)} does not start with '# python X.Y.Z'")
    return match.group(1)


def interpreter_for(version: str) -> Path | None:
    """An interpreter of the Python that Slicer ``version`` runs (PATH, then pyenv), or None."""
    minor = python_version_of(version)
    found = shutil.which(f"python{minor}")
    candidates = [Path(found)] if found else []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += sorted(pyenv.glob(f"{minor}.*/bin/python{minor}"), reverse=True)
    for candidate in candidates:
        completed = subprocess.run([str(candidate), "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=60, check=False)
        if completed.returncode == 0 and completed.stdout.strip() == minor:
            return candidate
    return None


def environment_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def base_environment(version: str) -> Path:
    """The cached environment with exactly Slicer ``version``'s packages (built when missing).

    Raises:
        RuntimeError: no interpreter for that Python, or pip could not install the list.
    """
    list_file = _list_file(version)
    interpreter = interpreter_for(version)
    if interpreter is None:
        raise RuntimeError(f"Python {python_version_of(version)} (what Slicer {version} runs) is not installed; "
                           "install it (e.g. with pyenv) to run the Slicer-Python tests.")
    key = hashlib.sha256(list_file.read_bytes() + str(interpreter.resolve()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MEDSEGAI_CACHE", Path.home() / ".cache" / "medsegai")) / "slicer-python"
    folder = cache / f"slicer-{version}-{key}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(interpreter), "-m", "venv", str(folder)], check=True, timeout=600)
    completed = subprocess.run([str(environment_python(folder)), "-m", "pip", "install", "--quiet",
                                "--disable-pip-version-check", "-r", str(list_file)],
                               capture_output=True, text=True, timeout=_BUILD_TIMEOUT, check=False)
    if completed.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"pip could not install {list_file.name}:\n{completed.stderr[-3000:]}")
    marker.write_text(list_file.name + "\n", encoding="utf-8")
    return folder


def fresh_environment(version: str, target: Path) -> Path:
    """A private copy of the base environment at ``target``; returns its Python.

    The copy is used through ``python -m ...`` only (its scripts' shebangs name the base folder).
    """
    shutil.copytree(base_environment(version), target, symlinks=True, ignore=shutil.ignore_patterns(".complete"))
    return environment_python(target)


def pinned_versions(version: str) -> dict[str, str]:
    """``{normalised name: version}`` of the list (what Slicer ``version`` ships)."""
    pins = {}
    for line in _list_file(version).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins
