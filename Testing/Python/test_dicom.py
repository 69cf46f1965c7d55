"""DICOM: the shared JPEG 2000 CT series, the multi-series MR study, and broken series refused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedSegAILib.io import dicom, imageio
from MedSegAILib.core.errors import MedSegAIInputError

T1POST_UID = "1.3.6.1.4.1.14519.5.2.1.4429.7055.197322826283777183783875680644"
SERIES = {
    "FLAIR_reg": "1.3.6.1.4.1.14519.5.2.1.4429.7055.276192313544103095643438879237",
    "Mask_Tumor": "1.3.6.1.4.1.14519.5.2.1.4429.7055.214730986094204028494565163335",
    "T1post": T1POST_UID,
    "T1pre_reg": "1.3.6.1.4.1.14519.5.2.1.4429.7055.134352136136407624741022743695",
}


def _gdcm_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture(scope="module")
def ct_dicom_volume(ct_dicom_dir: Path):
    return imageio.read_volume(ct_dicom_dir)


@pytest.fixture()
def t1post_dir(brain_dicom_study: Path) -> Path:
    return brain_dicom_study / "dicom" / "T1post"


def _copy_series(source: Path, target: Path, edit: Callable[[int, Any], None] | None = None) -> list[Path]:
    """Copy a series (sorted by file name) to ``target``, letting ``edit(index, dataset)`` change each file."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        out = target / f"img{index:03d}.dcm"
        if edit is None:
            shutil.copyfile(path, out)
        else:
            dataset = pydicom.dcmread(path)
            edit(index, dataset)
            dataset.save_as(out)
        written.append(out)
    return written


def _position_sorted(folder: Path) -> list[Path]:
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return [p for _, p in sorted(zip([float(h.ImagePositionPatient[2]) for h in headers], files))]


# The shared JPEG 2000 CT series.


def test_ct_jpeg2000_matches_gdcm(ct_dicom_dir: Path, ct_dicom_volume) -> None:
    volume = ct_dicom_volume
    reference = _gdcm_read(ct_dicom_dir)
    assert volume.shape == (20, 512, 512)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    assert volume.spacing == pytest.approx(reference.GetSpacing())
    assert volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert volume.origin == pytest.approx(reference.GetOrigin())
    assert volume.origin[2] == pytest.approx(-804.5)  # lowest slice first, although file order is descending
    np.testing.assert_allclose(volume.direction.reshape(-1), reference.GetDirection(), atol=1e-9)
    assert volume.metadata == {"modality": "CT", "series_description": "CT Body 3.0", "series_uid": ""}


def test_ct_hounsfield_units(ct_dicom_volume, shared_data: Path) -> None:
    hu = ct_dicom_volume.array
    labels = imageio.read_volume(shared_data / "ct-abdomen" / "example_seg_dicom.nii.gz")
    # Stored pixel 0 is -1024 HU after RescaleIntercept -1024 (padding outside the reconstruction circle).
    assert int(hu.min()) == -1024
    # Labels are on the same physical grid with the y axis flipped; map them by physical position.
    on_ct_grid = sitk.Resample(labels.to_sitk(), ct_dicom_volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor)
    mapped = sitk.GetArrayFromImage(on_ct_grid)
    np.testing.assert_array_equal(mapped, labels.array[:, ::-1, :])
    air = hu[(mapped == 0) & (hu > -1024) & (hu < -500)]
    assert np.median(air) == pytest.approx(-1000, abs=25)
    assert 40 < hu[mapped == 5].mean() < 150  # liver (TotalSegmentator label 5), soft tissue HU


def test_pixel_readers_agree_on_jpeg2000(ct_dicom_dir: Path, ct_dicom_volume) -> None:
    files = _position_sorted(ct_dicom_dir)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    by_pydicom = dicom._read_pixels_pydicom(files, headers, "CT")
    by_gdcm = dicom._read_pixels_sitk(files, "CT")
    np.testing.assert_array_equal(by_pydicom, ct_dicom_volume.array)
    np.testing.assert_array_equal(by_gdcm, ct_dicom_volume.array)


def test_falls_back_to_gdcm_without_pydicom_decoder(ct_dicom_dir: Path, ct_dicom_volume, monkeypatch) -> None:
    def no_decoder(*args: Any) -> np.ndarray:
        raise dicom._DecoderMissing("no plugin")

    monkeypatch.setattr(dicom, "_read_pixels_pydicom", no_decoder)
    np.testing.assert_array_equal(imageio.read_volume(ct_dicom_dir).array, ct_dicom_volume.array)


def test_file_names_do_not_decide_slice_order(tmp_path: Path, ct_dicom_dir: Path, ct_dicom_volume) -> None:
    files = sorted(ct_dicom_dir.iterdir())
    rng = np.random.default_rng(3)
    for number, index in enumerate(rng.permutation(len(files))):
        shutil.copyfile(files[index], tmp_path / f"{number:02d}")
    (tmp_path / "README.txt").write_text("not DICOM")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    volume = imageio.read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, ct_dicom_volume.array)
    assert volume.origin == pytest.approx(ct_dicom_volume.origin)


# The multi-series MR study (one sub-folder per series).


def test_list_series(brain_dicom_study: Path) -> None:
    series = imageio.list_dicom_series(brain_dicom_study)
    assert {s.description: s.uid for s in series} == SERIES
    assert all(s.modality == "MR" and s.num_slices == 24 and len(s.files) == 24 for s in series)


def test_several_series_error_lists_them(brain_dicom_study: Path) -> None:
    with pytest.raises(MedSegAIInputError) as info:
        imageio.read_volume(brain_dicom_study)
    message = str(info.value)
    assert "holds 4 series" in message and "--series UID" in message
    for description, uid in SERIES.items():
        line = next(line for line in message.splitlines() if uid in line)
        assert description in line and "MR" in line and "24 slices" in line


def test_series_uid_selects_series(brain_dicom_study: Path, t1post_dir: Path, shared_data: Path) -> None:
    volume = imageio.read_volume(brain_dicom_study, series_uid=T1POST_UID)
    reference = _gdcm_read(t1post_dir)
    assert volume.shape == (24, 320, 260)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    assert volume.spacing == pytest.approx(reference.GetSpacing(), rel=1e-6)
    assert volume.origin == pytest.approx(reference.GetOrigin(), abs=1e-6)
    np.testing.assert_allclose(volume.direction.reshape(-1), reference.GetDirection(), atol=1e-6)
    assert not np.allclose(volume.direction, np.eye(3), atol=1e-2)  # an oblique acquisition
    assert volume.metadata == {"modality": "MR", "series_description": "T1post", "series_uid": T1POST_UID}
    other_study = imageio.read_volume(shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19" / "T1post.nrrd")
    assert other_study.array.dtype == volume.array.dtype
    assert other_study.shape[1:] == volume.shape[1:]
    assert other_study.spacing == pytest.approx(volume.spacing, rel=1e-3)


def test_unknown_series_uid(brain_dicom_study: Path) -> None:
    with pytest.raises(MedSegAIInputError, match=r"(?s)DICOM series 1\.2\.3 is not in .*T1post"):
        imageio.read_volume(brain_dicom_study, series_uid="1.2.3")


def test_no_patient_data_in_metadata(brain_dicom_study: Path) -> None:
    for uid in SERIES.values():
        assert set(imageio.read_volume(brain_dicom_study, series_uid=uid).metadata) == {
            "modality", "series_description", "series_uid",
        }  # fmt: skip


# Rescale slope/intercept.


def test_rescale_integral_slope_intercept(tmp_path: Path, t1post_dir: Path) -> None:
    original = imageio.read_volume(t1post_dir)

    def rescale(index: int, dataset: Any) -> None:
        dataset.RescaleSlope, dataset.RescaleIntercept = "2", "-7"

    _copy_series(t1post_dir, tmp_path, rescale)
    volume = imageio.read_volume(tmp_path)
    expected = original.array.astype(np.int64) * 2 - 7
    assert volume.array.dtype.kind == "i"
    np.testing.assert_array_equal(volume.array, expected)


def test_rescale_per_slice_fractional(tmp_path: Path, t1post_dir: Path) -> None:
    original = imageio.read_volume(t1post_dir)
    slopes = {}

    def rescale(index: int, dataset: Any) -> None:
        slopes[float(dataset.ImagePositionPatient[2])] = 0.5 + 0.25 * (index % 3)
        dataset.RescaleSlope = str(0.5 + 0.25 * (index % 3))
        dataset.RescaleIntercept = "10.5"

    _copy_series(t1post_dir, tmp_path, rescale)
    volume = imageio.read_volume(tmp_path)
    assert volume.array.dtype == np.float32
    z = [volume.origin[2] + k * volume.spacing[2] * volume.direction[2, 2] for k in range(volume.shape[0])]
    for k in range(volume.shape[0]):
        slope = min(slopes.items(), key=lambda item: abs(item[0] - z[k]))[1]
        np.testing.assert_allclose(volume.array[k], original.array[k] * slope + 10.5, rtol=1e-6)


# Broken series: each refused with its own clear message.


def test_missing_slice(tmp_path: Path, t1post_dir: Path) -> None:
    _copy_series(t1post_dir, tmp_path)
    _position_sorted(tmp_path)[10].unlink()
    with pytest.raises(MedSegAIInputError, match=r"missing slices: a gap of 13 mm \(1 slice\(s\) missing\)"):
        imageio.read_volume(tmp_path)


def test_uneven_spacing(tmp_path: Path, ct_dicom_dir: Path) -> None:
    def shift(index: int, dataset: Any) -> None:
        if index == 7:
            dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 0.6

    _copy_series(ct_dicom_dir, tmp_path, shift)
    with pytest.raises(MedSegAIInputError, match="unevenly spaced slices"):
        imageio.read_volume(tmp_path)


def test_spacing_jitter_within_tolerance_is_accepted(tmp_path: Path, ct_dicom_dir: Path) -> None:
    def jitter(index: int, dataset: Any) -> None:
        if index == 7:
            dataset.ImagePositionPatient[2] = float(dataset.ImagePositionPatient[2]) + 0.01

    _copy_series(ct_dicom_dir, tmp_path, jitter)
    assert imageio.read_volume(tmp_path).spacing[2] == pytest.approx(2.0)


def test_duplicate_positions(tmp_path: Path, t1post_dir: Path) -> None:
    files = _copy_series(t1post_dir, tmp_path)
    dataset = pydicom.dcmread(files[3])
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(tmp_path / "copy.dcm")
    with pytest.raises(MedSegAIInputError, match="several slices at the same position"):
        imageio.read_volume(tmp_path)


def test_mixed_orientation(tmp_path: Path, t1post_dir: Path) -> None:
    def tilt(index: int, dataset: Any) -> None:
        if index == 5:
            dataset.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    _copy_series(t1post_dir, tmp_path, tilt)
    with pytest.raises(MedSegAIInputError, match="mixes slice orientations"):
        imageio.read_volume(tmp_path)


def test_mixed_slice_size(tmp_path: Path, t1post_dir: Path) -> None:
    def resize(index: int, dataset: Any) -> None:
        if index == 2:
            dataset.Rows = 256

    _copy_series(t1post_dir, tmp_path, resize)
    with pytest.raises(MedSegAIInputError, match="mixes slice sizes"):
        imageio.read_volume(tmp_path)


def test_sheared_gantry_tilt(tmp_path: Path, ct_dicom_dir: Path) -> None:
    def shear(index: int, dataset: Any) -> None:
        z = float(dataset.ImagePositionPatient[2])
        dataset.ImagePositionPatient[1] = float(dataset.ImagePositionPatient[1]) + 0.3 * (z + 766.5)

    _copy_series(ct_dicom_dir, tmp_path, shear)
    with pytest.raises(MedSegAIInputError, match="sheared slices"):
        imageio.read_volume(tmp_path)


def test_single_slice_series(tmp_path: Path, t1post_dir: Path) -> None:
    shutil.copyfile(sorted(t1post_dir.iterdir())[0], tmp_path / "only.dcm")
    with pytest.raises(MedSegAIInputError, match="single slice .*2D image"):
        imageio.read_volume(tmp_path)


def test_multi_frame_object(shared_data: Path) -> None:
    with pytest.raises(MedSegAIInputError, match="multi-frame"):
        imageio.read_volume(shared_data / "dicom-seg")


def test_rgb_series(tmp_path: Path, t1post_dir: Path) -> None:
    def colour(index: int, dataset: Any) -> None:
        dataset.SamplesPerPixel = 3
        dataset.PhotometricInterpretation = "RGB"

    _copy_series(t1post_dir, tmp_path, colour)
    with pytest.raises(MedSegAIInputError, match=r"colour \(RGB\) images"):
        imageio.read_volume(tmp_path)


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello" * 100)
    with pytest.raises(MedSegAIInputError, match="no DICOM image files found"):
        imageio.read_volume(tmp_path)
