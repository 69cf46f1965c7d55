"""Cancel ends the whole engine process tree, and the Qt thread never waits.

Slicer's ``PythonSlicer`` is a launcher that starts the real interpreter as its child; stopping only
the launcher leaves the engine running. ``launcher_stub.py`` plays that launcher: it starts its
arguments as a child and dies on SIGTERM without passing it on. These tests run the real engine
(and a stubborn child that ignores SIGTERM) through it and check that after Cancel no process of
the tree is left, no temporary files remain and the scene has no new nodes.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from MedSegAILib.slicer_bridge import engine_process
from MedSegAILib.slicer_bridge.process_tree import ProcessTree, group_members

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")

STUB = Path(__file__).with_name("launcher_stub.py")
POLL_BUDGET_SECONDS = 0.1


def _launcher(tmp_path: Path) -> Path:
    """An executable 'Python' that is really the launcher stub in front of this interpreter."""
    script = tmp_path / "PythonSlicer"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {STUB} {sys.executable} \"$@\"\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


class _Run(engine_process.EngineProcess):
    def start(self, command: list[str], temp_dir: Path) -> "_Run":
        self.temp_dir = temp_dir
        self._launch(command, engine_process.engine_environment(), cwd=str(temp_dir))
        return self


def _wait_for_child(pid: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = group_members(pid)
        if len(members) >= 2:
            return members
        time.sleep(0.02)
    raise AssertionError(f"the launcher stub did not start its child (group {group_members(pid)})")


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _cancel_and_check(run: engine_process.EngineProcess, temp_dir: Path, members: list[int] | None = None) -> None:
    group = run.process.pid
    members = members or _wait_for_child(group)
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started <= POLL_BUDGET_SECONDS, "cancel() must not wait"
    started = time.monotonic()
    run.poll()
    assert time.monotonic() - started <= POLL_BUDGET_SECONDS, "poll() must not wait"
    assert run.wait_stopped(2.0), f"processes left after 2 s: {group_members(group)}"
    assert group_members(group) == []
    assert all(_gone(pid) for pid in members), [pid for pid in members if not _gone(pid)]
    assert not temp_dir.exists()
    assert run.state == "cancelled" and not run.running


def test_cancel_kills_a_child_that_ignores_sigterm_behind_a_launcher(tmp_path: Path) -> None:
    """The launcher dies at once on SIGTERM; its child ignores SIGTERM: both are gone within 2 s."""
    temp_dir = tmp_path / "run"
    temp_dir.mkdir()
    (temp_dir / "input.nrrd").write_bytes(b"x" * 1024)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
    run = _Run().start([str(_launcher(tmp_path)), "-c", stubborn], temp_dir)
    _cancel_and_check(run, temp_dir)


def test_poll_never_waits_for_an_orphaned_child_holding_the_pipes(tmp_path: Path) -> None:
    """The launcher has exited but its child still holds stdout: poll() returns at once, the run is still running."""
    temp_dir = tmp_path / "run"
    temp_dir.mkdir()
    run = _Run().start([str(_launcher(tmp_path)), "-c", "import time; print('x', flush=True); time.sleep(600)"], temp_dir)
    group = run.process.pid
    members = _wait_for_child(group)
    os.kill(group, 15)  # only the launcher: its child keeps the pipes open
    deadline = time.monotonic() + 10
    while run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(5):
        started = time.monotonic()
        run.poll()
        assert time.monotonic() - started <= POLL_BUDGET_SECONDS
    assert run.running, "the engine (the launcher's child) still runs"
    _cancel_and_check(run, temp_dir, members)


def test_cancel_mid_segmentation_behind_a_launcher(tmp_path: Path, shared_data: Path, analytic_model_dir: Path) -> None:
    """The real engine behind the launcher stub: Cancel mid-model leaves no process, file or node."""
    slicer = pytest.importorskip("slicer")
    sitk = pytest.importorskip("SimpleITK")
    from MedSegAILib.slicer_bridge import mrml, slicer_logic
    from MedSegAILib.core.image import Volume

    scene = slicer.vtkMRMLScene()
    big = Volume.from_sitk(sitk.ReadImage(str(shared_data / "ct-abdomen" / "example_ct.nii.gz")))
    node = mrml.add_volume_node(scene, big, "CT")
    before = scene.GetNumberOfNodes()
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", overlap=0.9, batch_size=1,
                                         python_executable=str(_launcher(tmp_path)))
    run = slicer_logic.SegmentationRun([node], str(analytic_model_dir), options=options, temp_root=temp_root).start()
    deadline = time.monotonic() + 300
    seen_model = False
    while not seen_model and run.running and time.monotonic() < deadline:
        seen_model = any(event.stage == "model" for event in run.poll())
        time.sleep(0.02)
    assert seen_model, "the engine should be mid-way through the model stage"
    _cancel_and_check(run, run.temp_dir)
    assert list(temp_root.iterdir()) == []
    assert scene.GetNumberOfNodes() == before


def test_engine_output_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """≥, mm³ and µ arrive intact even when the child's locale would pick ASCII."""
    temp_dir = tmp_path / "run"
    temp_dir.mkdir()
    env = engine_process.engine_environment()
    assert env["PYTHONIOENCODING"] == "utf-8" and env["PYTHONUTF8"] == "1"
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    text = "volume ≥ 5 mm³, σ = 2 µm"
    run = engine_process.EngineProcess()
    run.temp_dir = temp_dir
    code = f"import json, sys; print({text!r}); print(json.dumps({{'stage': 'model', 'done': 1, 'total': 2, 'message': {text!r}}}, ensure_ascii=False)); print('error: ' + {text!r}, file=sys.stderr)"
    run._launch([sys.executable, "-c", code], env, cwd=str(temp_dir))  # noqa: SLF001 - the engine's own launch
    events = []
    assert run.wait(timeout=60, progress=events.append) == 0
    assert [event.message for event in events] == [text]
    assert text in run.log_lines
    assert run.error_message() == "Volume ≥ 5 mm³, σ = 2 µm"
    assert json.loads(json.dumps(events[0].message)) == text


def test_process_tree_reports_members_and_ends_them(tmp_path: Path) -> None:
    tree = ProcessTree([sys.executable, str(STUB), sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        members = _wait_for_child(tree.pid)
        assert tree.pid in members and tree.alive()
    finally:
        tree.kill()
    deadline = time.monotonic() + 5
    while tree.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not tree.alive() and group_members(tree.pid) == []
