"""Tests of MedSegAILib.report.preview (the three-slice PNG of a segmentation) on the real abdomen CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.report.preview import canonical_lps_array, render_preview

# TotalSegmentator ids in example_seg.nii.gz
LIVER, SPLEEN, AORTA, KIDNEY_LEFT = 5, 1, 52, 3
SPEC = [
    {"name": "liver", "value": 1, "color": [0.86, 0.55, 0.47]},
    {"name": "spleen", "value": 2, "color": [0.62, 0.36, 0.26]},
    {"name": "aorta", "value": 3, "color": [0.90, 0.20, 0.20]},
]


@pytest.fixture(scope="module")
def ct_and_labels(ct_small: Path, ct_small_labels: Path) -> tuple[Volume, Volume]:
    import SimpleITK as sitk

    image = Volume.from_sitk(sitk.ReadImage(str(ct_small)))
    raw = Volume.from_sitk(sitk.ReadImage(str(ct_small_labels)))
    labels = np.zeros(raw.array.shape, dtype=np.uint8)
    for value, source in ((1, LIVER), (2, SPLEEN), (3, AORTA)):
        labels[raw.array == source] = value
    return image, raw.with_array(labels)


def _flip_y(volume: Volume) -> Volume:
    """The same physical image stored with the y index axis reversed."""
    direction = volume.direction.copy()
    ny = volume.array.shape[1]
    origin = np.asarray(volume.origin) + direction[:, 1] * volume.spacing[1] * (ny - 1)
    direction[:, 1] *= -1
    return Volume(np.ascontiguousarray(volume.array[:, ::-1, :]), volume.spacing, tuple(origin), direction)


def _swap_xy(volume: Volume) -> Volume:
    """The same physical image stored with the x and y index axes exchanged."""
    direction = volume.direction[:, [1, 0, 2]]
    spacing = (volume.spacing[1], volume.spacing[0], volume.spacing[2])
    return Volume(np.ascontiguousarray(np.swapaxes(volume.array, 1, 2)), spacing, volume.origin, direction)


def test_canonical_view_puts_the_liver_on_the_patients_right(ct_and_labels):
    image, labels = ct_and_labels
    # the file stores x towards the patient's right (direction diag(-1, -1, 1)): a real reorientation case
    assert image.direction[0, 0] < 0
    canonical, spacing = canonical_lps_array(labels)
    assert spacing == pytest.approx(labels.spacing)
    liver_x = np.nonzero(canonical == 1)[2].mean()
    spleen_x = np.nonzero(canonical == 2)[2].mean()
    # canonical x grows towards the patient's left: liver (right) before spleen (left)
    assert liver_x < canonical.shape[2] / 2 < spleen_x
    # y grows towards posterior: the aorta lies in front of the spine, behind the liver's front edge
    assert np.nonzero(canonical == 3)[1].mean() > np.nonzero(canonical == 1)[1].min()


def test_canonical_view_does_not_depend_on_voxel_order(ct_and_labels):
    image, _ = ct_and_labels
    reference, reference_spacing = canonical_lps_array(image)
    for variant in (_flip_y(image), _swap_xy(image), _swap_xy(_flip_y(image))):
        array, spacing = canonical_lps_array(variant)
        np.testing.assert_array_equal(array, reference)
        assert spacing == pytest.approx(reference_spacing)


def _png_colours(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    pixels = imread(str(path))
    return np.round(pixels[..., :3].reshape(-1, 3) * 255).astype(int)


def _has_colour(colours: np.ndarray, rgb: list[float]) -> bool:
    target = np.round(np.asarray(rgb) * 255).astype(int)
    return bool(np.any(np.all(np.abs(colours - target) <= 1, axis=1)))


def test_preview_png_has_a_legend_entry_per_present_segment(ct_and_labels, tmp_path, new_file_mode):
    image, labels = ct_and_labels
    no_aorta = labels.with_array(np.where(labels.array == 3, 0, labels.array).astype(np.uint8))
    out = render_preview(image, no_aorta, SPEC, tmp_path / "preview.png")
    assert out == tmp_path / "preview.png" and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    colours = _png_colours(out)
    # legend patches are drawn unblended in the label colour: present labels only
    assert _has_colour(colours, SPEC[0]["color"])
    assert _has_colour(colours, SPEC[1]["color"])
    assert not _has_colour(colours, SPEC[2]["color"])
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no temporary file left behind
    assert out.stat().st_mode & 0o777 == new_file_mode  # readable like any file the user writes (not mkstemp's 0600)


def test_preview_accepts_a_model_card_label_list_and_anisotropic_spacing(ct_and_labels, tmp_path):
    from MedSegAILib.model.modelcard import LabelSpec

    image, labels = ct_and_labels
    thick = Volume(image.array, (image.spacing[0], image.spacing[1], 9.0), image.origin, image.direction)
    thick_labels = Volume(labels.array, thick.spacing, thick.origin, thick.direction)
    specs = [LabelSpec(name=d["name"], value=d["value"], color=tuple(d["color"])) for d in SPEC]
    out = render_preview(thick, thick_labels, specs, tmp_path / "thick.png", title="anisotropic")
    assert _has_colour(_png_colours(out), SPEC[2]["color"])


def test_preview_refuses_overwrite_and_mismatched_grids(ct_and_labels, tmp_path):
    image, labels = ct_and_labels
    target = tmp_path / "p.png"
    target.write_bytes(b"user file")
    with pytest.raises(MedSegAIInputError, match="already exists"):
        render_preview(image, labels, SPEC, target)
    assert target.read_bytes() == b"user file"
    render_preview(image, labels, SPEC, target, overwrite=True)
    assert target.read_bytes()[:4] == b"\x89PNG"
    shifted = Volume(labels.array, labels.spacing, (labels.origin[0] + 30.0, *labels.origin[1:]), labels.direction)
    with pytest.raises(MedSegAIInputError, match="not on the image's grid"):
        render_preview(image, shifted, SPEC, tmp_path / "q.png")
    with pytest.raises(ValueError, match="colour"):
        render_preview(image, labels, [{"name": "liver", "value": 1, "color": [2, 0, 0]}], tmp_path / "r.png")
    with pytest.raises(ValueError, match=".png"):
        render_preview(image, labels, SPEC, tmp_path / "s.jpg")
