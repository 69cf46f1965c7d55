"""DICOM SEG output: validated by dciodvfy, read back by highdicom, dcmqi and (via the .seg.nrrd of the
same run) Slicer's storage node, with the source series' geometry, study and references."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from MedSegAILib import cli
from MedSegAILib.io import dicomseg
from MedSegAILib.io.imageio import read_volume
from MedSegAILib.model.modelcard import find_model
from MedSegAILib.io.segfile import read_segmentation_labels

pytest.importorskip("highdicom", reason="the dicom extra (pip install -e .[dicom]) is not installed")


@pytest.fixture(scope="module")
def card():
    return find_model(None)


@pytest.fixture(scope="module")
def ct_run(ct_dicom_seg_run: dict[str, Path]) -> dict[str, Path]:
    return ct_dicom_seg_run


def _source_headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]


def test_dciodvfy_reports_no_error(ct_run: dict[str, Path]) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found; install Debian's dicom3tools (make setup does)")
    report = subprocess.run([tool, str(ct_run["seg"])], capture_output=True, text=True, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    assert "Segmentation" in [line.strip() for line in lines], lines[:5]  # the IOD it recognised
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, errors


def test_highdicom_reads_the_labels_of_the_seg_nrrd(ct_run: dict[str, Path], card) -> None:
    labels, _ = read_segmentation_labels(ct_run["nrrd"])
    back = dicomseg.read_dicom_seg_labels(ct_run["seg"], _source_headers(ct_run["source"]), card.labels)
    assert back.shape == labels.shape == (20, 512, 512)
    assert int((labels.array == 1).sum()) > 100_000  # the liver is there
    np.testing.assert_array_equal(back, labels.array)


def test_dcmqi_reads_the_labels_of_the_seg_nrrd(ct_run: dict[str, Path], tmp_path: Path, card) -> None:
    tool = shutil.which("segimage2itkimage") or str(Path(sys.executable).with_name("segimage2itkimage"))
    if not Path(tool).exists():
        pytest.fail("segimage2itkimage not found; pip install dcmqi (make setup does)")
    subprocess.run(
        [tool, "--inputDICOM", str(ct_run["seg"]), "--outputDirectory", str(tmp_path), "--outputType", "nrrd", "--mergeSegments"],
        check=True, capture_output=True,
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    by_name = {label.name: label.value for label in card.labels}
    lookup = np.zeros(256, dtype=np.uint8)
    for group in meta["segmentAttributes"]:
        for segment in group:
            lookup[int(segment["labelID"])] = by_name[segment["SegmentLabel"]]
    assert sorted(s["SegmentLabel"] for g in meta["segmentAttributes"] for s in g) == sorted(by_name)
    merged = read_volume(tmp_path / "1.nrrd")
    labels, _ = read_segmentation_labels(ct_run["nrrd"])
    assert merged.same_grid(labels, tolerance=1e-3)
    np.testing.assert_array_equal(lookup[merged.array], labels.array)


def test_slicer_storage_node_agrees(ct_run: dict[str, Path], card) -> None:
    from test_segfile import _slicer_segment_masks

    back = dicomseg.read_dicom_seg_labels(ct_run["seg"], _source_headers(ct_run["source"]), card.labels)
    _, masks, _ = _slicer_segment_masks(ct_run["nrrd"])
    for label in card.labels:
        mask, (k0, j0, i0) = masks[label.name]
        full = np.zeros(back.shape, dtype=bool)
        if mask is not None:
            full[k0 : k0 + mask.shape[0], j0 : j0 + mask.shape[1], i0 : i0 + mask.shape[2]] = mask
        np.testing.assert_array_equal(full, back == label.value, err_msg=label.name)


def test_seg_attributes(ct_run: dict[str, Path], card) -> None:
    import highdicom as hd

    seg = pydicom.dcmread(ct_run["seg"])
    source = _source_headers(ct_run["source"])
    assert seg.SOPClassUID == dicomseg.SEG_SOP_CLASS_UID and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    for keyword in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID", "StudyDate"):
        assert seg[keyword].value == source[0][keyword].value, keyword
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        h.SOPInstanceUID for h in source
    }
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [label.name for label in card.labels]
    for item, label in zip(seg.SegmentSequence, card.labels):
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == label.terminology["category"]["code"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == label.terminology["type"]["code"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        modifier = label.terminology.get("type_modifier")
        if modifier is not None:
            (coded,) = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
            assert (coded.CodeValue, coded.CodeMeaning) == (modifier["code"], modifier["meaning"])
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (card.id, card.version)
        rgb = hd.color.CIELabColor(*_lab(item.RecommendedDisplayCIELabValue)).to_rgb()
        np.testing.assert_allclose(np.array(rgb) / 255, label.color, atol=2 / 255)
    labels, _ = read_segmentation_labels(ct_run["nrrd"])
    present = sum(len(np.unique(labels.array[k])) - 1 for k in range(labels.shape[0]))
    assert seg.NumberOfFrames == present  # only frames that hold a segment
    origin = [float(v) for v in seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    assert any(np.allclose(origin, [float(v) for v in h.ImagePositionPatient]) for h in source)


def _lab(value: list[int]) -> tuple[float, float, float]:
    l_val, a_val, b_val = value
    return l_val * 100 / 0xFFFF, a_val * 255 / 0xFFFF - 128, b_val * 255 / 0xFFFF - 128


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_series_without_uids_is_one_error(ct_dicom_dir: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(["segment", str(ct_dicom_dir), "-o", str(tmp_path / "x.dcm"), "--progress", "none"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: the DICOM series has no StudyInstanceUID")
    assert list(tmp_path.iterdir()) == []


def test_non_dicom_input_is_one_error(ct_small: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(["segment", str(ct_small), "-o", str(tmp_path / "x.dcm")], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs a DICOM series folder" in err
    code, err = _run(["segment", str(ct_small), "-o", str(tmp_path / "x.seg.nrrd"), "--dicom-seg", str(tmp_path / "y.dcm")], capsys)
    assert code == 2 and "needs a DICOM series folder" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_highdicom_is_one_error(ct_dicom_with_uids: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "highdicom", None)
    code, err = _run(["segment", str(ct_dicom_with_uids), "-o", str(tmp_path / "x.dcm")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "needs the highdicom package" in err and "pip install highdicom" in err
    assert list(tmp_path.iterdir()) == []
