"""imageio: reading image files (real CT/MR), bad inputs each refused clearly, atomic writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSegAILib.io import imageio
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume


def _oblique_flipped_direction() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    return rotation @ np.diag([-1.0, 1.0, 1.0])


def test_read_nifti_ct_keeps_int16_and_geometry(ct_small: Path) -> None:
    volume = imageio.read_volume(ct_small)
    reference = sitk.ReadImage(str(ct_small))
    assert volume.array.dtype == np.int16
    assert volume.shape == (30, 101, 122)
    assert volume.spacing == pytest.approx(reference.GetSpacing())
    assert volume.origin == pytest.approx(reference.GetOrigin())
    np.testing.assert_allclose(volume.direction.reshape(-1), reference.GetDirection())
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))


def test_read_int32_ct_is_not_converted(shared_data: Path) -> None:
    volume = imageio.read_volume(shared_data / "ct-abdomen" / "example_ct.nii.gz")
    assert volume.array.dtype == np.int32
    assert volume.shape == (112, 101, 122)
    assert volume.array.min() < -900 and volume.array.max() > 500


def test_read_nrrd_mr(shared_data: Path) -> None:
    volume = imageio.read_volume(shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19" / "T1post.nrrd")
    assert volume.shape == (25, 320, 260)
    assert volume.spacing == pytest.approx((0.6875, 0.6875, 6.5), rel=1e-4)
    assert volume.array.dtype == np.uint16


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_write_read_round_trip_oblique_flipped(tmp_path: Path, ct_small: Path, suffix: str) -> None:
    source = imageio.read_volume(ct_small)
    volume = Volume(source.array, (0.7, 0.8, 2.5), (-12.5, 40.25, 7.0), _oblique_flipped_direction())
    path = imageio.write_volume(tmp_path / f"out{suffix}", volume)
    back = imageio.read_volume(path)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.spacing == pytest.approx(volume.spacing, abs=1e-5)
    assert back.origin == pytest.approx(volume.origin, abs=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]


def test_write_refuses_existing_output(tmp_path: Path, ct_small: Path) -> None:
    volume = imageio.read_volume(ct_small)
    target = tmp_path / "labels.nrrd"
    target.write_bytes(b"precious")
    with pytest.raises(MedSegAIInputError, match="exists; pass --overwrite"):
        imageio.write_volume(target, volume)
    assert target.read_bytes() == b"precious"
    imageio.write_volume(target, volume, overwrite=True)
    np.testing.assert_array_equal(imageio.read_volume(target).array, volume.array)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nrrd"]


def test_atomic_output_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "result.seg.nrrd"
    with pytest.raises(KeyboardInterrupt):
        with imageio.atomic_output(target) as temp:
            assert temp.parent == tmp_path and temp.name.endswith(".seg.nrrd") and temp != target
            temp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "old.csv"
    existing.write_text("old")
    with pytest.raises(RuntimeError):
        with imageio.atomic_output(existing, overwrite=True) as temp:
            temp.write_text("new")
            raise RuntimeError("writer failed")
    assert existing.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["old.csv"]


def test_atomic_output_creates_parent_and_renames(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "table.csv"
    with imageio.atomic_output(target) as temp:
        temp.write_text("a,b\n")
    assert target.read_text() == "a,b\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


@pytest.mark.parametrize("name", ["out.mhd", "out.png", "out"])
def test_write_unsupported_suffix(tmp_path: Path, ct_small: Path, name: str) -> None:
    with pytest.raises(MedSegAIInputError, match="unsupported output type"):
        imageio.write_volume(tmp_path / name, imageio.read_volume(ct_small))
    assert list(tmp_path.iterdir()) == []


def test_full_suffix() -> None:
    assert imageio.full_suffix("a/b.seg.nrrd") == ".seg.nrrd"
    assert imageio.full_suffix("x.NII.GZ") == ".nii.gz"
    assert imageio.full_suffix("x.v1.nrrd") == ".nrrd"
    assert imageio.full_suffix("noext") == ""


# Bad inputs: each one its own test.


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MedSegAIInputError, match="does not exist"):
        imageio.read_volume(tmp_path / "nothing.nii.gz")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(MedSegAIInputError, match=r"unsupported file type '\.png'.*DICOM folder"):
        imageio.read_volume(path)


def test_single_dicom_file_asks_for_folder(shared_data: Path) -> None:
    path = next((shared_data / "mr-brain-tumor" / "PGBM-001" / "1992-04-02" / "dicom" / "T1post").glob("*.dcm"))
    with pytest.raises(MedSegAIInputError, match="single DICOM file; pass the folder"):
        imageio.read_volume(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path: Path, ct_small: Path, suffix: str) -> None:
    complete = tmp_path / f"complete{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(ct_small)), str(complete), useCompression=suffix != ".nii")
    data = complete.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    assert imageio.read_volume(complete).shape == (30, 101, 122)
    with pytest.raises(MedSegAIInputError, match="could not be read completely"):
        imageio.read_volume(truncated)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.nrrd"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(MedSegAIInputError, match="could not be read as a .nrrd image"):
        imageio.read_volume(path)


def test_2d_image(tmp_path: Path, ct_small: Path) -> None:
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_small))[:, :, 10], str(path))
    with pytest.raises(MedSegAIInputError, match=r"is a 2D image \(122x101 voxels\)"):
        imageio.read_volume(path)


def test_single_slice_3d_image(tmp_path: Path, ct_small: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(ct_small))[:, :, 10:11], str(path))
    with pytest.raises(MedSegAIInputError, match=r"is a 2D image \(122x101x1 voxels\)"):
        imageio.read_volume(path)


def test_4d_image(tmp_path: Path, ct_small: Path) -> None:
    image = sitk.ReadImage(str(ct_small))
    path = tmp_path / "timeseries.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))
    with pytest.raises(MedSegAIInputError, match=r"is a 4D image \(122x101x30x2 voxels"):
        imageio.read_volume(path)


def test_4d_image_with_one_volume_is_read(tmp_path: Path, ct_small: Path) -> None:
    image = sitk.ReadImage(str(ct_small))
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image]), str(path))
    volume = imageio.read_volume(path)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.spacing == pytest.approx(image.GetSpacing())


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_rgb_image(tmp_path: Path, ct_small: Path, suffix: str) -> None:
    grey = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(ct_small))), sitk.sitkUInt8)
    path = tmp_path / f"rgb{suffix}"
    sitk.WriteImage(sitk.Compose([grey, grey, grey]), str(path))
    with pytest.raises(MedSegAIInputError, match="3 values per voxel .*RGB.*3D scalar"):
        imageio.read_volume(path)


def _memory_mapped(array: np.ndarray) -> bool:
    import mmap

    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii"])
@pytest.mark.parametrize("which", ["ct-int16", "mr-uint16"])
def test_raw_file_is_memory_mapped_read_only_and_equal(tmp_path: Path, ct_small: Path, shared_data: Path, which: str,
                                                     suffix: str) -> None:
    """Uncompressed NRRD and NIfTI: ITK's voxels and geometry, no copy, never writable."""
    source = ct_small if which == "ct-int16" else shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19" / "T1post.nrrd"
    image = sitk.ReadImage(str(source))
    image.SetDirection(tuple(_oblique_flipped_direction().ravel()))
    path = tmp_path / f"raw{suffix}"
    sitk.WriteImage(image, str(path), useCompression=False)
    reference = sitk.ReadImage(str(path))  # NIfTI stores the direction as a quaternion: compare with ITK's reading
    volume = imageio.read_volume(path)
    assert _memory_mapped(volume.array) and not volume.array.flags.writeable
    assert volume.array.dtype == sitk.GetArrayViewFromImage(image).dtype
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.spacing == pytest.approx(reference.GetSpacing())
    assert volume.origin == pytest.approx(reference.GetOrigin())
    np.testing.assert_allclose(volume.direction.reshape(-1), reference.GetDirection())
    with pytest.raises(ValueError, match="read-only"):
        volume.array[0, 0, 0] = 1  # the user's file can never be changed through the volume


def test_other_nrrd_layouts_are_read_by_itk_with_the_same_voxels(tmp_path: Path, ct_small: Path) -> None:
    """gzip, big-endian, trailing bytes, byte skip: not mapped, read as before, same voxels."""
    import nrrd

    image = sitk.ReadImage(str(ct_small))
    expected = sitk.GetArrayFromImage(image)
    header = {"space": "left-posterior-superior", "space directions": np.diag(image.GetSpacing()),
              "space origin": np.array(image.GetOrigin()), "kinds": ["domain"] * 3, "encoding": "raw"}
    gzipped = tmp_path / "gzip.nrrd"
    sitk.WriteImage(image, str(gzipped), useCompression=True)
    big_endian = tmp_path / "big-endian.nrrd"
    nrrd.write(str(big_endian), expected.astype(">i2"), dict(header), index_order="C")
    trailing = tmp_path / "trailing.nrrd"
    nrrd.write(str(trailing), expected, dict(header), index_order="C")
    trailing.write_bytes(trailing.read_bytes() + b"\0\0")
    skipped = tmp_path / "byte-skip.nrrd"
    nrrd.write(str(skipped), expected, dict(header), index_order="C")
    text, data = skipped.read_bytes().split(b"\n\n", 1)
    skipped.write_bytes(text + b"\nbyte skip: 4\n\n" + b"SKIP" + data)
    for path in (gzipped, big_endian, trailing, skipped):
        volume = imageio.read_volume(path)
        assert not _memory_mapped(volume.array), path.name
        np.testing.assert_array_equal(volume.array, expected, err_msg=path.name)
        assert volume.spacing == pytest.approx(image.GetSpacing())


def test_other_nifti_layouts_are_read_by_itk_with_the_same_voxels(tmp_path: Path, ct_small: Path) -> None:
    """Intensity scaling, trailing bytes, a wrong magic: not mapped, read by ITK as before."""
    import struct

    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.ReadImage(str(ct_small)), str(plain), useCompression=False)
    data = bytearray(plain.read_bytes())
    assert data[344:348] == b"n+1\0" and struct.unpack("<3f", data[108:120])[1:] in ((0.0, 0.0), (1.0, 0.0))
    scaled = bytearray(data)
    scaled[112:120] = struct.pack("<2f", 2.0, -10.0)  # scl_slope, scl_inter
    trailing = data + b"\0\0"
    for name, content in (("scaled.nii", scaled), ("trailing.nii", trailing)):
        path = tmp_path / name
        path.write_bytes(bytes(content))
        volume = imageio.read_volume(path)
        assert not _memory_mapped(volume.array), name
        np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), err_msg=name)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(plain))).astype(np.float64)
    np.testing.assert_allclose(imageio.read_volume(tmp_path / "scaled.nii").array, 2.0 * stored - 10.0)


def test_truncated_raw_nrrd_is_refused(tmp_path: Path, ct_small: Path) -> None:
    complete = tmp_path / "complete.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_small)), str(complete), useCompression=False)
    truncated = tmp_path / "truncated.nrrd"
    truncated.write_bytes(complete.read_bytes()[:-1000])
    with pytest.raises(MedSegAIInputError, match="could not be read completely"):
        imageio.read_volume(truncated)
