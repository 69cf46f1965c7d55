"""medsegai watch against a real Orthanc: a study uploaded while it runs is segmented exactly once, the SEG
it stored is ignored, the server going away is survived, and the state file survives a kill mid-study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from MedSegAILib.pacs.dicomweb import PASSWORD_VARIABLE, USER_VARIABLE
from MedSegAILib.pacs.watch import WatchState, study_key

pytest.importorskip("highdicom", reason="the dicom extra (pip install -e .[dicom]) is not installed")
pytest.importorskip("dicomweb_client", reason="the dicom extra (pip install -e .[dicom]) is not installed")

REPO = Path(__file__).resolve().parents[2]
SINCE = "2031-01-01"


def _small_ct_study(source: Path, folder: Path, tag: str, slices: int = 6) -> str:
    """``slices`` contiguous slices of the CT series as a new study dated after ``SINCE``; returns its UID."""
    folder.mkdir(parents=True)
    files = sorted(source.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    study = generate_uid(entropy_srcs=["watch-study", tag])
    series = generate_uid(entropy_srcs=["watch-series", tag])
    for path in files[7 : 7 + slices]:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=["watch", tag, str(dataset.SOPInstanceUID)])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.StudyDate = SINCE.replace("-", "")
        dataset.save_as(folder / path.name)
    return study


class Watcher:
    """``medsegai watch`` in a subprocess whose stderr lines are collected as they come."""

    def __init__(self, server, state: Path, *extra: str) -> None:
        env = dict(os.environ, **{USER_VARIABLE: server.user, PASSWORD_VARIABLE: server.password, "MEDSEGAI_THREADS": "1"})
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "MedSegAI"), str(REPO / "training"), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "MedSegAILib.cli", "watch", "--dicomweb", server.url, "--modality", "CT",
                   "--since", SINCE, "--state", str(state), "--interval", "0.5", *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if fragment in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line with {fragment!r}; got:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 180) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _seg_count(server, study: str) -> int:
    series = server.get(f"/studies/{_orthanc_id(server, study)}/series")
    return sum(1 for s in series if s["MainDicomTags"].get("Modality") == "SEG")


def _orthanc_id(server, study: str) -> str:
    import requests

    response = requests.post(f"{server.rest}/tools/lookup", data=study, auth=(server.user, server.password), timeout=30)
    response.raise_for_status()
    (found,) = [item["ID"] for item in response.json() if item["Type"] == "Study"]
    return found


@pytest.fixture()
def fresh_server(tmp_path: Path):
    import orthanc_server

    why = orthanc_server.available()
    if why is not None:
        pytest.fail(why)
    server = orthanc_server.OrthancServer(tmp_path / "orthanc")
    try:
        yield server.start()
    finally:
        server.close()


def test_new_study_segmented_exactly_once(orthanc, ct_dicom_with_uids: Path, tmp_path: Path) -> None:
    study = _small_ct_study(ct_dicom_with_uids, tmp_path / "study", "once")
    state = tmp_path / "state.json"
    watcher = Watcher(orthanc, state, "--max-studies", "1", "--duration", "300")
    try:
        watcher.wait_for("watching ")
        time.sleep(1.0)  # at least one empty poll before the study arrives
        orthanc.upload(sorted((tmp_path / "study").iterdir()))
        assert watcher.finish() == 0, "\n".join(watcher.lines)
    finally:
        watcher.kill()
    assert _seg_count(orthanc, study) == 1
    key = study_key(study)
    saved = WatchState.load(state).studies
    assert saved[key]["status"] == "segmented" and study not in state.read_text()
    assert any(f"study {key[:12]}: DICOM SEG stored" in line for line in watcher.lines)
    assert not any(study in line for line in watcher.lines)  # UIDs stay out of the log

    again = Watcher(orthanc, state, "--duration", "4")
    try:
        assert again.finish() == 0
    finally:
        again.kill()
    assert _seg_count(orthanc, study) == 1  # the study (now with its SEG) is not segmented again
    assert any("0 studies segmented this run" in line for line in again.lines), again.lines


def test_survives_the_server_going_away(fresh_server, ct_dicom_with_uids: Path, tmp_path: Path) -> None:
    study = _small_ct_study(ct_dicom_with_uids, tmp_path / "study", "away")
    watcher = Watcher(fresh_server, tmp_path / "state.json", "--max-studies", "1", "--duration", "300")
    try:
        watcher.wait_for("watching ")
        fresh_server.stop()
        watcher.wait_for("server unavailable, retrying in 0.5 s: cannot reach the DICOMweb server")
        fresh_server.start()
        fresh_server.upload(sorted((tmp_path / "study").iterdir()))
        assert watcher.finish() == 0, "\n".join(watcher.lines)
    finally:
        watcher.kill()
    assert _seg_count(fresh_server, study) == 1
    assert any("retrying in" in line for line in watcher.lines)


def test_state_file_survives_a_kill_mid_study(fresh_server, ct_dicom_with_uids: Path, tmp_path: Path) -> None:
    first = _small_ct_study(ct_dicom_with_uids, tmp_path / "first", "kill-first", slices=3)
    second = _small_ct_study(ct_dicom_with_uids, tmp_path / "second", "kill-second")
    state = tmp_path / "state.json"
    fresh_server.upload(sorted((tmp_path / "first").iterdir()))
    watcher = Watcher(fresh_server, state, "--max-studies", "1", "--duration", "300")
    try:
        assert watcher.finish() == 0, "\n".join(watcher.lines)
    finally:
        watcher.kill()
    before = state.read_bytes()
    assert set(json.loads(before)["studies"]) == {study_key(first)}

    fresh_server.upload(sorted((tmp_path / "second").iterdir()))
    watcher = Watcher(fresh_server, state, "--max-studies", "1", "--duration", "300")
    try:
        watcher.wait_for(f"study {study_key(second)[:12]}: segmenting")
        os.kill(watcher.process.pid, signal.SIGKILL)
        watcher.finish()
    finally:
        watcher.kill()
    assert state.read_bytes() == before  # intact and unchanged: the killed study is not recorded
    assert _seg_count(fresh_server, second) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".state")]  # no temporary state left over

    watcher = Watcher(fresh_server, state, "--max-studies", "1", "--duration", "300")
    try:
        assert watcher.finish() == 0, "\n".join(watcher.lines)
    finally:
        watcher.kill()
    assert _seg_count(fresh_server, second) == 1 and _seg_count(fresh_server, first) == 1
    assert set(json.loads(state.read_text())["studies"]) == {study_key(first), study_key(second)}


def test_ctrl_c_stops_cleanly(fresh_server, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    watcher = Watcher(fresh_server, state, "--duration", "300")
    try:
        watcher.wait_for("watching ")
        watcher.process.send_signal(signal.SIGINT)
        assert watcher.finish(timeout=30) == 0
    finally:
        watcher.kill()
    assert "watch ended: stopped" in watcher.lines[-1]
    assert WatchState.load(state).studies == {}


def test_wrong_password_is_one_error(orthanc, tmp_path: Path, monkeypatch, capsys) -> None:
    from MedSegAILib import cli

    monkeypatch.setenv(USER_VARIABLE, orthanc.user)
    monkeypatch.setenv(PASSWORD_VARIABLE, "not-the-password")
    state = tmp_path / "state.json"
    code = cli.main(["watch", "--dicomweb", orthanc.url, "--modality", "CT", "--state", str(state), "--duration", "30"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("error: the DICOMweb server at") and "refused the credentials (HTTP 401" in err[-1]
    assert "not-the-password" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == []  # no state file, no lock left
