"""``medsegai dataset ...`` / ``medsegai evaluate`` handlers driven through argparse, and the
nnU-Net v2 / Decathlon importers, on real data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSegAILib.data import dataset as ds
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.io.imageio import read_volume
from medsegai_training.cli_data import add_dataset_commands, add_evaluate_command
from medsegai_training.dataset_tools import import_nnunet


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsegai")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_dataset_commands(subparsers)
    add_evaluate_command(subparsers)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory, ct_small: Path, ct_small_labels: Path) -> tuple[Path, Path]:
    """The shared CT and a spleen=1/liver=2 label file made from its TotalSegmentator labels."""
    folder = tmp_path_factory.mktemp("ctfiles")
    seg = sitk.ReadImage(str(ct_small_labels))
    array = sitk.GetArrayFromImage(seg)
    label = np.zeros(array.shape, np.uint8)
    label[array == 1] = 1
    label[array == 5] = 2
    out = sitk.GetImageFromArray(label)
    out.CopyInformation(seg)
    sitk.WriteImage(out, str(folder / "label.nii.gz"))
    return ct_small, folder / "label.nii.gz"


def test_dataset_add_and_check(tmp_path: Path, ct_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    image, label = ct_files
    root = tmp_path / "ds"
    code = _run(["dataset", "add", str(root), "--images", str(image), "--label", str(label), "--patient", "PAT-7",
                 "--channels", "CT", "--labels", '{"spleen": 1, "liver": 2}'])
    assert code == 0
    assert "added case_0001" in capsys.readouterr().out
    # the second add takes channels and labels from the dataset
    assert _run(["dataset", "add", str(root), "--images", str(image), "--label", str(label), "--patient", "PAT-8"]) == 0
    assert "(2 case(s) in the dataset)" in capsys.readouterr().out
    info = ds.load_dataset(root)
    assert info.channels == ["CT"] and info.labels == {"background": 0, "spleen": 1, "liver": 2}
    assert len({c.patient for c in info.cases}) == 2
    assert "PAT-7" not in (root / "dataset.json").read_text()
    np.testing.assert_array_equal(ds.read_case(info, "case_0002")[1].array, read_volume(label).array)

    assert _run(["dataset", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cases: 2" in out and "liver" in out and "result: OK" in out
    assert _run(["dataset", "check", "--json", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["label_voxels"]["liver"] > 1000


def test_dataset_add_refuses_bad_label(tmp_path: Path, ct_files: tuple[Path, Path]) -> None:
    image, label = ct_files
    root = tmp_path / "ds"
    with pytest.raises(MedSegAIInputError, match=r"label value\(s\) \[2\]"):
        _run(["dataset", "add", str(root), "--images", str(image), "--label", str(label), "--labels", '{"spleen": 1}'])
    with pytest.raises(MedSegAIInputError, match="--labels must be JSON"):
        _run(["dataset", "add", str(root), "--images", str(image), "--label", str(label), "--labels", "spleen=1"])
    with pytest.raises(MedSegAIInputError, match="does not exist"):
        _run(["dataset", "add", str(root), "--images", str(tmp_path / "nope.nrrd"), "--label", str(label)])
    assert not (root / "images").exists() or not list((root / "images").iterdir())


def test_dataset_check_broken_exits_2(tmp_path: Path, ct_files: tuple[Path, Path],
                                      capsys: pytest.CaptureFixture) -> None:
    image, label = ct_files
    root = tmp_path / "ds"
    for key in ("a", "b"):
        _run(["dataset", "add", str(root), "--images", str(image), "--label", str(label), "--patient", key,
              "--labels", '{"spleen": 1, "liver": 2}'])
    broken = root / "labels" / "case_0002.nrrd"
    broken.write_bytes(broken.read_bytes()[:300])
    capsys.readouterr()
    assert _run(["dataset", "check", str(root)]) == 2
    captured = capsys.readouterr()
    assert "ERROR case_0002 (labels/case_0002.nrrd)" in captured.out
    assert "case_0001" not in captured.out.split("errors:")[1]
    assert "1 error(s)" in captured.err
    empty = ds.create_dataset(tmp_path / "empty", ["CT"], {"liver": 1})
    assert _run(["dataset", "check", str(empty)]) == 2
    assert "no cases" in capsys.readouterr().out


def test_cli_main_exit_code(tmp_path: Path, ct_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    """Through the real ``medsegai`` entry point: user errors print ``error:`` and exit 2."""
    from MedSegAILib import cli

    image, label = ct_files
    root = tmp_path / "ds"
    assert cli.main(["dataset", "add", str(root), "--images", str(image), "--label", str(label),
                     "--labels", '{"spleen": 1}']) == 2
    assert "error: The label volume contains label value(s) [2]" in capsys.readouterr().err
    assert cli.main(["dataset", "check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out


def _write_nnunet_v2(raw: Path, ct_files: tuple[Path, Path]) -> None:
    image, label = ct_files
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    ct = sitk.ReadImage(str(image))
    lab = sitk.ReadImage(str(label))
    for index, crop in enumerate([slice(0, 30), slice(5, 25)], start=1):
        sitk.WriteImage(ct[:, :, crop], str(raw / "imagesTr" / f"abd_{index:03d}_0000.nii.gz"))
        sitk.WriteImage(lab[:, :, crop], str(raw / "labelsTr" / f"abd_{index:03d}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1, "liver": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))


def test_import_nnunet_v2(tmp_path: Path, ct_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    raw, root = tmp_path / "Dataset001_Abd", tmp_path / "imported"
    _write_nnunet_v2(raw, ct_files)
    assert _run(["dataset", "import-nnunet", str(raw), str(root)]) == 0
    assert "imported 2 case(s) from a nnunet-v2 folder" in capsys.readouterr().out
    info = ds.load_dataset(root)
    assert [c.id for c in info.cases] == ["case_0001", "case_0002"]
    assert info.labels == {"background": 0, "spleen": 1, "liver": 2}
    assert info.cases[0].patient != info.cases[1].patient
    images, label = ds.read_case(info, "case_0002")
    original = read_volume(raw / "imagesTr" / "abd_002_0000.nii.gz")
    np.testing.assert_array_equal(images[0].array, original.array)
    assert images[0].same_grid(original) and label.shape == (20, 101, 122)
    assert ds.check_dataset(root).ok
    assert "abd_00" not in (root / "dataset.json").read_text()
    with pytest.raises(MedSegAIInputError, match="already exists"):
        import_nnunet(raw, root)


def test_import_nnunet_missing_channel_names_case(tmp_path: Path, ct_files: tuple[Path, Path]) -> None:
    raw = tmp_path / "raw"
    _write_nnunet_v2(raw, ct_files)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CTlate"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegAIInputError, match=r"case abd_001: channel 'CTlate' file imagesTr/abd_001_0001.nii.gz"):
        import_nnunet(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    meta["channel_names"] = {"0": "CT"}
    meta["labels"] = {"background": 0, "organs": [1, 2]}
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegAIInputError, match="region-based"):
        import_nnunet(raw, tmp_path / "out")
    meta["labels"] = {"background": 0, "spleen": 1}
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MedSegAIInputError, match=r"case abd_001: .*label value\(s\) \[2\]"):
        import_nnunet(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.importing-*"))


def test_import_msd_4d_splits_channels(tmp_path: Path, shared_data: Path) -> None:
    study = shared_data / "mr-brain-tumor" / "PGBM-003" / "1995-03-29"
    raw = tmp_path / "Task01_BrainTumour"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    t1 = sitk.Cast(sitk.ReadImage(str(study / "T1post.nrrd")), sitk.sitkFloat32)
    flair = sitk.Cast(sitk.ReadImage(str(study / "FLAIR.nrrd")), sitk.sitkFloat32)
    flair.CopyInformation(t1)
    sitk.WriteImage(sitk.JoinSeries([t1, flair]), str(raw / "imagesTr" / "BRATS_003.nii.gz"))
    mask = sitk.ReadImage(str(study / "MaskTumor.nrrd"))
    mask.CopyInformation(t1)
    sitk.WriteImage(mask, str(raw / "labelsTr" / "BRATS_003.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "name": "BrainTumour", "modality": {"0": "T1post", "1": "FLAIR"},
        "labels": {"0": "background", "1": "tumor"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/BRATS_003.nii.gz", "label": "./labelsTr/BRATS_003.nii.gz"}]}))
    result = import_nnunet(raw, tmp_path / "brain")
    assert result.layout == "msd" and result.channels == ["T1post", "FLAIR"]
    assert result.labels == {"background": 0, "tumor": 1}
    info = ds.load_dataset(tmp_path / "brain")
    images, label = ds.read_case(info, result.case_ids[0])
    np.testing.assert_array_equal(images[0].array, sitk.GetArrayFromImage(t1))
    np.testing.assert_array_equal(images[1].array, sitk.GetArrayFromImage(flair))
    np.testing.assert_allclose(images[1].spacing, t1.GetSpacing(), rtol=1e-5)
    assert label.array.sum() == sitk.GetArrayFromImage(mask).sum() > 0
    (raw / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1post", "1": "FLAIR", "2": "T2"}, "labels": {"0": "background", "1": "tumor"},
        "training": [{"image": "./imagesTr/BRATS_003.nii.gz", "label": "./labelsTr/BRATS_003.nii.gz"}]}))
    with pytest.raises(MedSegAIInputError, match="BRATS_003.*3 modalities"):
        import_nnunet(raw, tmp_path / "brain3")


def test_evaluate_command(tmp_path: Path, ct_small: Path, analytic_model_dir: Path,
                          capsys: pytest.CaptureFixture) -> None:
    from analytic_models import THRESHOLD_HU

    image = read_volume(ct_small)
    root = tmp_path / "bone"
    ds.add_case(root, [image], image.with_array((image.array > THRESHOLD_HU).astype(np.uint8)), ["CT"], {"bone": 1})
    report = tmp_path / "report"
    assert _run(["evaluate", "--model", str(analytic_model_dir), str(root), "-o", str(report),
                 "--backend", "onnx", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bone" in out and "1.000" in out
    assert sorted(p.name for p in report.iterdir()) == ["best_worst.png", "metrics.csv", "metrics.json"]
    with pytest.raises(MedSegAIInputError, match="not empty"):
        _run(["evaluate", "--model", str(analytic_model_dir), str(root), "-o", str(report)])
