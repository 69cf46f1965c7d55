"""Shared pytest fixtures: paths to the real data in ../shared/data and the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("MEDSEGAI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder (../shared/data). Tests that need it fail loudly if it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set MEDSEGAI_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ct_small(shared_data: Path) -> Path:
    return shared_data / "ct-abdomen" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def ct_small_labels(shared_data: Path) -> Path:
    return shared_data / "ct-abdomen" / "example_seg.nii.gz"


@pytest.fixture(scope="session")
def ct_small_label_map(ct_small_labels: Path) -> np.ndarray:
    """``example_seg.nii.gz`` as a read-only uint8 ``(z, y, x)`` array (TotalSegmentator ids, 3 mm voxels)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct_small_labels))
    assert image.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    array = sitk.GetArrayFromImage(image).astype(np.uint8)
    array.flags.writeable = False
    return array


@pytest.fixture(scope="session")
def total_ct_label_names(shared_data: Path) -> dict[int, str]:
    """TotalSegmentator label value -> name of the CT examples (``ct-abdomen/total_ct_labels.json``), background left out."""
    table = json.loads((shared_data / "ct-abdomen" / "total_ct_labels.json").read_text())
    return {int(k): str(v) for k, v in table.items() if int(k) > 0}


@pytest.fixture(scope="session")
def new_file_mode() -> int:
    """Permission bits of a file this user creates (``0o666`` less the umask): what outputs must have."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture(scope="session")
def ct_dicom_dir(shared_data: Path) -> Path:
    return shared_data / "ct-abdomen" / "example_ct_dicom"


@pytest.fixture(scope="session")
def brain_dicom_study(shared_data: Path) -> Path:
    return shared_data / "mr-brain-tumor" / "PGBM-001" / "1992-04-02"


@pytest.fixture(scope="session")
def analytic_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2D analytic bone-threshold model folder (model.keras + model.onnx), patch 64x64."""
    from analytic_models import threshold_model_folder

    return threshold_model_folder(tmp_path_factory.mktemp("models") / "analytic-bone-2d", mode="2d")


@pytest.fixture(scope="session")
def analytic_model_3d_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3D analytic bone-threshold model folder, patch 16x48x48."""
    from analytic_models import threshold_model_folder

    return threshold_model_folder(tmp_path_factory.mktemp("models") / "analytic-bone-3d", mode="3d")


@pytest.fixture(scope="session")
def ct_dicom_with_uids(ct_dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared CT DICOM series with the UIDs its anonymiser emptied given back, as a PACS holds it.

    SOPClassUID/SOPInstanceUID come from each file's meta information; StudyInstanceUID and
    SeriesInstanceUID are fixed test UIDs; PatientID is a test value. Pixels are unchanged
    (JPEG 2000 lossless).
    """
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("ct-dicom-uids")
    study = generate_uid(entropy_srcs=["medsegai-test-ct-study"])
    series = generate_uid(entropy_srcs=["medsegai-test-ct-series"])
    for path in sorted(ct_dicom_dir.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.PatientID = "MEDSEGAI-TEST-CT"
        dataset.save_as(folder / f"{path.name}.dcm")
    return folder


@pytest.fixture(scope="session")
def ct_dicom_seg_run(ct_dicom_with_uids: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CLI run on the CT DICOM series (default model) writing a .seg.nrrd and a DICOM SEG.

    Returns ``{"nrrd": .seg.nrrd, "seg": .dcm, "source": the series folder}``.
    """
    pytest.importorskip("highdicom", reason="the dicom extra (pip install -e .[dicom]) is not installed")
    from MedSegAILib import cli

    out = tmp_path_factory.mktemp("dicomseg")
    nrrd, seg = out / "ct.seg.nrrd", out / "ct.dcm"
    code = cli.main(["segment", str(ct_dicom_with_uids), "-o", str(nrrd), "--dicom-seg", str(seg), "--progress", "none"])
    assert code == 0
    return {"nrrd": nrrd, "seg": seg, "source": ct_dicom_with_uids}


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """One real Orthanc PACS with DICOMweb for the session (loopback only, temporary storage), stopped after."""
    import orthanc_server

    why = orthanc_server.available()
    if why is not None:
        pytest.fail(why)
    server = orthanc_server.OrthancServer(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server.start()
    finally:
        server.close()
