"""segment --dicomweb against a real Orthanc (DICOMweb plugin): round trip, series choice, bad inputs."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest

from MedSegAILib import cli
from MedSegAILib.io import dicomseg
from MedSegAILib.io.dicom import scan_dicom_folder
from MedSegAILib.pacs.dicomweb import USER_VARIABLE, PASSWORD_VARIABLE, connect
from MedSegAILib.io.segfile import read_segmentation_labels

pytest.importorskip("highdicom", reason="the dicom extra (pip install -e .[dicom]) is not installed")
pytest.importorskip("dicomweb_client", reason="the dicom extra (pip install -e .[dicom]) is not installed")

MR_CHANNELS = ("T1post", "T1prereg", "FLAIR")


@pytest.fixture(autouse=True)
def credentials(orthanc, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(USER_VARIABLE, orthanc.user)
    monkeypatch.setenv(PASSWORD_VARIABLE, orthanc.password)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def _upload_folder(orthanc, folder: Path) -> str:
    """Upload every DICOM file under ``folder``; returns the StudyInstanceUID."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    orthanc.upload(files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _series_of(orthanc, study_uid: str) -> list[dict]:
    return connect(orthanc.url).client.search_for_series(study_instance_uid=study_uid)


def _seg_series(orthanc, study_uid: str) -> list[str]:
    return [s["0020000E"]["Value"][0] for s in _series_of(orthanc, study_uid) if s["00080060"]["Value"][0] == "SEG"]


def _segment(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["segment", *argv, "--progress", "none"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ct_study(orthanc, ct_dicom_with_uids: Path) -> str:
    return _upload_folder(orthanc, ct_dicom_with_uids)


@pytest.fixture(scope="module")
def mr_study(orthanc, brain_dicom_study: Path) -> str:
    return _upload_folder(orthanc, brain_dicom_study)


def test_round_trip_stores_the_file_based_labels(orthanc, ct_study: str, ct_dicom_seg_run, tmp_path: Path, capsys) -> None:
    local = tmp_path / "local.seg.nrrd"
    code, err = _segment(["--dicomweb", orthanc.url, "--study", ct_study, "-o", str(local)], capsys)
    assert code == 0, err
    assert orthanc.password not in err and "stored DICOM SEG series" in err
    (seg_uid,) = _seg_series(orthanc, ct_study)
    client = connect(orthanc.url).client
    (seg,) = client.retrieve_series(ct_study, seg_uid)
    path = tmp_path / "downloaded.dcm"
    seg.save_as(path)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct_dicom_seg_run["source"].iterdir())]
    assert seg.StudyInstanceUID == ct_study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(source)
    from MedSegAILib.model.modelcard import find_model

    back = dicomseg.read_dicom_seg_labels(path, source, find_model(None).labels)
    file_based, _ = read_segmentation_labels(ct_dicom_seg_run["nrrd"])
    assert int((file_based.array == 1).sum()) > 100_000
    np.testing.assert_array_equal(back, file_based.array)
    local_labels, _ = read_segmentation_labels(local)
    assert local_labels.same_grid(file_based, tolerance=1e-6)
    np.testing.assert_array_equal(local_labels.array, file_based.array)


def _mr_series_uids(brain_dicom_study: Path) -> dict[str, str]:
    """Series folder name (T1post, T1prereg, FLAIR, MaskTumor) -> SeriesInstanceUID."""
    return {info.files[0].parent.name: info.uid for info in scan_dicom_folder(brain_dicom_study)}


def _mr_descriptions(brain_dicom_study: Path) -> dict[str, str]:
    return {info.uid: info.description for info in scan_dicom_folder(brain_dicom_study)}


def test_multi_series_study_lists_then_chooses(orthanc, mr_study: str, brain_dicom_study: Path, tmp_path: Path, capsys) -> None:
    uids = _mr_series_uids(brain_dicom_study)
    assert set(MR_CHANNELS) <= set(uids)
    code, err = _segment(["--dicomweb", orthanc.url, "--study", mr_study, "--model", "mr-brain-tumor"], capsys)
    assert code == 2 and err.startswith("error: the study holds 4 image series")
    for uid, description in _mr_descriptions(brain_dicom_study).items():
        assert f"{uid}  '{description}'  MR  24 images" in err
    assert _seg_series(orthanc, mr_study) == []
    chosen = [uids[name] for name in MR_CHANNELS]
    series_args = [arg for uid in chosen for arg in ("--series", uid)]
    code, err = _segment(["--dicomweb", orthanc.url, "--study", mr_study, "--model", "mr-brain-tumor", *series_args], capsys)
    assert code == 0, err
    (seg_uid,) = _seg_series(orthanc, mr_study)
    (seg,) = connect(orthanc.url).client.retrieve_series(mr_study, seg_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["T1post"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumor"]
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "mr-brain-tumor"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_server_down(ct_study: str, capsys) -> None:
    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    code, err = _segment(["--dicomweb", url, "--study", ct_study], capsys)
    _one_error(code, err, "cannot reach the DICOMweb server")


def test_wrong_password(orthanc, ct_study: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, "not-the-password")
    code, err = _segment(["--dicomweb", orthanc.url, "--study", ct_study], capsys)
    _one_error(code, err, "refused the credentials (HTTP 401")
    assert "not-the-password" not in err


def test_password_from_netrc(orthanc, ct_study: str, monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.delenv(USER_VARIABLE)
    monkeypatch.delenv(PASSWORD_VARIABLE)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {orthanc.user} password {orthanc.password}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    code, err = _segment(["--dicomweb", orthanc.url, "--study", ct_study, "--series", "1.2.3.4"], capsys)
    assert code == 2 and err.startswith("error: series 1.2.3.4 is not in the study")  # got past authentication
    assert "'CT Body 3.0'  CT  20 images" in err


def test_credentials_in_url_refused(orthanc, ct_study: str, capsys) -> None:
    url = orthanc.url.replace("http://", f"http://{orthanc.user}:{orthanc.password}@")
    code, err = _segment(["--dicomweb", url, "--study", ct_study], capsys)
    _one_error(code, err, "do not put credentials in the --dicomweb URL")
    assert orthanc.password not in err


def test_unknown_study(orthanc, capsys) -> None:
    code, err = _segment(["--dicomweb", orthanc.url, "--study", "1.2.826.0.1.3680043.8.498.1"], capsys)
    _one_error(code, err, "has no study 1.2.826.0.1.3680043.8.498.1")


def test_series_with_missing_slices(orthanc, ct_dicom_with_uids: Path, tmp_path: Path, capsys) -> None:
    from pydicom.uid import generate_uid

    folder = tmp_path / "gap"
    folder.mkdir()
    study = generate_uid(entropy_srcs=["medsegai-test-gap-study"])
    series = generate_uid(entropy_srcs=["medsegai-test-gap-series"])
    files = sorted(ct_dicom_with_uids.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    for path in files[:8] + files[9:]:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=["gap", str(dataset.SOPInstanceUID)])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(folder / path.name)
    _upload_folder(orthanc, folder)
    local = tmp_path / "gap.seg.nrrd"
    code, err = _segment(["--dicomweb", orthanc.url, "--study", study, "-o", str(local)], capsys)
    _one_error(code, err, "has missing slices", "1 slice(s) missing")
    assert _seg_series(orthanc, study) == [] and not local.exists()


def test_modality_the_model_does_not_take(orthanc, mr_study: str, brain_dicom_study: Path, capsys) -> None:
    before = _seg_series(orthanc, mr_study)
    uid = _mr_series_uids(brain_dicom_study)["T1post"]
    code, err = _segment(["--dicomweb", orthanc.url, "--study", mr_study, "--series", uid], capsys)
    _one_error(code, err, "is MR, but model 'ct-abdomen-organs' takes CT")
    assert _seg_series(orthanc, mr_study) == before


REFUSE_SEG = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'SEG' then
    return false
  end
  return true
end
"""


def test_seg_upload_refused(ct_dicom_with_uids: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import orthanc_server

    server = orthanc_server.OrthancServer(tmp_path / "refusing", lua=REFUSE_SEG)
    try:
        server.start()
        monkeypatch.setenv(USER_VARIABLE, server.user)
        monkeypatch.setenv(PASSWORD_VARIABLE, server.password)
        from test_watch import _small_ct_study

        _small_ct_study(ct_dicom_with_uids, tmp_path / "small", "refused")
        study = _upload_folder(server, tmp_path / "small")
        shutil.rmtree(tmp_path / "small")
        local, measurements = tmp_path / "local.seg.nrrd", tmp_path / "m.csv"
        code, err = _segment(
            ["--dicomweb", server.url, "--study", study, "-o", str(local), "--measurements", str(measurements)], capsys
        )
        _one_error(code, err, "refused to store the DICOM SEG")
        assert _seg_series(server, study) == []
        assert not local.exists() and not measurements.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["refusing"]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["segment", "--study", "1.2.3"], "--dicomweb URL and --study UID go together"),
        (["segment", "--dicomweb", "http://127.0.0.1:9/dicom-web"], "--dicomweb URL and --study UID go together"),
        (["segment", "some-folder", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3"], "drop the INPUT arguments"),
        (["segment", "--dicomweb", "ftp://127.0.0.1/dicom-web", "--study", "1.2.3"], "needs an http:// or https:// URL"),
        (["segment"], "no INPUT given"),
        (["watch", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--modality", "CT", "--since", "yesterday"], "--since must be a date"),
        (["watch", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--model", "mr-brain-tumor"], "takes 3 inputs"),
        (["watch", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--modality", "PT"], "no installed model takes a single PT series"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], expected: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    _one_error(code, err, expected)
    assert list(tmp_path.iterdir()) == []
