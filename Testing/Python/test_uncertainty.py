"""Uncertainty map (segment --uncertainty), its measurements and ``medsegai rank`` (issue 15).

Cheap on purpose: numpy "networks" for the engine, a one-convolution ONNX model (no TensorFlow)
for the command line, volumes of a few thousand voxels.
"""

from __future__ import annotations

import csv
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSegAILib import cli
from MedSegAILib.core.errors import CancelledError, ModelFolderError
from MedSegAILib.core.image import Volume
from MedSegAILib.inference.segment import SegmentOptions, segment_volumes
from MedSegAILib.report.measurements import compute_measurements
from MedSegAILib.inference.pipeline import run_segmentation
from MedSegAILib.inference.ranking import case_score
from MedSegAILib.inference.uncertainty import entropy_uint8, normalized_entropy, uncertain_level, uncertainty_measurements

THRESHOLD, SLOPE = 200.0, 0.05


def ramp_card(mode: str, patch: tuple[int, ...], target_spacing=(None, None, None)) -> types.SimpleNamespace:
    """Stand-in card (the attributes inference reads) of a 2-class threshold model."""
    return types.SimpleNamespace(
        channels=[types.SimpleNamespace(name="CT", normalization={"method": "none"})],
        labels=[types.SimpleNamespace(name="bone", value=1, color=(1.0, 1.0, 1.0))],
        num_classes=2,
        spatial=types.SimpleNamespace(mode=mode, axis="axial", patch_size=patch, target_spacing=target_spacing,
                                      divisible_by=4, batch_size=4),
        postprocessing={},
    )


def ramp_network(batch: np.ndarray) -> np.ndarray:
    """Soft threshold: p(bone) = sigmoid(SLOPE · (x − THRESHOLD))."""
    with np.errstate(over="ignore"):
        bone = (1.0 / (1.0 + np.exp(-(batch[..., 0] - np.float32(THRESHOLD)) * np.float32(SLOPE)))).astype(np.float32)
    return np.stack([1.0 - bone, bone], axis=-1)


def expected_map(array: np.ndarray) -> np.ndarray:
    x = np.asarray(array, dtype=np.float64)
    bone = 1.0 / (1.0 + np.exp(-(x - THRESHOLD) * SLOPE))
    return entropy_uint8(normalized_entropy(np.stack([1 - bone, bone], -1).astype(np.float32)))


def run_map(volume: Volume, card, options: SegmentOptions | None = None) -> tuple[Volume, np.ndarray]:
    uncertainty = np.zeros(volume.array.shape, np.uint8)
    labels = segment_volumes([volume], card, ramp_network, options, uncertainty=uncertainty)
    return labels, uncertainty


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(["2d", "3d"]), tta=st.booleans(),
       shape=st.tuples(st.integers(1, 5), st.integers(3, 21), st.integers(3, 21)))
def test_map_is_zero_far_from_the_threshold_and_maximal_at_it(seed: int, mode: str, tta: bool, shape) -> None:
    rng = np.random.default_rng(seed)
    offsets = rng.choice([-1e4, -400.0, -1.0, 0.0, 1.0, 400.0, 1e4], size=shape) + rng.normal(0, 1e-3, size=shape)
    array = (THRESHOLD + offsets).astype(np.float32)
    patch = (8, 8) if mode == "2d" else (4, 8, 8)  # windows overlap, pad and blend on these shapes
    volume = Volume(array=array, spacing=(0.8, 0.7, 2.5), origin=(1.0, -2.0, 3.0), direction=np.eye(3))
    _, uncertainty = run_map(volume, ramp_card(mode, patch), SegmentOptions(tta=tta))
    far = np.abs(array - THRESHOLD) * SLOPE > 12  # p(bone) < 6e-6 or > 1 − 6e-6
    at = np.abs(array - THRESHOLD) < 0.01
    assert np.all(uncertainty[far] == 0)
    assert np.all(uncertainty[at] == 255)
    assert np.abs(uncertainty.astype(int) - expected_map(array)).max() <= 1


def reoriented(ct_small: Path) -> list[Volume]:
    image = sitk.ReadImage(str(ct_small))[:, :, 8:16]  # 8 slices are enough
    flipped = sitk.Flip(image, [True, False, False])
    permuted = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, True])
    oblique = sitk.Image(image)
    tilt = np.array(sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(20.0)).GetMatrix()).reshape(3, 3)
    oblique.SetDirection(tuple((tilt @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return [Volume.from_sitk(i) for i in (image, flipped, permuted, oblique)]


@pytest.mark.parametrize("mode,patch", [("2d", (32, 32)), ("3d", (8, 32, 32))])
def test_map_sits_on_the_input_grid_for_flipped_permuted_and_oblique_inputs(ct_small: Path, mode: str, patch) -> None:
    for volume in reoriented(ct_small):
        labels, uncertainty = run_map(volume, ramp_card(mode, patch))
        assert labels.same_grid(volume) and uncertainty.shape == volume.array.shape
        # voxel for voxel the analytic value of that very input voxel: any axis mix-up would show
        np.testing.assert_array_equal(uncertainty, expected_map(volume.array))
        assert 0 < np.count_nonzero(uncertainty) < uncertainty.size


def test_map_through_model_resampling_stays_bounded_and_on_the_grid(ct_small: Path) -> None:
    volume = reoriented(ct_small)[0]
    labels, uncertainty = run_map(volume, ramp_card("2d", (32, 32), target_spacing=(5.0, 5.0, None)))
    assert uncertainty.shape == volume.array.shape and labels.same_grid(volume)
    exact = expected_map(volume.array)
    # interpolated at the model's coarser grid: zero where the whole neighbourhood is certain
    from scipy import ndimage

    certain_around = ndimage.maximum_filter(exact, size=(1, 5, 5)) == 0
    assert np.all(uncertainty[certain_around] == 0)
    assert uncertainty.max() > 100


def test_a_model_without_probabilities_cannot_give_a_map() -> None:
    volume = Volume(array=np.full((2, 8, 8), THRESHOLD, np.float32), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=np.eye(3))
    uncertainty = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ModelFolderError, match="not class probabilities.*cannot give an uncertainty map"):
        segment_volumes([volume], ramp_card("2d", (8, 8)), lambda b: ramp_network(b) * 3.0, uncertainty=uncertainty)
    segment_volumes([volume], ramp_card("2d", (8, 8)), lambda b: ramp_network(b) * 3.0)  # the labels alone still work


def test_uncertain_level_and_measurements() -> None:
    assert uncertain_level(2, 0.9) == round(255 * (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))) / math.log(2)) == 120
    assert uncertain_level(2) == 21  # the default: a 99/1 split
    assert uncertain_level(7) < uncertain_level(2)
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[1, 5:10, 5:10] = 1
    uncertainty = np.zeros_like(labels)
    uncertainty[1, 5:10, 5:10] = 15  # certain enough inside (below 21)
    uncertainty[1, 10:12, 5:10] = 200  # 10 uncertain voxels touching the segment (within 5 mm)
    uncertainty[1, 18:20, 18:20] = 255  # 4 far away (> 5 mm)
    volume = Volume(array=labels, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    rows = compute_measurements(volume, [{"name": "bone", "value": 1}])
    uncertainty_measurements(volume, volume.with_array(uncertainty), rows, num_classes=2)
    assert rows[0]["mean_uncertainty"] == round(15 / 255, 4)
    assert rows[0]["uncertain_ml_near"] == pytest.approx(10 * 2.0 / 1000)
    score = case_score(volume, volume.with_array(uncertainty), 2)
    assert score.expected_error == pytest.approx(14 / (25 + 14))


# ---------------------------------------------------------------- command line (ONNX model, no TensorFlow)
@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from analytic_models import threshold_model_folder

    folder = threshold_model_folder(tmp_path_factory.mktemp("models") / "ramp", mode="2d", patch=[16, 16],
                                    backends=("onnx",), model_id="analytic-ramp")
    return folder


def write_case(path: Path, near: int) -> Path:
    """A small float volume: ``near`` voxels at the model's threshold, the rest far from it."""
    from analytic_models import THRESHOLD_HU

    array = np.full((3, 12, 12), -1000.0, np.float32)
    array[1, 2:8, 2:8] = 1000.0  # 36 certain bone voxels
    array.reshape(-1)[:near] = THRESHOLD_HU
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def test_segment_uncertainty_on_the_command_line(onnx_model: Path, tmp_path: Path, capsys) -> None:
    case = write_case(tmp_path / "case.nrrd", near=20)
    args = ["segment", str(case), "-o", str(tmp_path / "labels.nrrd"), "--model", str(onnx_model), "--progress", "none",
            "--uncertainty", str(tmp_path / "u.nii.gz"), "--measurements", str(tmp_path / "m.json")]
    assert cli.main(args) == 0
    written = Volume.from_sitk(sitk.ReadImage(str(tmp_path / "u.nii.gz")))
    assert written.array.dtype == np.uint8 and written.same_grid(Volume.from_sitk(sitk.ReadImage(str(case))))
    assert np.count_nonzero(written.array == 255) == 20 and np.count_nonzero(written.array) == 20
    rows = json.loads((tmp_path / "m.json").read_text())
    assert rows[0]["name"] == "bone" and "mean_uncertainty" in rows[0] and rows[0]["uncertain_ml_near"] >= 0

    # an existing map is refused before any work, and nothing is touched
    (tmp_path / "labels.nrrd").unlink()
    before = (tmp_path / "u.nii.gz").read_bytes()
    assert cli.main(args[:-2]) == 2
    assert "u.nii.gz already exists" in capsys.readouterr().err
    assert (tmp_path / "u.nii.gz").read_bytes() == before and not (tmp_path / "labels.nrrd").exists()
    # a Slicer segmentation name is no image file
    assert cli.main(args[:-4] + ["--uncertainty", str(tmp_path / "u.seg.nrrd")]) == 2
    assert "must be an image file" in capsys.readouterr().err


def test_cancel_mid_run_leaves_no_map(onnx_model: Path, tmp_path: Path) -> None:
    case = write_case(tmp_path / "case.nrrd", near=5)
    calls = {"n": 0}

    def cancel_later() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(CancelledError):
        run_segmentation([case], tmp_path / "labels.nrrd", model=onnx_model, uncertainty=tmp_path / "u.nrrd",
                         should_cancel=cancel_later)
    assert calls["n"] > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nrrd"]


def test_rank_orders_cases_by_expected_error(onnx_model: Path, tmp_path: Path, capsys) -> None:
    cases = [write_case(tmp_path / f"{name}.nrrd", near) for name, near in (("calm", 0), ("worst", 30), ("some", 6))]
    output = tmp_path / "ranking.csv"
    assert cli.main(["rank", *map(str, cases), "--model", str(onnx_model), "-o", str(output), "--progress", "none"]) == 0
    rows = list(csv.DictReader(output.open()))
    assert [row["input"] for row in rows] == ["worst.nrrd", "some.nrrd", "calm.nrrd"]
    assert [row["rank"] for row in rows] == ["1", "2", "3"] and [row["case"] for row in rows] == ["2", "3", "1"]
    assert float(rows[2]["expected_error"]) == 0.0 < float(rows[1]["expected_error"]) < float(rows[0]["expected_error"])
    assert "correct first: case 2 (worst.nrrd" in capsys.readouterr().err
    before = output.read_bytes()
    assert cli.main(["rank", str(cases[0]), "--model", str(onnx_model), "-o", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err and output.read_bytes() == before
    assert cli.main(["rank", str(tmp_path / "missing.nrrd"), "--model", str(onnx_model), "-o", str(tmp_path / "r2.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r2.csv").exists()


def test_rank_case_folders_of_a_multichannel_model(tmp_path: Path) -> None:
    from MedSegAILib.core.errors import MedSegAIInputError
    from MedSegAILib.inference.ranking import case_channel_paths

    study = tmp_path / "study"
    (study / "FLAIR").mkdir(parents=True)  # a DICOM folder named after its channel
    (study / "T1post.nii.gz").write_bytes(b"")
    (study / "T1post-old.nrrd").write_bytes(b"")  # not the channel's name: ignored
    assert case_channel_paths(study, ["T1post", "FLAIR"]) == [study / "T1post.nii.gz", study / "FLAIR"]
    with pytest.raises(MedSegAIInputError, match="has no T1prereg"):
        case_channel_paths(study, ["T1post", "T1prereg", "FLAIR"])
    with pytest.raises(MedSegAIInputError, match="must be a case folder"):
        case_channel_paths(study / "T1post.nii.gz", ["T1post", "FLAIR"])
