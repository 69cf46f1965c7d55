"""`medsegai segment` / `medsegai models` end to end on the shared CT, with the analytic model.

The analytic model labels voxels above 300.5 HU, so every segmentation has a known answer: the
numpy threshold mask of the input, on the input's exact grid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from analytic_models import THRESHOLD_HU, lambda_model_folder, threshold_model_folder
from MedSegAILib.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a user runs it: a separate process, real exit code, real stderr."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "MedSegAI"))
    completed = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    return completed.returncode, completed.stdout, completed.stderr


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def expected_mask(image: sitk.Image) -> np.ndarray:
    return (sitk.GetArrayFromImage(image).astype(np.float64) > THRESHOLD_HU).astype(np.uint8)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_threshold_equals_numpy_on_nifti(mode, overlap, request, ct_small, tmp_path) -> None:
    model = request.getfixturevalue("analytic_model_dir" if mode == "2d" else "analytic_model_3d_dir")
    output = tmp_path / "labels.nii.gz"
    assert main(["segment", str(ct_small), "-o", str(output), "--model", str(model),
                 "--overlap", str(overlap), "--progress", "none"]) == 0
    image, labels = sitk.ReadImage(str(ct_small)), sitk.ReadImage(str(output))
    assert_same_grid(image, labels)
    assert labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected_mask(image))


def _flipped_and_oblique(ct_small: Path, tmp_path: Path) -> list[Path]:
    image = sitk.ReadImage(str(ct_small))
    flipped = sitk.Flip(image, [True, False, False])  # left-right flipped voxels and direction
    flipped.SetDirection(tuple(np.diag([1.0, -1.0, 1.0]).ravel()))  # x now points to patient left
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    oblique = sitk.Image(image)
    oblique.SetDirection(tuple((tilt @ rotation @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    sagittal = sitk.PermuteAxes(image, [2, 0, 1])  # acquired "sagittal": index axes permuted
    paths = []
    for name, img in (("flipped", flipped), ("oblique", oblique), ("permuted", sagittal)):
        path = tmp_path / f"{name}.nrrd"
        sitk.WriteImage(img, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_flipped_oblique_and_permuted_inputs_keep_their_grid(mode, request, ct_small, tmp_path) -> None:
    model = request.getfixturevalue("analytic_model_dir" if mode == "2d" else "analytic_model_3d_dir")
    for path in _flipped_and_oblique(ct_small, tmp_path):
        output = tmp_path / f"{path.stem}-{mode}-labels.nrrd"
        assert main(["segment", str(path), "-o", str(output), "--model", str(model), "--progress", "none"]) == 0
        image, labels = sitk.ReadImage(str(path)), sitk.ReadImage(str(output))
        assert_same_grid(image, labels)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected_mask(image), err_msg=path.name)


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_dicom_series_larger_than_patch(mode, request, ct_dicom_dir, tmp_path) -> None:
    """512x512 slices with a 64x64 (2D) or 16x48x48 (3D) patch: sliding windows inside each slice."""
    model = request.getfixturevalue("analytic_model_dir" if mode == "2d" else "analytic_model_3d_dir")
    output = tmp_path / "dicom.seg.nrrd"
    assert main(["segment", str(ct_dicom_dir), "-o", str(output), "--model", str(model),
                 "--progress", "none"]) == 0
    import slicerio

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_dicom_dir)))
    reference = reader.Execute()
    segmentation = slicerio.read_segmentation(str(output))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == ["bone"]
    assert segments[0]["labelValue"] == 1
    np.testing.assert_allclose(segments[0]["color"], [0.945, 0.839, 0.569], atol=1e-3)
    voxels = segmentation["voxels"]
    reference_mask = expected_mask(reference)
    assert voxels.shape == reference_mask.T.shape or voxels.shape == reference_mask.shape
    if voxels.shape != reference_mask.shape:
        voxels = voxels.T  # slicerio's default index order is (i, j, k)
    np.testing.assert_array_equal(voxels, reference_mask)
    assert 1_000 < reference_mask.sum() < reference_mask.size // 4  # real bone, not everything


def test_json_progress_measurements_and_onnx_equals_keras(analytic_model_dir, ct_small, tmp_path) -> None:
    outputs = {}
    for backend in ("onnx", "tensorflow"):
        output = tmp_path / f"{backend}.nrrd"
        measurements = tmp_path / f"{backend}.json"
        code, stdout, stderr = run_cli("segment", str(ct_small), "-o", str(output), "--model", str(analytic_model_dir),
                                       "--backend", backend, "--device", "cpu", "--progress", "json",
                                       "--measurements", str(measurements))
        assert code == 0, stderr
        records = [json.loads(line) for line in stdout.splitlines()]
        assert {"read", "preprocess", "model", "write"} <= {r["stage"] for r in records}
        assert all(set(r) == {"stage", "done", "total", "message"} for r in records)
        rows = json.loads(measurements.read_text())
        assert rows[0]["name"] == "bone"
        voxel_volume_ml = np.prod(sitk.ReadImage(str(ct_small)).GetSpacing()) / 1000
        assert rows[0]["voxel_count"] == int(expected_mask(sitk.ReadImage(str(ct_small))).sum())
        assert rows[0]["volume_ml"] == pytest.approx(rows[0]["voxel_count"] * voxel_volume_ml, rel=1e-6)
        outputs[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    np.testing.assert_array_equal(outputs["onnx"], outputs["tensorflow"])


def test_models_lists_installed_models(analytic_model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEDSEGAI_MODELS", str(analytic_model_dir.parent))
    assert main(["models", "--json"]) == 0
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["analytic-bone-2d"]["channels"] == ["CT"]
    assert listed["analytic-bone-2d"]["labels"] == ["bone"]
    assert main(["segment", "x.nrrd", "-o", "y.nrrd", "--model", "analytic-bone-2d", "--progress", "none"]) == 2


# --- bad input: one `error:` line, exit 2, no traceback, nothing written --------------------------


def assert_refused(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def _write(tmp_path: Path, name: str, image: sitk.Image) -> Path:
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_missing_input(analytic_model_dir, tmp_path) -> None:
    code, _, stderr = run_cli("segment", str(tmp_path / "nope.nrrd"), "-o", str(tmp_path / "o.nrrd"),
                              "--model", str(analytic_model_dir))
    assert_refused(code, stderr, "nope.nrrd")
    assert not (tmp_path / "o.nrrd").exists()


def test_truncated_input(analytic_model_dir, ct_small, tmp_path) -> None:
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(ct_small.read_bytes()[: ct_small.stat().st_size // 2])
    code, _, stderr = run_cli("segment", str(truncated), "-o", str(tmp_path / "o.nrrd"), "--model", str(analytic_model_dir))
    assert_refused(code, stderr, "truncated.nii.gz")


def test_2d_4d_and_rgb_inputs(analytic_model_dir, ct_small, tmp_path) -> None:
    ct = sitk.ReadImage(str(ct_small))
    two_d = _write(tmp_path, "slice.nrrd", ct[:, :, 5])
    four_d = _write(tmp_path, "four.nrrd", sitk.JoinSeries([ct, ct]))
    rgb = _write(tmp_path, "rgb.nrrd", sitk.Compose([ct, ct, ct]))
    for path, fragment in ((two_d, "2D"), (four_d, "4D"), (rgb, "RGB")):
        code, _, stderr = run_cli("segment", str(path), "-o", str(tmp_path / "o.nrrd"), "--model", str(analytic_model_dir))
        assert_refused(code, stderr, path.name)
        assert fragment.lower() in stderr.lower() or "3d" in stderr.lower(), stderr


def test_wrong_number_of_channels(analytic_model_dir, ct_small, tmp_path) -> None:
    code, _, stderr = run_cli("segment", str(ct_small), str(ct_small), "-o", str(tmp_path / "o.nrrd"),
                              "--model", str(analytic_model_dir))
    assert_refused(code, stderr, "needs 1 input", "CT")


def test_channels_with_different_geometry_are_resampled(ct_small, tmp_path) -> None:
    model = threshold_model_folder(tmp_path / "two", channels=("CT", "CT2"), model_id="two-channel")
    ct = sitk.ReadImage(str(ct_small))
    shifted = sitk.Resample(ct, [s // 2 for s in ct.GetSize()], sitk.Transform(), sitk.sitkLinear,
                            ct.GetOrigin(), [2 * s for s in ct.GetSpacing()], ct.GetDirection(), -1000.0, ct.GetPixelID())
    second = _write(tmp_path, "second.nrrd", shifted)
    output = tmp_path / "o.nrrd"
    assert main(["segment", str(ct_small), str(second), "-o", str(output), "--model", str(model), "--progress", "none"]) == 0
    labels = sitk.ReadImage(str(output))
    assert_same_grid(ct, labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected_mask(ct))
    far = sitk.Image(shifted)
    far.SetOrigin([o + 5000 for o in ct.GetOrigin()])
    code, _, stderr = run_cli("segment", str(ct_small), str(_write(tmp_path, "far.nrrd", far)),
                              "-o", str(tmp_path / "far-out.nrrd"), "--model", str(model))
    assert_refused(code, stderr, "overlap")


def test_empty_nan_and_overflow_volumes(analytic_model_dir, ct_small, tmp_path) -> None:
    ct = sitk.ReadImage(str(ct_small))
    array = sitk.GetArrayFromImage(ct)

    def like(values: np.ndarray, name: str) -> Path:
        image = sitk.GetImageFromArray(values)
        image.CopyInformation(ct)
        return _write(tmp_path, name, image)

    with_nan = array.astype(np.float32)
    with_nan[3, 4, 5] = np.nan
    with_inf = array.astype(np.float32)
    with_inf[0, 0, 0] = np.inf
    huge = array.astype(np.int64) * (2**40)
    for path, fragment in ((like(np.zeros_like(array), "empty.nrrd"), "empty"),
                           (like(with_nan, "nan.nrrd"), "nan"),
                           (like(with_inf, "inf.nrrd"), "inf"),
                           (like(huge, "huge.nrrd"), "")):
        code, _, stderr = run_cli("segment", str(path), "-o", str(tmp_path / "o.nrrd"), "--model", str(analytic_model_dir))
        assert_refused(code, stderr, path.name, fragment)
    int32 = like(array.astype(np.int32), "int32.nrrd")  # a wide integer type whose values fit is fine
    assert main(["segment", str(int32), "-o", str(tmp_path / "int32-out.nrrd"), "--model", str(analytic_model_dir),
                 "--progress", "none"]) == 0


def test_invalid_model_json_and_lambda_layer(analytic_model_dir, ct_small, tmp_path) -> None:
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"schema_version": 1, "id": "bad"}))
    code, _, stderr = run_cli("segment", str(ct_small), "-o", str(tmp_path / "o.nrrd"), "--model", str(bad))
    assert_refused(code, stderr, "invalid model.json", "channels")
    lam = lambda_model_folder(tmp_path / "lambda")
    code, _, stderr = run_cli("segment", str(ct_small), "-o", str(tmp_path / "o.nrrd"), "--model", str(lam),
                              "--backend", "tensorflow")
    assert_refused(code, stderr, "Lambda")
    assert not (tmp_path / "o.nrrd").exists()


def test_existing_output_is_never_overwritten(analytic_model_dir, ct_small, tmp_path) -> None:
    output = tmp_path / "o.seg.nrrd"
    output.write_bytes(b"precious")
    code, _, stderr = run_cli("segment", str(ct_small), "-o", str(output), "--model", str(analytic_model_dir))
    assert_refused(code, stderr, "exists", "--overwrite")
    assert output.read_bytes() == b"precious"
    code, _, stderr = run_cli("segment", str(ct_small), "-o", str(output), "--model", str(analytic_model_dir),
                              "--overwrite", "--progress", "none")
    assert code == 0, stderr
    assert output.read_bytes() != b"precious"


def test_bad_usage_is_one_line(tmp_path) -> None:
    code, _, stderr = run_cli("segment", "a.nrrd", "-o", "b.nrrd", "--overlap", "1.5")
    assert_refused(code, stderr, "overlap")
    code, _, stderr = run_cli("segment", "a.nrrd", "-o", "b.txt")
    assert_refused(code, stderr, ".seg.nrrd")


def test_cancel_leaves_no_output(tmp_path, ct_small) -> None:
    """SIGTERM (what the Slicer module's Cancel sends) mid-run: exit 130, no output, no temp file."""
    model = threshold_model_folder(tmp_path / "slow", mode="3d", patch=[8, 16, 16], backends=("onnx",))
    output = tmp_path / "out" / "labels.nrrd"
    output.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO / "MedSegAI"))
    process = subprocess.Popen(
        [sys.executable, "-m", "MedSegAILib.cli", "segment", str(ct_small), "-o", str(output), "--model", str(model),
         "--overlap", "0.9", "--batch-size", "1", "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    for line in process.stdout:  # wait until the model stage has started
        if json.loads(line)["stage"] == "model":
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert code == 130, process.stderr.read()
    assert list(output.parent.iterdir()) == []
