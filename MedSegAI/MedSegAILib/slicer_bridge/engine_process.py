"""The engine process as the Slicer panel runs it: started, followed without blocking, stopped as a tree.

The engine always runs in a separate process (Slicer's own ``PythonSlicer`` by default, or a Python
the user chose), so Slicer stays responsive and a crash in TensorFlow/ONNX Runtime cannot take
Slicer down. It speaks :mod:`MedSegAILib.protocol`: one JSON progress line a step on stdout, an
``error: ...`` line on stderr and the protocol's exit codes (2 for bad input, 130 when cancelled).

:class:`EngineProcess` reads both pipes on background threads. Neither :meth:`EngineProcess.poll`
nor :meth:`EngineProcess.cancel` waits: the widget calls them from a ``QTimer`` and a button. Cancel
signals the whole process tree (``PythonSlicer`` is a launcher whose child is the real interpreter,
see :mod:`MedSegAILib.slicer_bridge.process_tree`); a background thread kills what is left after
:data:`CANCEL_GRACE_SECONDS` and removes the run's temporary folder once every process is gone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import MedSegAIInputError
from .process_tree import ProcessTree
from ..protocol import SEGMENTATION_STAGE_WEIGHTS, parse_error_line, parse_progress_line

__all__ = [
    "CANCEL_GRACE_SECONDS",
    "EngineFailedError",
    "EngineProcess",
    "ProgressEvent",
    "check_python_executable",
    "default_python_executable",
    "engine_environment",
    "import_training_module",
    "module_folder",
    "running_in_slicer",
    "same_python",
]

# After Cancel, the engine has this long to stop by itself before its whole tree is killed.
CANCEL_GRACE_SECONDS = 1.5
_LOG_LINES_KEPT = 2000


class EngineFailedError(MedSegAIInputError):
    """The engine process failed; the message is the engine's ``error:`` line or a short summary."""


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


# --------------------------------------------------------------------------------------------
# The engine's Python and environment
# --------------------------------------------------------------------------------------------


def module_folder() -> Path:
    """The folder holding ``MedSegAILib`` (the Slicer module folder); goes on the engine's PYTHONPATH."""
    return Path(__file__).resolve().parents[2]


def _python_path_entries() -> list[str]:
    entries = [str(module_folder())]
    training = module_folder().parent / "training"  # source tree; installed extensions ship it beside MedSegAILib
    if (training / "medsegai_training").is_dir():
        entries.append(str(training))
    return entries


def import_training_module(name: str) -> Any:
    """Import a module of the training package in this process (the panel's TF-free fine-tuning plan).

    An installed extension ships ``medsegai_training`` beside ``MedSegAILib``; a clone added to
    Slicer's module paths has it in ``training/``, which is then put on ``sys.path``.
    """
    if importlib.util.find_spec("medsegai_training") is None:
        for entry in _python_path_entries():
            if entry not in sys.path:
                sys.path.append(entry)
    return importlib.import_module(name)


def same_python(first: str, second: str) -> bool:
    """Same executable path (symlinks are not resolved: a venv's python links to its base)."""
    return os.path.normcase(os.path.abspath(first)) == os.path.normcase(os.path.abspath(second))


def running_in_slicer() -> bool:
    """True inside the Slicer application (where ``slicer`` is imported and has ``app``)."""
    module = sys.modules.get("slicer")
    return module is not None and hasattr(module, "app")


def default_python_executable() -> str:
    """Slicer's own Python (``PythonSlicer``) inside Slicer, else this interpreter."""
    if running_in_slicer():
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def engine_environment(python_executable: str | None = None) -> dict[str, str]:
    """Environment for the engine process: MedSegAILib importable, output unbuffered and UTF-8.

    An external Python gets Slicer's *startup* environment (without Slicer's PYTHONHOME and
    library paths) so it runs as it would from a terminal. Output is forced to UTF-8 (messages
    hold ≥, mm³ ...), whatever the system's code page, and TensorFlow's C++ log is kept quiet.
    """
    external = bool(python_executable) and not same_python(str(python_executable), default_python_executable())
    env = dict(os.environ)
    if external and running_in_slicer():
        import slicer

        env = dict(slicer.util.startupEnvironment())
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(_python_path_entries() + [p for p in existing if p not in _python_path_entries()])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def check_python_executable(python_executable: str | None) -> str:
    """The engine's Python: ``python_executable`` when it is an executable file, else the default.

    Raises:
        MedSegAIInputError: a chosen Python that does not exist or cannot be run.
    """
    if not python_executable:
        return default_python_executable()
    path = Path(python_executable).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise MedSegAIInputError(
            f"The engine Python {python_executable} does not exist or is not executable; "
            "choose a Python executable under Advanced or clear the field to use Slicer's Python."
        )
    return str(path)


# --------------------------------------------------------------------------------------------
# A process with JSON-line progress
# --------------------------------------------------------------------------------------------


class EngineProcess:
    """A child process tree printing JSON progress lines, followed without blocking.

    Call :meth:`poll` repeatedly (e.g. from a ``QTimer``); it returns the new progress events.
    :meth:`read_log` returns the new log lines (non-JSON stdout and all of stderr).
    ``stage_weights`` (stage -> share of the whole run, in run order) turns stage progress into one
    overall fraction, which never decreases. The run has ended when the first process has exited
    and both pipes are closed (a launcher's child that outlives it still holds them).
    """

    stage_weights: dict[str, float] = SEGMENTATION_STAGE_WEIGHTS

    def __init__(self) -> None:
        self.command: list[str] = []
        self.tree: ProcessTree | None = None
        self.temp_dir: Path | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.start_time = 0.0
        self.last_event: ProgressEvent | None = None
        self.log_lines: deque[str] = deque(maxlen=_LOG_LINES_KEPT)
        self._new_log: list[str] = []
        self._stderr_tail: deque[str] = deque(maxlen=200)
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._pending_events: list[ProgressEvent] = []
        self._open_streams = 0
        self._fraction_so_far = 0.0
        self._stopped = threading.Event()
        self._stopper: threading.Thread | None = None

    @property
    def process(self) -> Any:
        """The first process (``subprocess.Popen``), or None before :meth:`_launch`."""
        return self.tree.process if self.tree is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def _launch(self, command: list[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.command = list(command)
        self.start_time = time.monotonic()
        try:
            self.tree = ProcessTree(
                self.command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1,
            )
        except OSError as e:
            raise EngineFailedError(
                f"The engine could not be started with {self.command[0]} ({e.strerror or e}); "
                "check the engine Python under Advanced."
            ) from e
        self._open_streams = 2
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            threading.Thread(target=self._reader, args=(name, stream), daemon=True).start()

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
        """True until the first process has exited and both its pipes are closed (never blocks).

        After :meth:`cancel`, True until every process of the tree is gone.
        """
        if self.tree is None:
            return False
        if self.cancelled:
            return not self._stopped.is_set()
        self._drain()
        return self.tree.process.poll() is None or self._open_streams > 0

    @property
    def state(self) -> str:
        """``"not started"``, ``"running"``, ``"cancelled"``, ``"succeeded"`` or ``"failed"``."""
        if self.tree is None:
            return "cancelled" if self.cancelled else "not started"
        if self.cancelled:
            return "cancelled"
        if self.running:
            return "running"
        return "succeeded" if self.tree.process.returncode == 0 else "failed"

    def _drain(self) -> None:
        """Move what the reader threads queued into the pending events and the log."""
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._open_streams -= 1
                continue
            event = self._parse_progress(line) if name == "stdout" else None
            if event is not None:
                self._pending_events.append(event)
                self.last_event = event
                continue
            if name == "stderr":
                self._stderr_tail.append(line)
            if line.strip():
                self.log_lines.append(line)
                self._new_log.append(line)

    def poll(self) -> list[ProgressEvent]:
        """Read what the process printed so far (never blocks); returns the new progress events."""
        if self.tree is None:
            return []
        self._drain()
        events, self._pending_events = self._pending_events, []
        self.returncode = self.tree.process.poll()
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
        if self.tree is None:
            raise RuntimeError("the process was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended = not self.running
            for event in self.poll():
                if progress is not None:
                    progress(event)
            if ended:
                return int(self.tree.process.returncode)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the engine did not finish within {timeout} s and was stopped")
            time.sleep(0.05)

    def cancel(self, grace_seconds: float = CANCEL_GRACE_SECONDS) -> None:
        """Stop the whole process tree and remove the temporary files; returns at once.

        Every process of the tree is asked to stop (SIGTERM; the engine exits with 130 at its next
        batch); whatever still runs after ``grace_seconds`` is killed. A background thread does the
        waiting and removes the temporary folder once no process is left; :meth:`wait_stopped`
        waits for it (tests, application exit).
        """
        if self.cancelled:
            return
        self.cancelled = True
        if self.tree is None:
            self.cleanup()
            self._stopped.set()
            return
        self.tree.terminate()
        self._stopper = threading.Thread(target=self._stop_tree, args=(max(0.0, grace_seconds),), daemon=True)
        self._stopper.start()

    def _stop_tree(self, grace_seconds: float) -> None:
        tree = self.tree
        try:
            if tree is None:
                return
            deadline = time.monotonic() + grace_seconds
            while tree.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if tree.alive():
                tree.kill()
                deadline = time.monotonic() + 5.0
                while tree.alive() and time.monotonic() < deadline:
                    time.sleep(0.02)
            with contextlib.suppress(Exception):
                tree.process.wait(timeout=1.0)
            self.returncode = tree.process.poll()
            tree.close()
            self.cleanup()
        finally:
            self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """After :meth:`cancel`: wait until the tree is gone and the temporary files removed."""
        return self._stopped.wait(timeout)

    def check_succeeded(self, what: str, cancelled_message: str, failure_message: str | None = None) -> None:
        """For ``finish()``: return only when the run was started, has ended and exited 0.

        Args:
            what: the run in messages, e.g. ``"The segmentation engine"``.
            cancelled_message: the message when the user cancelled.
            failure_message: the message of a failed run; None = the engine's own ``error:`` line.

        Raises:
            RuntimeError: not started, or still running (the caller's mistake, not the user's).
            EngineFailedError: cancelled or failed; the temporary folder is removed first.
        """
        if self.tree is None:
            raise RuntimeError(f"{what} was not started")
        if self.running:
            raise RuntimeError(f"{what} is still running; call finish() after it ended")
        self.poll()
        if self.cancelled or self.returncode != 0:
            message = cancelled_message if self.cancelled else failure_message or self.error_message(what)
            self.cleanup()
            raise EngineFailedError(message)

    def cleanup(self) -> None:
        """Remove the temporary folder (inputs, outputs) of this run."""
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    # -- progress ----------------------------------------------------------------------------

    def _parse_progress(self, line: str) -> ProgressEvent | None:

        record = parse_progress_line(line)
        if record is None:
            return None
        stage, done, total, message = record
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
            text = parse_error_line(line)
            if text is not None:
                return text[:1].upper() + text[1:] if text else f"{what} failed."
        code = self.returncode
        last = next((line.strip() for line in reversed(self._stderr_tail) if line.strip()), "")
        if code is not None and code < 0:
            reason = f"was stopped by signal {-code}"
        else:
            reason = f"failed with exit code {code}"
        detail = f" (last message: {last[:200]})" if last else ""
        return f"{what} {reason}{detail}; see the log for details."

