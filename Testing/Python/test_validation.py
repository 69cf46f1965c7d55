"""validation: refusing unusable volumes, safe voxel-type conversion, channel count and grids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from MedSegAILib.io import imageio
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.inference.validation import FLOAT32_EXACT_INT, check_channels, check_volume


@pytest.fixture(scope="module")
def ct(ct_small: Path) -> Volume:
    return imageio.read_volume(ct_small)


def _with(volume: Volume, array: np.ndarray) -> Volume:
    return Volume(array, volume.spacing, volume.origin, volume.direction)


def test_int16_ct_passes_unchanged(ct: Volume) -> None:
    assert check_volume(ct, "CT") is ct


def test_int32_ct_becomes_exact_float32(shared_data: Path) -> None:
    volume = imageio.read_volume(shared_data / "ct-abdomen" / "example_ct.nii.gz")
    checked = check_volume(volume, "CT")
    assert checked.array.dtype == np.float32
    np.testing.assert_array_equal(checked.array.astype(np.int32), volume.array)
    assert checked.same_grid(volume)


def test_int64_overflow(ct: Volume) -> None:
    array = ct.array.astype(np.int64) * 2**30
    with pytest.raises(MedSegAIInputError, match=r"int64 values .* beyond the \+-2\^24 range"):
        check_volume(_with(ct, array), "CT")


def test_uint64_overflow(ct: Volume) -> None:
    array = (ct.array.astype(np.int64) + 1100).astype(np.uint64)
    array[0, 0, 0] = FLOAT32_EXACT_INT + 1
    with pytest.raises(MedSegAIInputError, match="uint64 values"):
        check_volume(_with(ct, array), "CT")


def test_int64_small_values_become_float32(ct: Volume) -> None:
    checked = check_volume(_with(ct, ct.array.astype(np.int64)), "CT")
    assert checked.array.dtype == np.float32
    np.testing.assert_array_equal(checked.array, ct.array.astype(np.float32))


def test_float64_becomes_float32_and_overflow_refused(ct: Volume) -> None:
    assert check_volume(_with(ct, ct.array.astype(np.float64)), "CT").array.dtype == np.float32
    huge = ct.array.astype(np.float64)
    huge[1, 2, 3] = 1e300
    with pytest.raises(MedSegAIInputError, match="beyond the float32 range"):
        check_volume(_with(ct, huge), "CT")


def test_bool_becomes_uint8(ct: Volume) -> None:
    checked = check_volume(_with(ct, ct.array > 0), "mask")
    assert checked.array.dtype == np.uint8
    assert int(checked.array.sum()) == int((ct.array > 0).sum())


def test_empty_volume(ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match=r"CT is empty \(every voxel is 0\)"):
        check_volume(_with(ct, np.zeros_like(ct.array)), "CT")


def test_constant_volume(ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match=r"constant \(every voxel is -1024\)"):
        check_volume(_with(ct, np.full_like(ct.array, -1024)), "CT")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(ct: Volume, bad: float) -> None:
    array = ct.array.astype(np.float32)
    array[29, 100, 121] = bad
    with pytest.raises(MedSegAIInputError, match="NaN and .* infinite voxel values"):
        check_volume(_with(ct, array), "CT")


def test_complex_voxels(ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match="voxel type complex64"):
        check_volume(_with(ct, ct.array.astype(np.complex64)), "CT")


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((30, 101, 122, 3), "RGB or vector"),
        ((2, 30, 101, 122), "4D image"),
        ((1, 101, 122), "2D image"),
        ((101, 122), "2D image"),
    ],
)
def test_not_3d_scalar(shape: tuple[int, ...], pattern: str) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    with pytest.raises(MedSegAIInputError, match=pattern):
        check_volume(Volume(array), "CT")


def test_check_volume_type_error() -> None:
    with pytest.raises(TypeError):
        check_volume(np.zeros((3, 3, 3)), "CT")  # type: ignore[arg-type]


# Channels.


def test_wrong_channel_count(ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match="expects 2 input image.*in this order: T1post, FLAIR; got 1"):
        check_channels([ct], ["T1post", "FLAIR"])
    with pytest.raises(MedSegAIInputError, match="expects 1 input image.*CT; got 2"):
        check_channels([ct, ct], ["CT"])


def test_channel_checked_with_its_name(ct: Volume) -> None:
    empty = _with(ct, np.zeros_like(ct.array))
    with pytest.raises(MedSegAIInputError, match=r"channel 2 \(FLAIR\) is empty"):
        check_channels([ct, empty], ["T1post", "FLAIR"])
    with pytest.raises(MedSegAIInputError, match=r"channel 2 \(FLAIR, from flair\.nrrd\) is empty"):
        check_channels([ct, empty], ["T1post", "FLAIR"], sources=["t1.nrrd", "flair.nrrd"])


def test_same_grid_channels_unchanged(shared_data: Path) -> None:
    study = shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19"
    t1, flair = imageio.read_volume(study / "T1post.nrrd"), imageio.read_volume(study / "FLAIR.nrrd")
    out = check_channels([t1, flair], SimpleNamespace(channels=[{"name": "T1post"}, {"name": "FLAIR"}]))
    assert out[0] is t1 and out[1] is flair


def test_flipped_copy_resampled_exactly(ct: Volume) -> None:
    # The same physical image stored with the x axis reversed: a different grid, same content.
    nx = ct.shape[2]
    origin = np.array(ct.origin) + ct.direction[:, 0] * ct.spacing[0] * (nx - 1)
    direction = ct.direction.copy()
    direction[:, 0] *= -1
    flipped = Volume(ct.array[:, :, ::-1].copy(), ct.spacing, tuple(origin), direction)
    out = check_channels([ct, flipped], ["CT", "CT2"])
    assert out[1].same_grid(ct)
    assert out[1].metadata["resampled"] is True
    np.testing.assert_allclose(out[1].array, ct.array, atol=1e-3)


def test_partial_overlap_resampled(ct: Volume) -> None:
    crop = Volume(ct.array[5:20, 10:60, 20:90].copy(), ct.spacing,
                  tuple(ct.direction @ (np.array(ct.spacing) * [20, 10, 5]) + ct.origin), ct.direction)  # fmt: skip
    out = check_channels([ct, crop], ["CT", "crop"])[1]
    assert out.shape == ct.shape and out.array.dtype == np.float32
    np.testing.assert_allclose(out.array[5:20, 10:60, 20:90], ct.array[5:20, 10:60, 20:90], atol=1e-3)
    assert np.all(out.array[:4] == crop.array.min()) and np.all(out.array[:, :, 91:] == crop.array.min())


def test_channels_do_not_overlap(ct: Volume) -> None:
    far = Volume(ct.array.copy(), ct.spacing, tuple(np.array(ct.origin) + [0.0, 0.0, 500.0]), ct.direction)
    with pytest.raises(MedSegAIInputError, match=r"channels do not overlap in space: channel 2 \(PET\)"):
        check_channels([ct, far], ["CT", "PET"])
