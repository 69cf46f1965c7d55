"""The PDF case report (`segment --report`, `medsegai report`): read back with pypdf and rendered with pdftoppm.

The report is written by MedSegAILib's own small PDF writer (numpy + Pillow only, as in Slicer's
Python), so these tests check it from the outside: page count, the text a reader extracts, the
embedded images, and a rendering by poppler that must show the scan and the coloured segments.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from MedSegAILib.cli import main
from MedSegAILib.report.pdfwriter import _HELVETICA, _HELVETICA_BOLD, PdfDocument, text_width

pypdf = pytest.importorskip("pypdf", reason="pypdf is a dev dependency: pip install -e .[dev]")


def read_pdf(path: Path) -> tuple[int, str, list]:
    reader = pypdf.PdfReader(str(path))
    text = "\n".join(page.extract_text() for page in reader.pages)
    images = [image for page in reader.pages for image in page.images]
    return len(reader.pages), " ".join(text.split()), images


def render_png(path: Path, tmp_path: Path) -> np.ndarray:
    """First page rendered by poppler's pdftoppm at 72 dpi, as an RGB array."""
    if shutil.which("pdftoppm") is None:
        pytest.fail("pdftoppm is missing: install poppler-utils (the Makefile's setup does on Debian/Ubuntu)")
    prefix = tmp_path / "render"
    subprocess.run(["pdftoppm", "-r", "72", "-png", "-singlefile", str(path), str(prefix)], check=True, timeout=120)
    return np.asarray(Image.open(f"{prefix}.png").convert("RGB")).astype(int)


def test_segment_report_on_real_ct(ct_small, tmp_path, new_file_mode) -> None:
    output, report, table = tmp_path / "ct.seg.nrrd", tmp_path / "case.pdf", tmp_path / "m.json"
    assert main(["segment", str(ct_small), "-o", str(output), "--measurements", str(table),
                 "--report", str(report), "--progress", "none"]) == 0
    assert report.stat().st_mode & 0o777 == new_file_mode
    assert not list(tmp_path.glob(".*tmp*"))
    pages, text, images = read_pdf(report)
    assert pages == 1
    for expected in ("MedSegAI case report", "ct-abdomen-organs", "1.1.0", "NOT FOR CLINICAL USE", "Apache-2.0",
                     "CT: 122 x 101 x 30 voxels, spacing 3.00 x 3.00 x 3.00 mm", "Patient identifiers are not shown",
                     "leave-one-patient-out", "0.932", "page 1/1"):
        assert expected in text, expected
    rows = json.loads(table.read_text())
    found = [row for row in rows if row["voxel_count"] > 0]
    assert {row["name"] for row in found} >= {"liver", "spleen"}
    for row in rows:  # the measurements table shows exactly what the measurements file holds
        assert row["name"] in text
        if row["voxel_count"]:
            assert f"{row['volume_ml']:.2f}" in text and f"{row['max_diameter_mm']:.1f}" in text
    assert [image.image.size[0] > 100 for image in images] == [True] * 3
    axial = np.asarray(images[0].image.convert("RGB")).astype(int)
    assert axial.std() > 20  # a scan, not a flat picture

    page = render_png(report, tmp_path)
    assert page.shape[0] == 842 and page.shape[1] in (595, 596)  # A4 at 72 dpi
    assert (page < 250).any(axis=2).mean() > 0.08  # far from blank
    views = page[200:480]
    # overlay colour blended at 45 % over grey: reddish pixels (R clearly above B) exist in the views
    assert ((views[..., 0] - views[..., 2] > 40) & (views.sum(axis=2) > 150)).sum() > 500


def test_report_command_identify_only_when_asked(brain_dicom_study, tmp_path) -> None:
    dicom = brain_dicom_study / "dicom"
    inputs = [str(dicom / name) for name in ("T1post", "T1prereg", "FLAIR")]
    header = pydicom.dcmread(next(p for p in sorted((dicom / "T1post").rglob("*")) if p.is_file()), stop_before_pixels=True)
    patient_id, patient_name = str(header.PatientID), str(header.PatientName)
    assert patient_id

    plain, identified = tmp_path / "plain.pdf", tmp_path / "named.pdf"
    assert main(["report", *inputs, "--labels", str(dicom / "MaskTumor"), "--model", "mr-brain-tumor", "-o", str(plain)]) == 0
    assert main(["report", *inputs, "--labels", str(dicom / "MaskTumor"), "--model", "mr-brain-tumor", "-o", str(identified),
                 "--report-identify"]) == 0
    _, text, images = read_pdf(plain)
    assert patient_id not in text and patient_name not in text and "not shown" in text
    assert patient_id.encode() not in plain.read_bytes()  # nor in the file's metadata
    assert "T1post (MR): 260 x 320 x 24 voxels" in text and "FLAIR (MR)" in text
    assert "tumor" in text and len(images) == 3
    _, named_text, _ = read_pdf(identified)
    assert f"Patient ID: {patient_id}" in named_text


def test_bad_report_paths_are_one_line_and_write_nothing(ct_small, tmp_path, capsys) -> None:
    output = tmp_path / "seg.nrrd"
    cases = [
        (["--report", str(tmp_path / "missing" / "case.pdf")], "does not exist"),
        (["--report", str(tmp_path / "case.txt")], ".pdf"),
        (["--report-identify"], "needs --report"),
    ]
    for extra, message in cases:
        assert main(["segment", str(ct_small), "-o", str(output), "--progress", "none", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
        assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "case.pdf"
    existing.write_bytes(b"keep me")
    assert main(["segment", str(ct_small), "-o", str(output), "--progress", "none", "--report", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me" and not output.exists()


def test_pdf_writer_text_and_tables() -> None:
    assert len(_HELVETICA) == len(_HELVETICA_BOLD) == 95
    assert text_width("MedSegAI", 10) == pytest.approx(10 * (833 + 556 + 556 + 667 + 556 + 556 + 667 + 278) / 1000)
    document = PdfDocument(title="t")
    page = document.new_page()
    page.text(40, 800, "brackets (a) \\ b, 3 mm\u00b3, \u2265 0.9 \u00d7 2")
    with pytest.raises(ValueError):
        page.image(np.zeros((4, 4), np.uint8), 0, 0, 10, 10)
    with pytest.raises(ValueError):
        PdfDocument().write(io.BytesIO())
    buffer = io.BytesIO()
    document.write(buffer)
    text = pypdf.PdfReader(io.BytesIO(buffer.getvalue())).pages[0].extract_text()
    assert "brackets (a) \\ b, 3 mm\u00b3, ? 0.9 \u00d7 2" in text  # outside WinAnsi: '?'
