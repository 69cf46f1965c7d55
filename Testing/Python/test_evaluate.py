"""Evaluation metrics on analytic shapes with known answers, and the evaluate report files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from MedSegAILib.data import dataset as ds
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.io.imageio import read_volume
from medsegai_training.evaluate import dice, evaluate_model, hd95_mm, surface_distances_mm, volume_error


def _sphere(shape: tuple[int, int, int], spacing_xyz: tuple[float, float, float], center_mm: tuple[float, float, float],
            radius_mm: float) -> np.ndarray:
    """Ball mask (z, y, x); center in (x, y, z) mm from voxel (0, 0, 0)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    sx, sy, sz = spacing_xyz
    cx, cy, cz = center_mm
    return ((x * sx - cx) ** 2 + (y * sy - cy) ** 2 + (z * sz - cz) ** 2) <= radius_mm ** 2


def test_dice_known_values() -> None:
    a = np.zeros((4, 10, 10), bool)
    b = np.zeros((4, 10, 10), bool)
    a[:, :, :6] = True  # 240 voxels
    b[:, :, 3:] = True  # 280 voxels, overlap 120
    assert dice(a, b) == pytest.approx(2 * 120 / (240 + 280))
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:, :5])


def test_hd95_offset_spheres_anisotropic() -> None:
    """Two balls offset by d = 6 mm along z, with 2 mm slices: HD95 ≈ d (0.95 d analytically)."""
    spacing = (0.8, 0.8, 2.0)
    shape = (40, 60, 60)
    reference = _sphere(shape, spacing, (24.0, 24.0, 36.0), 15.0)
    prediction = _sphere(shape, spacing, (24.0, 24.0, 42.0), 15.0)
    value = hd95_mm(prediction, reference, spacing)
    assert value == pytest.approx(6.0, abs=1.0)
    to_ref, to_pred = surface_distances_mm(prediction, reference, spacing)
    assert max(to_ref.max(), to_pred.max()) == pytest.approx(6.0, abs=0.6)
    # the spacing order matters: the same voxels read as isotropic 0.8 mm give a far smaller distance
    assert hd95_mm(prediction, reference, (0.8, 0.8, 0.8)) < 3.0
    assert hd95_mm(reference, reference, spacing) == 0.0


def test_hd95_concentric_spheres() -> None:
    """Every point of a ball of radius R + d is d from the ball of radius R: HD95 = d."""
    spacing = (1.0, 1.0, 1.0)
    shape = (48, 48, 48)
    inner = _sphere(shape, spacing, (24.0, 24.0, 24.0), 10.0)
    outer = _sphere(shape, spacing, (24.0, 24.0, 24.0), 14.0)
    assert hd95_mm(outer, inner, spacing) == pytest.approx(4.0, abs=1.0)
    assert hd95_mm(inner, outer, spacing) == hd95_mm(outer, inner, spacing)


def test_empty_mask_behaviour() -> None:
    empty = np.zeros((5, 8, 8), bool)
    full = empty.copy()
    full[1:4, 2:6, 2:6] = True
    assert math.isnan(hd95_mm(empty, empty, (1, 1, 1)))
    assert math.isinf(hd95_mm(full, empty, (1, 1, 1)))
    assert math.isinf(hd95_mm(empty, full, (1, 1, 1)))
    vol = volume_error(empty, full, (1.0, 2.0, 0.5))
    assert vol.reference_ml == pytest.approx(48 * 1.0 / 1000) and vol.prediction_ml == 0.0
    assert vol.relative == pytest.approx(-1.0)
    assert math.isnan(volume_error(full, empty, (1, 1, 1)).relative)
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(full, full, (1.0, 1.0))


def test_volume_error_known() -> None:
    ref = np.zeros((10, 10, 10), bool)
    pred = ref.copy()
    ref[:5] = True  # 500 voxels
    pred[:6] = True  # 600 voxels
    vol = volume_error(pred, ref, (2.0, 2.0, 2.5))  # 10 mm³ per voxel
    assert vol.reference_ml == pytest.approx(5.0) and vol.prediction_ml == pytest.approx(6.0)
    assert vol.difference_ml == pytest.approx(1.0) and vol.relative == pytest.approx(0.2)


@pytest.fixture()
def liver_dataset(tmp_path: Path, ct_small: Path, ct_small_labels: Path) -> tuple[Path, Volume, Volume]:
    image = read_volume(ct_small)
    seg = read_volume(ct_small_labels)
    label = seg.with_array(np.where(seg.array == 5, 1, 0).astype(np.uint8))
    root = tmp_path / "ds"
    ds.add_case(root, [image], label, ["CT"], {"liver": 1}, patient_key="a")
    ds.add_case(root, [image], label, ["CT"], {"liver": 1}, patient_key="b")
    return root, image, label


class _Card:
    id = "stand-in"
    version = "0.0.1"
    label_map = {"background": 0, "liver": 1}


def test_evaluate_model_report_files(tmp_path: Path, liver_dataset: tuple[Path, Volume, Volume]) -> None:
    root, image, label = liver_dataset
    calls = []

    def segment_fn(volumes, model, backend="auto", device="auto"):
        calls.append((model, backend, device))
        assert len(volumes) == 1 and volumes[0].same_grid(image)
        if len(calls) == 1:
            return label, _Card()
        shifted = np.zeros_like(label.array)
        shifted[:, :, 2:] = label.array[:, :, :-2]  # 2 voxels = 6 mm along x
        return label.with_array(shifted), _Card()

    report_dir = tmp_path / "report"
    report = evaluate_model("stand-in", root, None, report_dir, segment_fn=segment_fn)
    assert calls == [("stand-in", "auto", "auto")] * 2
    assert report["best_case"] == "case_0001" and report["worst_case"] == "case_0002"
    first, second = (case["labels"][0] for case in report["cases"])
    assert first["label"] == "liver" and first["dice"] == 1.0 and first["hd95_mm"] == 0.0
    assert first["volume_error_ml"] == 0.0
    assert 0.5 < second["dice"] < 1.0
    assert second["hd95_mm"] == pytest.approx(6.0, abs=0.01)
    assert report["summary"]["liver"]["cases"] == 2
    assert report["model"] == {"id": "stand-in", "version": "0.0.1"}

    with open(report_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["label"]) for r in rows] == [("case_0001", "liver"), ("case_0002", "liver")]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[1]["hd95_mm"]) == pytest.approx(6.0, abs=0.01)
    saved = json.loads((report_dir / "metrics.json").read_text())
    assert saved["cases"][1]["labels"][0]["dice"] == pytest.approx(second["dice"])
    png = report_dir / "best_worst.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 800 and pixels[..., :3].std() > 0.05

    with pytest.raises(MedSegAIInputError, match="not empty"):
        evaluate_model("stand-in", root, None, report_dir, segment_fn=segment_fn)
    with pytest.raises(MedSegAIInputError, match="case_0009"):
        evaluate_model("stand-in", root, ["case_0009"], tmp_path / "other", segment_fn=segment_fn)


def test_evaluate_empty_prediction_writes_inf(tmp_path: Path, liver_dataset: tuple[Path, Volume, Volume]) -> None:
    root, _, label = liver_dataset

    def empty_fn(volumes, model, backend="auto", device="auto"):
        return label.with_array(np.zeros_like(label.array)), _Card()

    report = evaluate_model("x", root, ["case_0002"], tmp_path / "r", segment_fn=empty_fn)
    row = report["cases"][0]["labels"][0]
    assert row["dice"] == 0.0 and row["hd95_mm"] == "inf" and row["volume_error_rel"] == -1.0
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["cases"][0]["labels"][0]["hd95_mm"] == "inf"
    assert "inf" in (tmp_path / "r" / "metrics.csv").read_text()
    assert (tmp_path / "r" / "best_worst.png").is_file()


def test_evaluate_with_real_pipeline(tmp_path: Path, ct_small: Path, analytic_model_dir: Path) -> None:
    """The analytic bone-threshold model through MedSegAILib.inference.pipeline.segment_case: Dice must be 1."""
    from analytic_models import THRESHOLD_HU

    image = read_volume(ct_small)
    bone = image.with_array((image.array > THRESHOLD_HU).astype(np.uint8))
    assert bone.array.sum() > 1000
    root = tmp_path / "bone"
    ds.add_case(root, [image], bone, ["CT"], {"bone": 1}, patient_key="p")
    report = evaluate_model(analytic_model_dir, root, None, tmp_path / "report", backend="onnx", device="cpu")
    row = report["cases"][0]["labels"][0]
    assert row["label"] == "bone" and row["dice"] == 1.0 and row["hd95_mm"] == 0.0
    assert report["model"]["version"] == "1.0.0"


def test_evaluate_picks_the_model_channels_by_name(tmp_path: Path, ct_small: Path, analytic_model_dir: Path) -> None:
    """A 1-channel model on a 2-channel dataset gets its own channel (by name), whatever the order."""
    from analytic_models import THRESHOLD_HU

    image = read_volume(ct_small)
    decoy = image.with_array(np.full_like(image.array, 2000))  # would label everything as bone
    bone = image.with_array((image.array > THRESHOLD_HU).astype(np.uint8))
    root = tmp_path / "two-channel"
    ds.add_case(root, [decoy, image], bone, ["PET", "CT"], {"bone": 1}, patient_key="p")
    report = evaluate_model(analytic_model_dir, root, None, tmp_path / "report", backend="onnx", device="cpu")
    assert report["cases"][0]["labels"][0]["dice"] == 1.0

    other = tmp_path / "no-ct"
    ds.add_case(other, [image], bone, ["MR"], {"bone": 1}, patient_key="p")
    with pytest.raises(MedSegAIInputError, match="needs channel\\(s\\) CT"):
        evaluate_model(analytic_model_dir, other, None, tmp_path / "report2", backend="onnx", device="cpu")


def test_best_and_worst_case_selection(tmp_path: Path, liver_dataset: tuple[Path, Volume, Volume]) -> None:
    root, image, label = liver_dataset
    ds.add_case(root, [image], label, ["CT"], {"liver": 1}, patient_key="c")
    shifts = iter([1, 0, 3])

    def segment_fn(volumes, model, backend="auto", device="auto"):
        shift = next(shifts)
        moved = np.zeros_like(label.array)
        moved[:, :, shift:] = label.array[:, :, : label.array.shape[2] - shift]
        return label.with_array(moved), _Card()

    report = evaluate_model("m", root, ["case_0001", "case_0002", "case_0003"], tmp_path / "r", segment_fn=segment_fn)
    dices = [case["mean_dice"] for case in report["cases"]]
    assert dices[1] == 1.0 and dices[0] > dices[2]
    assert (report["best_case"], report["worst_case"]) == ("case_0002", "case_0003")
    assert report["summary"]["liver"]["dice_mean"] == pytest.approx(sum(dices) / 3)
