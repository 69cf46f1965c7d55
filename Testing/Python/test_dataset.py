"""The dataset folder format (MedSegAILib.data.dataset): round trip, no overwrite, hashed patient keys,
no identifiers in names/headers, and every bad-input case reported with case id and file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from MedSegAILib.data import dataset as ds
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.io.imageio import read_volume

LABELS = {"spleen": 1, "liver": 2}


@pytest.fixture(scope="module")
def ct_case(ct_small: Path, ct_small_labels: Path) -> tuple[Volume, Volume]:
    """Real abdomen CT with liver (TotalSegmentator 5 -> 2) and spleen (1 -> 1) labels."""
    image = read_volume(ct_small)
    seg = read_volume(ct_small_labels)
    label = np.zeros(seg.shape, np.uint8)
    label[seg.array == 1] = 1
    label[seg.array == 5] = 2
    assert (label == 1).sum() > 100 and (label == 2).sum() > 1000
    return image, seg.with_array(label)


def _nrrd_header(path: Path) -> str:
    data = path.read_bytes()
    return data[: data.index(b"\n\n")].decode("ascii")


def test_add_case_round_trip_real_ct(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    image, label = ct_case
    root = tmp_path / "ds"
    case_id = ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="patient-A",
                          source_model={"id": "ct-abdomen-organs", "version": "1.0.0"}, changed_voxels=123)
    assert case_id == "case_0001"
    assert (root / "images" / "case_0001_0000.nrrd").is_file()
    assert (root / "labels" / "case_0001.nrrd").is_file()
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["format"] == "medsegai-dataset" and meta["version"] == 1
    assert meta["channels"] == ["CT"]
    assert meta["labels"] == {"background": 0, "spleen": 1, "liver": 2}
    entry = meta["cases"][0]
    assert entry["images"] == ["images/case_0001_0000.nrrd"] and entry["label"] == "labels/case_0001.nrrd"
    assert entry["source_model"] == {"id": "ct-abdomen-organs", "version": "1.0.0"}
    assert entry["changed_voxels"] == 123

    info = ds.load_dataset(root)
    assert info.root == root.resolve() and [c.id for c in info.cases] == ["case_0001"]
    assert info.cases[0].images[0].is_absolute()
    images, read_label = ds.read_case(info, "case_0001")
    assert images[0].array.dtype == image.array.dtype
    np.testing.assert_array_equal(images[0].array, image.array)
    np.testing.assert_allclose(images[0].spacing, image.spacing)
    np.testing.assert_allclose(images[0].origin, image.origin, atol=1e-4)
    np.testing.assert_allclose(images[0].direction, image.direction, atol=1e-6)
    assert read_label.array.dtype == np.uint8
    np.testing.assert_array_equal(read_label.array, label.array)
    assert read_label.same_grid(image)

    report = ds.check_dataset(root)
    assert report.ok, report.format()
    assert report.num_cases == 1 and report.num_patients == 1
    assert report.label_voxels["liver"] == int((label.array == 2).sum())
    assert report.label_voxels["spleen"] == int((label.array == 1).sum())
    assert report.geometry["sizes_xyz"]["min"] == [122, 101, 30]
    assert "liver" in report.format()


def test_second_case_never_overwrites(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    image, label = ct_case
    root = tmp_path / "ds"
    first = ds.add_case(root, [image], label, ["CT"], LABELS)
    before = (root / "labels" / "case_0001.nrrd").read_bytes()
    edited = label.array.copy()
    edited[10, 40:50, 40:50] = 2
    second = ds.add_case(root, [image], label.with_array(edited), ["CT"], LABELS)
    assert (first, second) == ("case_0001", "case_0002")
    assert (root / "labels" / "case_0001.nrrd").read_bytes() == before
    info = ds.load_dataset(root)
    np.testing.assert_array_equal(ds.read_case(info, "case_0002")[1].array, edited)
    np.testing.assert_array_equal(ds.read_case(info, "case_0001")[1].array, label.array)
    # a stray file with the next id (e.g. from an interrupted export) is skipped, never replaced
    stray = root / "labels" / "case_0003.nrrd"
    stray.write_bytes(b"not mine")
    third = ds.add_case(root, [image], label, ["CT"], LABELS)
    assert third == "case_0004" and stray.read_bytes() == b"not mine"
    with pytest.raises(MedSegAIInputError, match="already exists"):
        ds._write_clean_nrrd(root / "labels" / "case_0001.nrrd", label)
    assert (root / "labels" / "case_0001.nrrd").read_bytes() == before


def test_patient_key_is_salted_hash(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    image, label = ct_case
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="PAT-0042")
        ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="PAT-0042")
        ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="PAT-0099")
        ds.add_case(root, [image], label, ["CT"], LABELS)
    pa = [c.patient for c in ds.load_dataset(a).cases]
    pb = [c.patient for c in ds.load_dataset(b).cases]
    assert pa[0] == pa[1] != pa[2] and pa[3] not in pa[:3]
    assert all(p.startswith("p_") and len(p) == 18 for p in pa)
    assert pa[0] != pb[0], "different datasets must use different salts"
    assert len(ds.load_dataset(a).patients()) == 3
    for root in (a, b):
        text = (root / "dataset.json").read_text()
        assert "PAT-0042" not in text and "0042" not in text
        salt = json.loads(text)["patient_salt"]
        assert ds.hash_patient_key("PAT-0042", salt) == json.loads(text)["cases"][0]["patient"]


def test_no_identifiers_in_names_or_headers(tmp_path: Path, brain_dicom_study: Path) -> None:
    """The shared brain DICOM study carries PatientName/ID 'PGBM-001' and the study date 19920402."""
    import pydicom

    first = sorted((brain_dicom_study / "dicom" / "T1post").iterdir())[0]
    header = pydicom.dcmread(first, stop_before_pixels=True)
    identifiers = {str(header.PatientName), str(header.PatientID), str(header.StudyDate)}
    if header.get("PatientBirthDate"):
        identifiers.add(str(header.PatientBirthDate))
    assert "PGBM-001" in identifiers and "19920402" in identifiers

    image = read_volume(brain_dicom_study / "dicom" / "T1post")
    mask = read_volume(brain_dicom_study / "dicom" / "MaskTumor")
    mask = mask.with_array((mask.array > 0).astype(np.uint8))
    root = tmp_path / "export"
    ds.add_case(root, [image], mask, ["T1post"], {"tumor": 1}, patient_key=str(header.PatientID),
                source_model={"id": "brain", "version": "1"}, changed_voxels=0)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 3
    for path in files:
        for identifier in identifiers | {"1992-04-02", "1992"}:
            assert identifier not in str(path.relative_to(tmp_path))
        if path.suffix == ".nrrd":
            head = _nrrd_header(path)
            keys = {line.split(":")[0] for line in head.splitlines()[1:] if ":" in line and not line.startswith("#")}
            assert keys <= {"type", "dimension", "space", "sizes", "space directions", "kinds", "endian",
                            "encoding", "space origin"}, keys
            raw = gzip.decompress(path.read_bytes()[len(head) + 2:])
            content = head.encode() + raw
        else:
            content = path.read_bytes()
        for identifier in identifiers | {"1992-04-02"}:
            assert identifier.encode() not in content, (path.name, identifier)


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    root = ds.create_dataset(tmp_path / "empty", ["CT"], {"liver": 1})
    report = ds.check_dataset(root)
    assert not report.ok
    assert "no cases" in report.errors[0].message and report.errors[0].file == "dataset.json"
    with pytest.raises(MedSegAIInputError, match="problem"):
        report.raise_if_errors()
    missing = ds.check_dataset(tmp_path / "nothing-here")
    assert not missing.ok and "does not exist" in missing.errors[0].message


def test_add_case_rejects_bad_input(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    image, label = ct_case
    root = tmp_path / "ds"
    with pytest.raises(MedSegAIInputError, match=r"label value\(s\) \[5\]"):
        bad = label.array.copy()
        bad[0, 0, 0] = 5
        ds.add_case(root, [image], label.with_array(bad), ["CT"], LABELS)
    shifted = Volume(label.array, label.spacing, (label.origin[0] + 3.0, *label.origin[1:]), label.direction)
    with pytest.raises(MedSegAIInputError, match="not on the image grid"):
        ds.add_case(root, [image], shifted, ["CT"], LABELS)
    with pytest.raises(MedSegAIInputError, match="one volume per channel"):
        ds.add_case(root, [image], label, ["CT", "PET"], LABELS)
    assert not (root / "images").exists() or not any((root / "images").iterdir())
    ds.add_case(root, [image], label, ["CT"], LABELS)
    with pytest.raises(MedSegAIInputError, match="has labels"):
        ds.add_case(root, [image], label, ["CT"], {"liver": 1, "spleen": 2})
    with pytest.raises(MedSegAIInputError, match="has channels"):
        ds.add_case(root, [image], label, ["MR"], LABELS)
    with pytest.raises(ValueError, match="unique"):
        ds.add_case(root, [image], label, ["CT"], {"liver": 1, "spleen": 1})
    assert [c.id for c in ds.load_dataset(root).cases] == ["case_0001"]


def _two_case_dataset(tmp_path: Path, ct_case: tuple[Volume, Volume], channels: int = 1) -> Path:
    image, label = ct_case
    names = ["CT", "CTcopy"][:channels]
    root = tmp_path / "ds"
    ds.add_case(root, [image] * channels, label, names, LABELS, patient_key="a")
    ds.add_case(root, [image] * channels, label, names, LABELS, patient_key="b")
    assert ds.check_dataset(root).ok
    return root


def _only_error(report: ds.DatasetReport) -> ds.DatasetProblem:
    assert len(report.errors) == 1, report.format()
    return report.errors[0]


def test_check_label_value_not_in_dataset_json(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    root = _two_case_dataset(tmp_path, ct_case)
    image, label = ct_case
    bad = label.array.copy()
    bad[5, 5, 5] = 7
    path = root / "labels" / "case_0002.nrrd"
    path.unlink()
    ds._write_clean_nrrd(path, label, bad)
    problem = _only_error(ds.check_dataset(root))
    assert (problem.case, problem.file) == ("case_0002", "labels/case_0002.nrrd")
    assert "[7]" in problem.message and "not in dataset.json" in problem.message
    assert str(problem).startswith("case_0002 (labels/case_0002.nrrd): ")
    with pytest.raises(MedSegAIInputError, match=r"case_0002 \(labels/case_0002.nrrd\)"):
        ds.read_case(ds.load_dataset(root), "case_0002")


def test_check_grid_mismatch(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    root = _two_case_dataset(tmp_path, ct_case)
    image, label = ct_case
    path = root / "labels" / "case_0001.nrrd"
    path.unlink()
    cropped = Volume(label.array[:, :, :-4], label.spacing, label.origin, label.direction)
    ds._write_clean_nrrd(path, cropped)
    problem = _only_error(ds.check_dataset(root))
    assert (problem.case, problem.file) == ("case_0001", "labels/case_0001.nrrd")
    assert "118x101x30" in problem.message and "122x101x30" in problem.message
    with pytest.raises(MedSegAIInputError, match="case_0001.*grid"):
        ds.read_case(ds.load_dataset(root), "case_0001")


def test_check_channel_missing(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    root = _two_case_dataset(tmp_path, ct_case, channels=2)
    (root / "images" / "case_0002_0001.nrrd").unlink()
    problem = _only_error(ds.check_dataset(root))
    assert (problem.case, problem.file) == ("case_0002", "images/case_0002_0001.nrrd")
    assert "'CTcopy'" in problem.message and "missing" in problem.message
    # a case entry that lists fewer files than channels
    meta = json.loads((root / "dataset.json").read_text())
    meta["cases"][0]["images"] = meta["cases"][0]["images"][:1]
    (root / "dataset.json").write_text(json.dumps(meta))
    report = ds.check_dataset(root)
    assert {(p.case, p.file) for p in report.errors} == {
        ("case_0001", "dataset.json"), ("case_0002", "images/case_0002_0001.nrrd")}
    assert any("CTcopy" in p.message for p in report.errors if p.case == "case_0001")
    with pytest.raises(MedSegAIInputError, match="case_0001"):
        ds.load_dataset(root)


def test_check_corrupt_file(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    root = _two_case_dataset(tmp_path, ct_case)
    path = root / "images" / "case_0001_0000.nrrd"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = ds.check_dataset(root)
    problem = _only_error(report)
    assert (problem.case, problem.file) == ("case_0001", "images/case_0001_0000.nrrd")
    assert "corrupt" in problem.message
    assert report.bad_cases() == ["case_0001"]
    with pytest.raises(MedSegAIInputError, match=r"case_0001 \(images/case_0001_0000.nrrd\)"):
        ds.read_case(ds.load_dataset(root), "case_0001")
    (root / "dataset.json").write_text("{not json")
    broken = ds.check_dataset(root)
    assert not broken.ok and broken.errors[0].file == "dataset.json" and "not valid JSON" in broken.errors[0].message


def test_create_dataset_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("hello")
    with pytest.raises(MedSegAIInputError, match="not empty"):
        ds.create_dataset(tmp_path / "mine", ["CT"], {"liver": 1})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "hello"


def test_concurrent_exports_get_distinct_cases(tmp_path: Path, ct_case: tuple[Volume, Volume]) -> None:
    import os
    import subprocess
    import sys
    import threading

    image, label = ct_case
    root = tmp_path / "ds"
    ds.create_dataset(root, ["CT"], LABELS)
    # a lock left behind by a process that died is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = root / ".medsegai-dataset.lock"
    lock.write_text(dead.stdout.strip())
    old = lock.stat().st_mtime - 5
    os.utime(lock, (old, old))
    ids: list[str] = []
    errors: list[BaseException] = []

    def export(key: str) -> None:
        try:
            ids.append(ds.add_case(root, [image], label, ["CT"], LABELS, patient_key=key))
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=export, args=(f"p{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(ids) == ["case_0001", "case_0002", "case_0003"]
    cases = ds.load_dataset(root).cases
    assert sorted(c.id for c in cases) == sorted(ids) and len({c.patient for c in cases}) == 3
    assert not lock.exists()
    assert ds.check_dataset(root).ok


def test_export_waits_for_a_live_lock_then_says_busy(tmp_path: Path, ct_case: tuple[Volume, Volume], monkeypatch) -> None:
    import subprocess
    import sys

    image, label = ct_case
    root = tmp_path / "ds"
    ds.create_dataset(root, ["CT"], LABELS)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from MedSegAILib.core.filelock import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], 5, 'busy'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n",
            str(root / ".medsegai-dataset.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(ds, "_LOCK_WAIT_S", 0.3)
        with pytest.raises(MedSegAIInputError, match="busy with another export"):
            ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="p0")
        assert ds.load_dataset(root).cases == []
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert ds.add_case(root, [image], label, ["CT"], LABELS, patient_key="p0") == "case_0001"
