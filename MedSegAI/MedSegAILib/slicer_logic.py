"""The Slicer module's logic, on any ``vtkMRMLScene``: run the engine, fill the scene, export, fine-tune.

``MedSegAI.py`` (the scripted module) is a thin GUI over this module; the pytest suites drive it
with ``slicer-core``'s real MRML. Nothing here imports Qt, and ``slicer`` is imported only inside
functions (through :mod:`MedSegAILib.mrml`).

The engine always runs in a separate process (Slicer's own Python by default, or a Python the user
chose), so Slicer stays responsive and a crash in TensorFlow/ONNX Runtime cannot take Slicer down::

    python -m MedSegAILib.cli segment CH0.nrrd [CH1.nrrd ...] -o TMP/labels.nrrd --model FOLDER
           --progress json --measurements TMP/measurements.json --device D --backend B --overlap X
           [--tta] [--batch-size N] [post-processing switches]

The process prints one JSON object a line on stdout (``stage``, ``done``, ``total``, ``message``),
exits 0 on success, 2 with an ``error: ...`` line on stderr for bad input, 130 when cancelled and
1 otherwise. :class:`EngineProcess` reads both pipes on background threads; :meth:`poll` never
blocks, so the widget calls it from a ``QTimer``. The scene is changed only by
:meth:`SegmentationRun.finish` after a successful run; failure and cancel leave it as it was.

Arrays follow :class:`MedSegAILib.image.Volume`: ``(z, y, x)``, LPS geometry.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import mrml
from .errors import MedSegAIError, MedSegAIInputError, ModelFolderError
from .image import Volume

__all__ = [
    "EngineFailedError",
    "EngineOptions",
    "ProgressEvent",
    "EngineProcess",
    "SegmentationRun",
    "EngineRun",
    "SegmentationResult",
    "FineTuneRun",
    "STAGE_WEIGHTS",
    "TRAINING_STAGE_WEIGHTS",
    "module_folder",
    "default_python_executable",
    "engine_environment",
    "resolve_model",
    "run_segmentation_blocking",
    "segments_to_be_replaced",
    "export_for_training",
    "dataset_case_count",
    "dataset_case_changed_voxels",
    "start_fine_tune",
    "import_model",
    "read_requirements",
    "missing_packages",
    "requirements_to_install",
    "PROTECTED_PACKAGES",
    "SOURCE_MODEL_ATTRIBUTE",
]

# Share of the whole run each engine stage takes (for one progress bar and its ETA).
STAGE_WEIGHTS: dict[str, float] = {
    "read": 0.04,
    "preprocess": 0.06,
    "model": 0.75,
    "stitch": 0.04,
    "postprocess": 0.07,
    "write": 0.04,
}
# The same for fine-tuning (``medsegai train --progress json``).
TRAINING_STAGE_WEIGHTS: dict[str, float] = {"preprocess": 0.08, "train": 0.88, "export": 0.04}
# Packages that Slicer ships itself: never installed or upgraded by MedSegAI.
PROTECTED_PACKAGES = frozenset({"numpy", "simpleitk", "vtk"})
# Segmentation node attribute recording which model produced the first mask (JSON).
SOURCE_MODEL_ATTRIBUTE = "MedSegAI.SourceModel"
CANCEL_GRACE_SECONDS = 1.5
_LOG_LINES_KEPT = 2000


class EngineFailedError(MedSegAIInputError):
    """The engine process failed; the message is the engine's ``error:`` line or a short summary."""


# --------------------------------------------------------------------------------------------
# Options, progress, environment
# --------------------------------------------------------------------------------------------


@dataclass
class EngineOptions:
    """What the Advanced section of the panel sets.

    Attributes:
        device: ``"auto"``, ``"cpu"`` or ``"gpu"``.
        backend: ``"auto"``, ``"tensorflow"`` or ``"onnx"``.
        overlap: sliding-window overlap in [0, 1).
        tta: flip test-time augmentation.
        batch_size: windows per network call; None = the model's default.
        postprocessing: False = plain argmax (no post-processing at all).
        largest_component: keep the largest component of each label; None = model default.
        fill_holes: fill holes in each label; None = model default.
        min_island_mm3: remove islands smaller than this; None = model default.
        python_executable: the engine's Python; None/"" = Slicer's own (or this interpreter).
    """

    device: str = "auto"
    backend: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    batch_size: int | None = None
    postprocessing: bool = True
    largest_component: bool | None = None
    fill_holes: bool | None = None
    min_island_mm3: float | None = None
    python_executable: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.backend not in ("auto", "tensorflow", "onnx"):
            raise ValueError(f"backend must be auto, tensorflow or onnx, got {self.backend!r}")
        if not 0 <= float(self.overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size!r}")
        if self.min_island_mm3 is not None and float(self.min_island_mm3) < 0:
            raise ValueError(f"min_island_mm3 must be >= 0 or None, got {self.min_island_mm3!r}")

    def cli_arguments(self) -> list[str]:
        """The ``medsegai segment`` options for these settings."""
        self.validate()
        args = ["--device", self.device, "--backend", self.backend, "--overlap", repr(float(self.overlap))]
        if self.tta:
            args.append("--tta")
        if self.batch_size:
            args += ["--batch-size", str(int(self.batch_size))]
        if not self.postprocessing:
            args.append("--no-postprocessing")
            return args
        if self.largest_component is not None:
            args.append("--largest-component" if self.largest_component else "--no-largest-component")
        if self.fill_holes is not None:
            args.append("--fill-holes" if self.fill_holes else "--no-fill-holes")
        if self.min_island_mm3 is not None:
            args += ["--min-island-mm3", repr(float(self.min_island_mm3))]
        return args


@dataclass(frozen=True)
class ProgressEvent:
    """One progress line of the engine, with the overall estimate.

    Attributes:
        stage: engine stage (``read``, ``preprocess``, ``model``, ..., or ``train``).
        done: steps done in this stage.
        total: steps in this stage (0 = unknown).
        message: the engine's message (e.g. epoch and validation Dice while training).
        fraction: estimated fraction of the whole run done, in [0, 1].
        eta_seconds: estimated seconds left, or None while too early to say.
    """

    stage: str
    done: int
    total: int
    message: str
    fraction: float
    eta_seconds: float | None


def module_folder() -> Path:
    """The folder holding ``MedSegAILib`` (the Slicer module folder); goes on the engine's PYTHONPATH."""
    return Path(__file__).resolve().parents[1]


def _python_path_entries() -> list[str]:
    entries = [str(module_folder())]
    training = module_folder().parent / "training"  # source tree; installed extensions ship it beside MedSegAILib
    if (training / "medsegai_training").is_dir():
        entries.append(str(training))
    return entries


def _same_python(first: str, second: str) -> bool:
    """Same executable path (symlinks are not resolved: a venv's python links to its base)."""
    return os.path.normcase(os.path.abspath(first)) == os.path.normcase(os.path.abspath(second))


def _running_in_slicer() -> bool:
    """True inside the Slicer application (where ``slicer`` is imported and has ``app``)."""
    module = sys.modules.get("slicer")
    return module is not None and hasattr(module, "app")


def default_python_executable() -> str:
    """Slicer's own Python (``PythonSlicer``) inside Slicer, else this interpreter."""
    if _running_in_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def engine_environment(python_executable: str | None = None) -> dict[str, str]:
    """Environment for the engine process: MedSegAILib importable, output unbuffered.

    An external Python gets Slicer's *startup* environment (without Slicer's PYTHONHOME and
    library paths) so it runs as it would from a terminal.
    """
    external = bool(python_executable) and not _same_python(str(python_executable), default_python_executable())
    env = dict(os.environ)
    if external and _running_in_slicer():
        import slicer

        env = dict(slicer.util.startupEnvironment())
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(_python_path_entries() + [p for p in existing if p not in _python_path_entries()])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _check_python_executable(python_executable: str | None) -> str:
    if not python_executable:
        return default_python_executable()
    path = Path(python_executable).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise MedSegAIInputError(
            f"The engine Python {python_executable} does not exist or is not executable; "
            "choose a Python executable under Advanced or clear the field to use Slicer's Python."
        )
    return str(path)


def resolve_model(model: Any) -> Any:
    """A :class:`MedSegAILib.modelcard.ModelCard` from a card, a model id or a model folder.

    Raises:
        ModelFolderError: unknown id, or a folder that fails validation.
    """
    from .modelcard import ModelCard, find_model

    if isinstance(model, ModelCard):
        return model
    if model is None or (isinstance(model, str) and not model.strip()):
        raise ModelFolderError("No model is selected; select an installed model or import one.")
    return find_model(str(model))


# --------------------------------------------------------------------------------------------
# A process with JSON-line progress
# --------------------------------------------------------------------------------------------


class EngineProcess:
    """A child process printing JSON progress lines, followed without blocking.

    Call :meth:`poll` repeatedly (e.g. from a ``QTimer``); it returns the new progress events.
    :meth:`read_log` returns the new log lines (non-JSON stdout and all of stderr).
    ``stage_weights`` (stage -> share of the whole run, in run order) turns stage progress into one
    overall fraction, which never decreases.
    """

    stage_weights: dict[str, float] = STAGE_WEIGHTS

    def __init__(self) -> None:
        self.command: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.temp_dir: Path | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.start_time = 0.0
        self.last_event: ProgressEvent | None = None
        self.log_lines: deque[str] = deque(maxlen=_LOG_LINES_KEPT)
        self._new_log: list[str] = []
        self._stderr_tail: deque[str] = deque(maxlen=200)
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._fraction_so_far = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def _launch(self, command: list[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.command = list(command)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self.start_time = time.monotonic()
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=dict(env), cwd=cwd, **kwargs,
            )
        except OSError as e:
            raise EngineFailedError(
                f"The engine could not be started with {self.command[0]} ({e.strerror or e}); "
                "check the engine Python under Advanced."
            ) from e
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._reader, args=(name, stream), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _reader(self, name: str, stream: Any) -> None:
        try:
            for line in stream:
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def state(self) -> str:
        """``"not started"``, ``"running"``, ``"cancelled"``, ``"succeeded"`` or ``"failed"``."""
        if self.process is None:
            return "cancelled" if self.cancelled else "not started"
        if self.running:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "succeeded" if self.process.returncode == 0 else "failed"

    def poll(self) -> list[ProgressEvent]:
        """Read what the process printed so far (never blocks); returns the new progress events."""
        events: list[ProgressEvent] = []
        if self.process is None:
            return events
        ended = self.process.poll() is not None
        if ended:
            for thread in self._threads:
                thread.join(timeout=5)
            self.returncode = self.process.returncode
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            event = self._parse_progress(line) if name == "stdout" else None
            if event is not None:
                events.append(event)
                self.last_event = event
                continue
            if name == "stderr":
                self._stderr_tail.append(line)
            if line.strip():
                self.log_lines.append(line)
                self._new_log.append(line)
        return events

    def read_log(self) -> list[str]:
        """Log lines received since the last call (call :meth:`poll` first)."""
        lines, self._new_log = self._new_log, []
        return lines

    def wait(self, timeout: float | None = None, progress: Callable[[ProgressEvent], None] | None = None) -> int:
        """Block until the process ends (polling every 50 ms); returns its exit code.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the process is cancelled).
        """
        if self.process is None:
            raise RuntimeError("the process was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if progress is not None:
                    progress(event)
            if not self.running:
                for event in self.poll():
                    if progress is not None:
                        progress(event)
                return int(self.process.returncode)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the engine did not finish within {timeout} s and was stopped")
            time.sleep(0.05)

    def cancel(self, grace_seconds: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the process: terminate, kill after ``grace_seconds`` (≤ 2 s total), remove temp files."""
        self.cancelled = True
        process = self.process
        if process is not None and process.poll() is None:
            self._signal(process, terminate=True)
            try:
                process.wait(timeout=max(0.0, min(grace_seconds, 1.9)))
            except subprocess.TimeoutExpired:
                self._signal(process, terminate=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
        if process is not None:
            self.returncode = process.poll()
            self.poll()
        self.cleanup()

    @staticmethod
    def _signal(process: subprocess.Popen[str], terminate: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.name != "nt":
                os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
            elif terminate:
                process.terminate()
            else:
                process.kill()

    def cleanup(self) -> None:
        """Remove the temporary folder (inputs, outputs) of this run."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    # -- progress ----------------------------------------------------------------------------

    def _parse_progress(self, line: str) -> ProgressEvent | None:
        text = line.strip()
        if not text.startswith("{"):
            return None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(record, dict) or "stage" not in record:
            return None
        stage = str(record.get("stage", ""))
        done = int(record.get("done", 0) or 0)
        total = int(record.get("total", 0) or 0)
        message = str(record.get("message", "") or "")
        fraction = self._fraction(stage, done, total)
        elapsed = time.monotonic() - self.start_time
        eta = elapsed * (1.0 - fraction) / fraction if 0.02 <= fraction < 1.0 else (0.0 if fraction >= 1.0 else None)
        return ProgressEvent(stage, done, total, message, fraction, eta)

    def _fraction(self, stage: str, done: int, total: int) -> float:
        within = min(1.0, done / total) if total > 0 else 0.0
        weights = self.stage_weights
        if stage in weights:
            order = list(weights)
            before = sum(weights[s] for s in order[: order.index(stage)])
            fraction = min(1.0, before + weights[stage] * within)
        else:
            fraction = self._fraction_so_far
        self._fraction_so_far = max(self._fraction_so_far, float(fraction))
        return self._fraction_so_far

    # -- errors ------------------------------------------------------------------------------

    def error_message(self, what: str = "The engine") -> str:
        """One sentence for a failed run, built from the engine's last ``error:`` line."""
        for line in reversed(self._stderr_tail):
            stripped = line.strip()
            if stripped.lower().startswith("error:"):
                text = stripped[len("error:"):].strip()
                return text[:1].upper() + text[1:] if text else f"{what} failed."
        code = self.returncode
        last = next((line.strip() for line in reversed(self._stderr_tail) if line.strip()), "")
        if code is not None and code < 0:
            reason = f"was stopped by signal {-code}"
        else:
            reason = f"failed with exit code {code}"
        detail = f" (last message: {last[:200]})" if last else ""
        return f"{what} {reason}{detail}; see the log for details."


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """What :meth:`SegmentationRun.finish` put into the scene.

    Attributes:
        segmentation_node: the filled ``vtkMRMLSegmentationNode``.
        table_node: the measurements ``vtkMRMLTableNode`` (None when the engine wrote none).
        labels: the AI labelmap (uint8 ``(z, y, x)`` on the first input's grid), kept to count
            the voxels the user changes before export.
        measurements: measurement rows as the engine wrote them.
        card: the model card used.
        segment_ids: ids of the label segments, in label order.
        seconds: wall time of the run.
    """

    segmentation_node: Any
    table_node: Any
    labels: Volume
    measurements: list[dict[str, Any]]
    card: Any
    segment_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _write_input(path: Path, volume: Volume) -> None:
    """Uncompressed NRRD with only geometry in the header (fast to write and read)."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), False)


def _read_labels(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise EngineFailedError(f"The engine finished but its result could not be read ({e}); run the segmentation again.") from e
    return Volume.from_sitk(image)


class SegmentationRun(EngineProcess):
    """One segmentation of the selected volume nodes in a separate engine process.

    Args:
        volume_nodes: one scalar volume node per model channel, in the model's channel order.
        model: a ModelCard, model id or model folder.
        output_segmentation_node: segmentation node to fill; None creates
            ``"<first volume name> MedSegAI"`` in :meth:`finish`.
        options: :class:`EngineOptions`.
        temp_root: where the run's temporary folder goes (default: the system temp folder).

    Raises:
        MedSegAIInputError: (from :meth:`start`) missing/wrong volumes, wrong channel count,
            invalid model, bad engine Python.
    """

    def __init__(self, volume_nodes: Sequence[Any], model: Any, output_segmentation_node: Any = None,
                 options: EngineOptions | None = None, temp_root: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.volume_nodes = list(volume_nodes) if volume_nodes is not None else []
        self.model = model
        self.output_segmentation_node = output_segmentation_node
        self.options = options or EngineOptions()
        self.temp_root = temp_root
        self.card: Any = None
        self.input_volumes: list[Volume] = []
        self.python_executable = ""
        self.labels_path: Path | None = None
        self.measurements_path: Path | None = None

    def prepare(self) -> None:
        """Validate model, options and inputs (no files written, nothing started)."""
        self.options.validate()
        self.card = resolve_model(self.model)
        channels = list(self.card.channel_names)
        nodes = self.volume_nodes
        if not nodes or all(node is None for node in nodes):
            raise MedSegAIInputError(f"No input volume is selected; select a volume for {channels[0]}.")
        if len(nodes) < len(channels) or any(node is None for node in nodes[: len(channels)]):
            missing = [name for index, name in enumerate(channels) if index >= len(nodes) or nodes[index] is None]
            raise MedSegAIInputError(
                f"Model {self.card.name} needs {len(channels)} input volumes ({', '.join(channels)}); "
                f"select a volume for {', '.join(missing)}."
            )
        if len(nodes) > len(channels) and any(node is not None for node in nodes[len(channels):]):
            raise MedSegAIInputError(
                f"Model {self.card.name} takes {len(channels)} input volume(s) ({', '.join(channels)}) but "
                f"{sum(node is not None for node in nodes)} are selected; clear the extra selections."
            )
        self.volume_nodes = list(nodes[: len(channels)])
        # views, not copies: start() writes them to files at once; afterwards only their geometry is used
        self.input_volumes = [
            mrml.volume_from_node(node, name, copy=False) for node, name in zip(self.volume_nodes, channels)
        ]
        self.python_executable = _check_python_executable(self.options.python_executable)

    def start(self) -> "SegmentationRun":
        """Validate, write the inputs to a temporary folder and start the engine; returns self."""
        if self.process is not None:
            raise RuntimeError("this run was already started")
        self.prepare()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="medsegai-run-", dir=self.temp_root))
        try:
            files = []
            for index, volume in enumerate(self.input_volumes):
                path = self.temp_dir / f"channel_{index:04d}.nrrd"
                _write_input(path, volume)
                files.append(str(path))
            self.labels_path = self.temp_dir / "labels.nrrd"
            self.measurements_path = self.temp_dir / "measurements.json"
            command = [
                self.python_executable, "-m", "MedSegAILib.cli", "segment", *files,
                "-o", str(self.labels_path), "--model", str(self.card.folder), "--progress", "json",
                "--measurements", str(self.measurements_path), *self.options.cli_arguments(),
            ]
            self._launch(command, engine_environment(self.options.python_executable), cwd=str(self.temp_dir))
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self, scene: Any = None) -> SegmentationResult:
        """After a successful run: fill the output segmentation node and add the measurements table.

        Raises:
            EngineFailedError: the run failed or was cancelled (the scene is not changed).
        """
        if self.process is None:
            raise RuntimeError("the run was not started")
        if self.running:
            raise RuntimeError("the engine is still running; call finish() after it ended")
        self.poll()
        try:
            if self.cancelled:
                raise EngineFailedError("The segmentation was cancelled; nothing was added to the scene.")
            if self.returncode != 0:
                raise EngineFailedError(self.error_message("The segmentation engine"))
            if self.labels_path is None or not self.labels_path.is_file():
                raise EngineFailedError("The engine finished without writing a result; see the log and run it again.")
            labels = _read_labels(self.labels_path)
            reference_volume = self.input_volumes[0]
            if not labels.same_grid(reference_volume):
                raise EngineFailedError(
                    f"The engine result ({labels.geometry_description()}) is not on the input grid "
                    f"({reference_volume.geometry_description()}); report this problem."
                )
            labels = reference_volume.with_array(np.asarray(labels.array).astype(np.uint8, copy=False))
            rows = self._read_measurements()
            scene = scene or self.volume_nodes[0].GetScene()
            result = self._fill_scene(scene, labels, rows)
        finally:
            self.cleanup()
        result.seconds = time.monotonic() - self.start_time
        return result

    def _read_measurements(self) -> list[dict[str, Any]]:
        if self.measurements_path is None or not self.measurements_path.is_file():
            return []
        try:
            data = json.loads(self.measurements_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return []
        rows = data.get("segments", []) if isinstance(data, dict) else data
        return [dict(row) for row in rows if isinstance(row, Mapping)] if isinstance(rows, list) else []

    def _fill_scene(self, scene: Any, labels: Volume, rows: list[dict[str, Any]]) -> SegmentationResult:
        reference_node = self.volume_nodes[0]
        created: list[Any] = []
        try:
            segmentation_node = self.output_segmentation_node
            if segmentation_node is None:
                segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference_node.GetName()} MedSegAI")
                created.append(segmentation_node)
            segment_ids = mrml.update_segmentation_node(segmentation_node, labels, self.card, reference_node)
            segmentation_node.SetAttribute(SOURCE_MODEL_ATTRIBUTE, json.dumps(
                {"id": self.card.id, "version": self.card.version, "folder": str(self.card.folder)}))
            mrml.place_in_study(segmentation_node, reference_node)
            table_node = None
            if rows:
                table_node = mrml.measurements_table_node(scene, rows, f"{segmentation_node.GetName()} measurements")
                created.append(table_node)
                mrml.place_in_study(table_node, reference_node)
        except BaseException:
            for node in reversed(created):
                with contextlib.suppress(Exception):
                    _remove_node(scene, node)
            raise
        return SegmentationResult(segmentation_node, table_node, labels, rows, self.card, segment_ids)


def segments_to_be_replaced(segmentation_node: Any, model: Any) -> list[str]:
    """Names of segments in ``segmentation_node`` that a run of ``model`` would replace.

    The panel asks before replacing them (a user's corrections are never overwritten silently).
    """
    if segmentation_node is None:
        return []
    card = resolve_model(model)
    segmentation = segmentation_node.GetSegmentation()
    return [label.name for label in card.labels if segmentation.GetSegmentIdBySegmentName(label.name)]


# The name the design notes use for a segmentation run.
EngineRun = SegmentationRun


def _remove_node(scene: Any, node: Any) -> None:
    display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
    scene.RemoveNode(node)
    if display is not None and display.GetScene() is scene:
        scene.RemoveNode(display)


def run_segmentation_blocking(volume_nodes: Sequence[Any], model: Any, output_segmentation_node: Any = None,
                              options: EngineOptions | None = None, progress: Callable[[ProgressEvent], None] | None = None,
                              timeout: float | None = None, temp_root: str | os.PathLike[str] | None = None) -> SegmentationResult:
    """Segment and wait (for tests, scripts and the in-Slicer self-test).

    Raises:
        MedSegAIInputError: bad input, invalid model or engine failure (scene unchanged).
        TimeoutError: the engine ran longer than ``timeout`` seconds (stopped, scene unchanged).
    """
    run = SegmentationRun(volume_nodes, model, output_segmentation_node, options, temp_root).start()
    try:
        run.wait(timeout=timeout, progress=progress)
    except BaseException:
        run.cancel()
        raise
    return run.finish()


# --------------------------------------------------------------------------------------------
# Export for training
# --------------------------------------------------------------------------------------------


def _resample_onto(volume: Volume, reference: Volume) -> Volume:
    """Linear resampling of ``volume`` onto ``reference``'s grid (for extra channels)."""
    import SimpleITK as sitk

    resampled = sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    return reference.with_array(sitk.GetArrayFromImage(resampled))


def _patient_key(scene: Any, volume_node: Any) -> str | None:
    """The DICOM patient id of the volume's patient item (hashed later by the dataset), or None."""
    import slicer

    if scene is None:
        return None
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return None
    item = hierarchy.GetItemByDataNode(volume_node)
    scene_item = hierarchy.GetSceneItemID()
    while item and item != scene_item:
        for attribute in ("DICOM.PatientID", "DICOM.PatientName"):
            value = hierarchy.GetItemAttribute(item, attribute)
            if value:
                return value
        item = hierarchy.GetItemParent(item)
    return None


def _source_model(segmentation_node: Any, card: Any) -> dict[str, Any] | None:
    text = segmentation_node.GetAttribute(SOURCE_MODEL_ATTRIBUTE) if segmentation_node is not None else None
    if text:
        with contextlib.suppress(json.JSONDecodeError, TypeError):
            data = json.loads(text)
            if isinstance(data, dict) and data.get("id"):
                return {"id": data["id"], "version": data.get("version")}
    if card is not None and getattr(card, "id", None):
        return {"id": card.id, "version": card.version}
    return None


def export_for_training(scene: Any, segmentation_node: Any, volume_nodes: Sequence[Any], dataset_dir: str | os.PathLike[str],
                        model_card_info: Any, original_labels: Volume | None = None) -> str:
    """Add the current (corrected) case to a training dataset folder.

    The labels are the segments named like the model's labels, exported on the first input's grid.
    Extra channels on other grids are resampled (linear) onto it. Only voxels and geometry are
    written (no names, ids or dates); the patient is recorded as a salted hash by the dataset.

    Args:
        scene: the scene (used to find the patient of the input in the subject hierarchy).
        segmentation_node: the (edited) segmentation.
        volume_nodes: one volume node per model channel.
        dataset_dir: the dataset folder (created when missing).
        model_card_info: the model card (or anything with ``labels``/``channels``) defining label
            names/values and channel names.
        original_labels: the AI labelmap from :class:`SegmentationResult`, to count changed voxels.

    Returns:
        The new case id.

    Raises:
        MedSegAIInputError: no segmentation/volume/folder, wrong channel count, nothing segmented.
    """
    from . import dataset

    if not dataset_dir or not str(dataset_dir).strip():
        raise MedSegAIInputError("No dataset folder is selected; choose a folder for the training cases.")
    card = resolve_model(model_card_info) if isinstance(model_card_info, (str, os.PathLike)) else model_card_info
    if card is None:
        raise MedSegAIInputError("No model is selected; select the model whose labels the dataset uses.")
    channels = list(getattr(card, "channel_names", None) or [c.name for c in card.channels])
    nodes = [node for node in (volume_nodes or []) if node is not None]
    if len(nodes) != len(channels):
        raise MedSegAIInputError(
            f"The dataset needs {len(channels)} image(s) ({', '.join(channels)}) but {len(nodes)} volume(s) are selected; "
            "select one volume per channel."
        )
    if segmentation_node is None:
        raise MedSegAIInputError("No segmentation is selected; run Segment first or select the segmentation to export.")
    images = [mrml.volume_from_node(node, name) for node, name in zip(nodes, channels)]
    reference = images[0]
    images = [reference] + [image if image.same_grid(reference) else _resample_onto(image, reference) for image in images[1:]]
    label = mrml.labels_from_segmentation_node(segmentation_node, nodes[0], card)
    if not np.any(label.array):
        raise MedSegAIInputError(
            "The segmentation has no voxels in segments named like the model's labels; "
            "segment the case (or restore the segment names) before exporting."
        )
    changed = None
    if original_labels is not None:
        if not original_labels.same_grid(label):
            raise MedSegAIInputError("The AI result is not on the input grid any more; run Segment again before exporting.")
        changed = int(np.count_nonzero(np.asarray(original_labels.array).astype(np.int64) != label.array.astype(np.int64)))
    labels_map = {"background": 0, **{entry.name: entry.value for entry in mrml.label_entries(card)}}
    return dataset.add_case(
        dataset_dir, images, label, channels, labels_map,
        patient_key=_patient_key(scene, nodes[0]), source_model=_source_model(segmentation_node, card),
        changed_voxels=changed,
    )


def dataset_case_count(dataset_dir: str | os.PathLike[str] | None) -> int:
    """Number of cases in a dataset folder (0 when the folder has no ``dataset.json`` yet)."""
    if not dataset_dir or not (Path(dataset_dir).expanduser() / "dataset.json").is_file():
        return 0
    from .dataset import load_dataset

    return len(load_dataset(dataset_dir).cases)


def dataset_case_changed_voxels(dataset_dir: str | os.PathLike[str], case_id: str) -> int | None:
    """The recorded number of user-changed voxels of one case (None when not recorded)."""
    from .dataset import load_dataset

    return load_dataset(dataset_dir).case(case_id).changed_voxels


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


class FineTuneRun(EngineProcess):
    """Training from a model on a dataset folder, in a separate process (``medsegai train``).

    Progress events have stage ``"train"``; their message carries the epoch and validation Dice.
    On success :meth:`finish` validates the new model folder and moves it into the model store as
    ``<id>-<version>`` (existing versions are never touched).
    """

    stage_weights = TRAINING_STAGE_WEIGHTS

    def __init__(self, dataset_dir: str | os.PathLike[str], model: Any, store_dir: str | os.PathLike[str] | None = None,
                 python_executable: str | None = None, extra_arguments: Sequence[str] = ()) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir).expanduser() if dataset_dir else None
        self.model = model
        self.store_dir = Path(store_dir).expanduser() if store_dir else None
        self.python_executable = python_executable
        self.extra_arguments = [str(a) for a in extra_arguments]
        self.card: Any = None
        self.output_dir: Path | None = None

    def start(self) -> "FineTuneRun":
        """Validate and start ``python -m MedSegAILib.cli train DATASET -o NEW --init MODEL --progress json``."""
        if self.process is not None:
            raise RuntimeError("this run was already started")
        if self.dataset_dir is None or not (self.dataset_dir / "dataset.json").is_file():
            raise MedSegAIInputError(
                f"{self.dataset_dir or 'No folder'} is not a MedSegAI dataset (no dataset.json); "
                "export corrected cases to it first."
            )
        count = dataset_case_count(self.dataset_dir)
        if count < 1:
            raise MedSegAIInputError(f"The dataset {self.dataset_dir} has no cases; export corrected cases first.")
        self.card = resolve_model(self.model)
        if self.store_dir is None:
            from .modelcard import user_models_dir

            self.store_dir = user_models_dir()
        python = _check_python_executable(self.python_executable)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f".{self.card.id}-training-", dir=self.store_dir))
        self.output_dir = self.temp_dir / "model"
        command = [python, "-m", "MedSegAILib.cli", "train", str(self.dataset_dir), "-o", str(self.output_dir),
                   "--init", str(self.card.folder), "--progress", "json", *self.extra_arguments]
        try:
            self._launch(command, engine_environment(self.python_executable), cwd=str(self.temp_dir))
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self) -> Any:
        """Register the trained model; returns its ModelCard.

        Raises:
            EngineFailedError: training failed or was cancelled.
            ModelFolderError: the trained model fails validation or its version is installed already.
        """
        if self.process is None:
            raise RuntimeError("the training was not started")
        if self.running:
            raise RuntimeError("training is still running; call finish() after it ended")
        self.poll()
        try:
            if self.cancelled:
                raise EngineFailedError("Fine-tuning was cancelled; no model was added.")
            if self.returncode != 0:
                raise EngineFailedError(self.error_message("Fine-tuning"))
            if self.store_dir is None or self.output_dir is None or not self.output_dir.is_dir():
                raise EngineFailedError("Fine-tuning finished without writing a model folder; see the log.")
            return _install_model_folder(self.output_dir, self.store_dir)
        finally:
            self.cleanup()


def start_fine_tune(dataset_dir: str | os.PathLike[str], model: Any, store_dir: str | os.PathLike[str] | None = None,
                    python_executable: str | None = None, extra_arguments: Sequence[str] = ()) -> FineTuneRun:
    """Start fine-tuning ``model`` on ``dataset_dir`` in the background; poll/cancel/finish the result."""
    return FineTuneRun(dataset_dir, model, store_dir, python_executable, extra_arguments).start()


# --------------------------------------------------------------------------------------------
# Model import
# --------------------------------------------------------------------------------------------

_MAX_ZIP_BYTES = 8 * 1024**3
_MAX_ZIP_FILES = 10000


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract regular files only; refuse absolute paths, ``..``, links and zip bombs."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > _MAX_ZIP_FILES:
                raise ModelFolderError(f"{archive.name} holds {len(members)} entries; a model archive holds a few files.")
            total = 0
            for info in members:
                name = info.filename.replace("\\", "/")
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise ModelFolderError(f"{archive.name} contains an unsafe path ({info.filename}); use a plain zip of the model folder.")
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
                    raise ModelFolderError(f"{archive.name} contains a link or special file ({info.filename}); zip plain files only.")
                total += info.file_size
                if total > _MAX_ZIP_BYTES:
                    raise ModelFolderError(f"{archive.name} expands to more than {_MAX_ZIP_BYTES // 1024**3} GB; it is not a model archive.")
            for info in members:
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
                if info.is_dir() or not parts:
                    continue
                destination = target.joinpath(*parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(destination, "xb") as sink:
                    shutil.copyfileobj(source, sink)
    except zipfile.BadZipFile as e:
        raise ModelFolderError(f"{archive.name} is not a readable zip archive ({e}); select a model folder or its .zip.") from e


def _find_model_root(folder: Path) -> Path:
    if (folder / "model.json").is_file():
        return folder
    candidates = [p for p in folder.iterdir() if p.is_dir() and (p / "model.json").is_file()]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelFolderError("The archive does not contain one model folder with a model.json; zip the model folder itself.")


def _copy_regular_files(source: Path, target: Path) -> None:
    """Copy a model folder tree (regular files only; links are refused)."""
    target.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink():
            raise ModelFolderError(f"The model folder contains a link ({relative}); copy the real files into it.")
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)


def _installed_versions(store_dir: Path, model_id: str) -> dict[str, Path]:
    versions: dict[str, Path] = {}
    if not store_dir.is_dir():
        return versions
    for folder in store_dir.iterdir():
        card_path = folder / "model.json"
        if folder.name.startswith(".") or not card_path.is_file():
            continue
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            data = json.loads(card_path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("id") == model_id:
                versions[str(data.get("version"))] = folder
    return versions


def _install_model_folder(folder: Path, store_dir: Path) -> Any:
    """Validate ``folder`` (a staging copy inside ``store_dir``) and rename it to ``<id>-<version>``."""
    from .modelcard import ModelCard

    card = ModelCard.from_folder(folder)
    existing = _installed_versions(store_dir, card.id)
    destination = store_dir / f"{card.id}-{card.version}"
    if card.version in existing or destination.exists():
        where = existing.get(card.version, destination)
        raise ModelFolderError(
            f"Model {card.id} version {card.version} is already installed in {where}; "
            "give the new model another version (the installed one is kept unchanged)."
        )
    os.replace(folder, destination)
    return ModelCard.from_folder(destination)


def import_model(folder_or_zip: str | os.PathLike[str], store_dir: str | os.PathLike[str] | None = None) -> Any:
    """Validate a model folder (or a .zip of one) and copy it into the model store.

    Nothing in the folder is executed or imported; only ``model.json`` is parsed (the weights are
    loaded later with Keras ``safe_mode``). The copy is staged in a hidden folder of the store and
    renamed into place as ``<id>-<version>``; an installed version is never overwritten.

    Args:
        folder_or_zip: a model folder, or a ``.zip`` holding one (at its root or in one sub-folder).
        store_dir: the model store (default: the user store, ``~/.medsegai/models``).

    Returns:
        The installed model's ModelCard.

    Raises:
        ModelFolderError: missing path, unsafe/invalid archive, invalid model, or version installed.
    """
    from .modelcard import user_models_dir

    if not folder_or_zip or not str(folder_or_zip).strip():
        raise ModelFolderError("No model folder or .zip is selected; choose one to import.")
    source = Path(folder_or_zip).expanduser()
    if not source.exists():
        raise ModelFolderError(f"{source} does not exist; select a model folder or a .zip of one.")
    store = Path(store_dir).expanduser() if store_dir else user_models_dir()
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=store))
    try:
        if source.is_dir():
            from .modelcard import ModelCard

            ModelCard.from_folder(source)  # validate before copying anything large
            _copy_regular_files(source, staging / "model")
            model_root = staging / "model"
        elif zipfile.is_zipfile(source):
            _safe_extract(source, staging / "unpacked")
            model_root = _find_model_root(staging / "unpacked")
        else:
            raise ModelFolderError(f"{source.name} is neither a folder nor a .zip archive; select a model folder or its .zip.")
        return _install_model_folder(model_root, store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------------


def _requirement_name(line: str) -> str:
    import re

    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return match.group(1).lower().replace("_", "-") if match else ""


def read_requirements(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{package name (lower case): requirement line}`` of ``Resources/requirements.txt``."""
    path = Path(path) if path else module_folder() / "Resources" / "requirements.txt"
    requirements: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        name = _requirement_name(line)
        if name:
            requirements[name] = line
    _check_no_protected(requirements)
    return requirements


# import name for the packages the engine needs in the process that runs it
_IMPORT_NAMES = {"onnxruntime": "onnxruntime", "tensorflow": "tensorflow", "scipy": "scipy",
                 "jsonschema": "jsonschema", "pydicom": "pydicom"}


def missing_packages(backend: str = "auto", python_executable: str | None = None) -> list[str]:
    """Packages the engine needs for ``backend`` that the engine's Python cannot import.

    ``auto`` needs ONNX Runtime or TensorFlow (ONNX Runtime is proposed when neither is there).
    """
    if backend not in ("auto", "tensorflow", "onnx"):
        raise ValueError(f"backend must be auto, tensorflow or onnx, got {backend!r}")
    wanted = ["scipy", "jsonschema", "pydicom"]
    candidates = {"onnx": ["onnxruntime"], "tensorflow": ["tensorflow"], "auto": ["onnxruntime", "tensorflow"]}[backend]
    found = _importable(wanted + candidates, python_executable)
    missing = [name for name in wanted if not found[name]]
    if not any(found[name] for name in candidates):
        missing.append(candidates[0])
    return missing


def _importable(names: list[str], python_executable: str | None) -> dict[str, bool]:
    import importlib.util

    modules = [_IMPORT_NAMES[name] for name in names]
    python = python_executable or default_python_executable()
    # No engine Python chosen: the engine runs with Slicer's own Python (PythonSlicer), whose
    # packages are the ones this interpreter sees.
    same = not python_executable or _same_python(python, sys.executable)
    if same:
        return {name: importlib.util.find_spec(module) is not None for name, module in zip(names, modules)}
    code = "import importlib.util, json, sys; print(json.dumps([importlib.util.find_spec(m) is not None for m in sys.argv[1:]]))"
    try:
        output = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=60,
                                env=engine_environment(python_executable), check=True).stdout
        flags = json.loads(output.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        raise MedSegAIInputError(f"The engine Python {python} could not be checked ({e}); choose a working Python under Advanced.") from e
    return dict(zip(names, (bool(flag) for flag in flags)))


def requirements_to_install(missing: Sequence[str], requirements: Mapping[str, str] | None = None) -> list[str]:
    """Pinned requirement lines for the missing packages (never numpy, SimpleITK or VTK).

    Raises:
        MedSegAIInputError: a missing package is not listed in ``requirements.txt``.
    """
    requirements = dict(requirements) if requirements is not None else read_requirements()
    lines = []
    for name in missing:
        key = name.lower().replace("_", "-")
        if key in PROTECTED_PACKAGES:
            raise MedSegAIInputError(f"{name} is part of Slicer and is never installed by MedSegAI; reinstall Slicer if it is broken.")
        if key not in requirements:
            raise MedSegAIInputError(f"{name} is needed but not listed in requirements.txt; install it manually with pip.")
        lines.append(requirements[key])
    return lines


def _check_no_protected(requirements: Mapping[str, str]) -> None:
    bad = sorted(PROTECTED_PACKAGES & set(requirements))
    if bad:
        raise MedSegAIError(f"requirements.txt lists packages Slicer ships ({', '.join(bad)}); remove them.")
