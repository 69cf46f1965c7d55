"""Start a child process so that its whole tree can be stopped, on Windows, Linux and macOS.

Slicer's ``PythonSlicer`` is a launcher that starts the real interpreter (``python-real``) as its own
child. Stopping only the launcher leaves the engine running (for hours in a fine-tune), holding the
pipes and the temporary files. So the engine is started as the leader of a new process group
(POSIX) or inside a Windows job object, and stopping signals the whole group or job:

- POSIX: ``start_new_session``; ``terminate`` sends SIGTERM to the group, ``kill`` SIGKILL.
  :meth:`ProcessTree.alive` is true while any process of the group lives (zombies excluded on Linux).
- Windows: the child is assigned to a job object right after it starts (its own children inherit
  the job); ``terminate``/``kill`` end the job (``TerminateJobObject``), or, where the job could
  not be made, ``taskkill /T /F`` ends the process tree. No console window is ever shown.

Nothing here blocks for long: :meth:`terminate`, :meth:`kill` and :meth:`alive` return at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ProcessTree", "hidden_window_flags", "group_members"]

_IS_WINDOWS = os.name == "nt"


def hidden_window_flags() -> int:
    """``creationflags`` that keep a child from opening a console window (0 outside Windows)."""
    return getattr(subprocess, "CREATE_NO_WINDOW", 0) if _IS_WINDOWS else 0


def group_members(group_id: int) -> list[int]:
    """Live (non-zombie) process ids of a POSIX process group, from ``/proc`` (Linux only).

    Returns an empty list where ``/proc`` is missing; use :meth:`ProcessTree.alive` for a portable answer.
    """
    members = []
    proc = Path("/proc")
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")"
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) == group_id and fields[0] != "Z":
                members.append(int(entry.name))
    return members


class _WindowsJob:
    """A job object that ends every process in it when terminated (Windows only)."""

    def __init__(self) -> None:
        import ctypes
        from ctypes import wintypes

        self._kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        self._kernel32.CreateJobObjectW.restype = wintypes.HANDLE
        self.handle = self._kernel32.CreateJobObjectW(None, None)
        if not self.handle:
            raise OSError(ctypes.get_last_error(), "CreateJobObjectW failed")

    def assign(self, process: subprocess.Popen) -> bool:
        import ctypes

        process_handle = ctypes.c_void_p(int(process._handle))  # noqa: SLF001 - Popen's own process handle
        return bool(self._kernel32.AssignProcessToJobObject(ctypes.c_void_p(self.handle), process_handle))

    def terminate(self) -> bool:
        import ctypes

        return bool(self._kernel32.TerminateJobObject(ctypes.c_void_p(self.handle), 1))

    def has_processes(self) -> bool:
        """True while the job holds a running process (JobObjectBasicAccountingInformation)."""
        import ctypes

        class _Accounting(ctypes.Structure):
            _fields_ = [("TotalUserTime", ctypes.c_int64), ("TotalKernelTime", ctypes.c_int64),
                        ("ThisPeriodTotalUserTime", ctypes.c_int64), ("ThisPeriodTotalKernelTime", ctypes.c_int64),
                        ("TotalPageFaultCount", ctypes.c_uint32), ("TotalProcesses", ctypes.c_uint32),
                        ("ActiveProcesses", ctypes.c_uint32), ("TotalTerminatedProcesses", ctypes.c_uint32)]

        info = _Accounting()
        ok = self._kernel32.QueryInformationJobObject(ctypes.c_void_p(self.handle), 1, ctypes.byref(info),
                                                      ctypes.sizeof(info), None)
        return bool(ok) and info.ActiveProcesses > 0

    def close(self) -> None:
        import ctypes

        if self.handle:
            self._kernel32.CloseHandle(ctypes.c_void_p(self.handle))
            self.handle = None


class ProcessTree:
    """A child process and everything it starts, stoppable as one.

    Args:
        command: the program and its arguments.
        env: the child's environment.
        cwd: the child's working folder.
        **popen_arguments: passed on to :class:`subprocess.Popen` (pipes, encoding, ...).

    Raises:
        OSError: the program could not be started.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                 **popen_arguments: Any) -> None:
        self._job: _WindowsJob | None = None
        if _IS_WINDOWS:
            popen_arguments["creationflags"] = (popen_arguments.get("creationflags", 0)
                                                | subprocess.CREATE_NEW_PROCESS_GROUP | hidden_window_flags())
        else:
            popen_arguments["start_new_session"] = True
        self.process = subprocess.Popen(list(command), env=None if env is None else dict(env), cwd=cwd, **popen_arguments)
        if _IS_WINDOWS:
            with contextlib.suppress(OSError):
                job = _WindowsJob()
                if job.assign(self.process):
                    self._job = job
                else:
                    job.close()

    @property
    def pid(self) -> int:
        """The first process's id (on POSIX also the id of the whole group)."""
        return self.process.pid

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            os.killpg(self.process.pid, signum)

    def _end_windows_tree(self) -> None:
        if self._job is not None and self._job.terminate():
            return
        if self.process.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.process.pid)], capture_output=True,
                               timeout=5, creationflags=hidden_window_flags(), check=False)
        with contextlib.suppress(OSError):
            self.process.kill()

    def terminate(self) -> None:
        """Ask every process of the tree to stop (SIGTERM to the group; on Windows the tree is ended)."""
        if _IS_WINDOWS:
            self._end_windows_tree()
        else:
            self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """End every process of the tree at once (SIGKILL to the group; on Windows the job or tree)."""
        if _IS_WINDOWS:
            self._end_windows_tree()
        else:
            self._signal_group(signal.SIGKILL)

    def alive(self) -> bool:
        """True while any process of the tree still runs (never blocks)."""
        first_running = self.process.poll() is None  # also reaps the first process once it ended
        if _IS_WINDOWS:
            if self._job is not None:
                return self._job.has_processes()
            return first_running
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        if sys.platform.startswith("linux"):
            return bool(group_members(self.process.pid))
        return True

    def close(self) -> None:
        """Release the Windows job handle (no-op elsewhere)."""
        if self._job is not None:
            self._job.close()
            self._job = None
