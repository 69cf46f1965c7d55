"""A small PDF writer that needs nothing beyond numpy and the standard library.

Enough for MedSegAI's case report: pages of text in the PDF base-14 fonts Helvetica and
Helvetica-Bold (WinAnsi encoding, so the text is extractable), filled rectangles, lines, and RGB
images (``(rows, columns, 3)`` uint8 numpy arrays, Flate-compressed). Coordinates are PDF points
(1/72 inch) with the origin at the bottom-left corner of the page. Slicer's own Python has no
reportlab or matplotlib; this module keeps the report writable there.
"""

from __future__ import annotations

import datetime as _dt
import zlib
from typing import BinaryIO, Sequence

import numpy as np

__all__ = ["A4", "PdfDocument", "PdfPage", "text_width"]

A4 = (595.28, 841.89)
_FONTS = {"regular": ("F1", "Helvetica"), "bold": ("F2", "Helvetica-Bold")}

# Helvetica advance widths (1/1000 em) of the printable ASCII range 32..126 (Adobe AFM).
_HELVETICA = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278,
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556,
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778,
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556,
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556,
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,
]  # fmt: skip
_HELVETICA_BOLD = [
    278, 333, 474, 556, 556, 889, 722, 238, 333, 333, 389, 584, 278, 333, 278, 278,
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611,
    975, 722, 722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778,
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 333, 278, 333, 584, 556,
    333, 556, 611, 556, 611, 556, 333, 611, 611, 278, 278, 556, 278, 889, 611, 611,
    611, 611, 389, 556, 333, 611, 556, 778, 556, 556, 500, 389, 280, 389, 584,
]  # fmt: skip


def _encode(text: str) -> bytes:
    """WinAnsi (cp1252) bytes of ``text``; characters outside it become ``?``."""
    return str(text).replace("\r", " ").replace("\n", " ").encode("cp1252", errors="replace")


def text_width(text: str, size: float, bold: bool = False) -> float:
    """Width in points of ``text`` set in Helvetica (``bold``: Helvetica-Bold) at ``size`` points."""
    table = _HELVETICA_BOLD if bold else _HELVETICA
    total = 0
    for byte in _encode(text):
        total += table[byte - 32] if 32 <= byte <= 126 else 556
    return total * size / 1000.0


def _escape(raw: bytes) -> bytes:
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _number(value: float) -> str:
    text = f"{float(value):.3f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _color(rgb: Sequence[float]) -> str:
    if len(rgb) != 3 or not all(0.0 <= float(c) <= 1.0 for c in rgb):
        raise ValueError(f"colour must be 3 numbers in [0, 1], got {rgb!r}")
    return " ".join(_number(c) for c in rgb)


class PdfPage:
    """One page: drawing calls append to its content stream."""

    def __init__(self, size: tuple[float, float]) -> None:
        self.width, self.height = float(size[0]), float(size[1])
        self._ops: list[bytes] = []
        self._images: list[tuple[str, np.ndarray]] = []

    def text(self, x: float, y: float, text: str, size: float = 10.0, bold: bool = False,
             color: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """Draw one line of ``text`` with its baseline starting at ``(x, y)``."""
        if size <= 0:
            raise ValueError(f"font size must be positive, got {size!r}")
        font = _FONTS["bold" if bold else "regular"][0]
        self._ops.append(
            f"BT /{font} {_number(size)} Tf {_color(color)} rg {_number(x)} {_number(y)} Td (".encode("ascii")
            + _escape(_encode(text)) + b") Tj ET"
        )

    def rect(self, x: float, y: float, width: float, height: float, fill: Sequence[float] | None = None,
             stroke: Sequence[float] | None = None, line_width: float = 0.5) -> None:
        """A rectangle with its lower-left corner at ``(x, y)``, filled and/or outlined."""
        if fill is None and stroke is None:
            raise ValueError("rect needs a fill or a stroke colour")
        ops = [f"{_number(line_width)} w"]
        if fill is not None:
            ops.append(f"{_color(fill)} rg")
        if stroke is not None:
            ops.append(f"{_color(stroke)} RG")
        paint = "B" if fill is not None and stroke is not None else ("f" if fill is not None else "S")
        ops.append(f"{_number(x)} {_number(y)} {_number(width)} {_number(height)} re {paint}")
        self._ops.append(" ".join(ops).encode("ascii"))

    def line(self, x1: float, y1: float, x2: float, y2: float, width: float = 0.5,
             color: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """A straight line from ``(x1, y1)`` to ``(x2, y2)``."""
        self._ops.append(
            f"{_number(width)} w {_color(color)} RG {_number(x1)} {_number(y1)} m {_number(x2)} {_number(y2)} l S".encode("ascii")
        )

    def image(self, rgb: np.ndarray, x: float, y: float, width: float, height: float) -> None:
        """Place an RGB image (``(rows, columns, 3)`` uint8, row 0 at the top) in the given box."""
        array = np.asarray(rgb)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or array.size == 0:
            raise ValueError(f"image must be a non-empty (rows, columns, 3) uint8 array, got {array.shape} {array.dtype}")
        name = f"Im{len(self._images) + 1}"
        self._images.append((name, np.ascontiguousarray(array)))
        self._ops.append(
            f"q {_number(width)} 0 0 {_number(height)} {_number(x)} {_number(y)} cm /{name} Do Q".encode("ascii")
        )


class PdfDocument:
    """Pages, then :meth:`write` to a binary file handle.

    Args:
        title: the document title (Info dictionary); never put patient data here.
        page_size: ``(width, height)`` in points; A4 portrait by default.
    """

    def __init__(self, title: str = "", page_size: tuple[float, float] = A4) -> None:
        if len(page_size) != 2 or min(page_size) <= 0:
            raise ValueError(f"page_size must be (width, height) > 0, got {page_size!r}")
        self.title = str(title)
        self.page_size = (float(page_size[0]), float(page_size[1]))
        self.pages: list[PdfPage] = []

    def new_page(self) -> PdfPage:
        """Add an empty page and return it."""
        page = PdfPage(self.page_size)
        self.pages.append(page)
        return page

    def write(self, handle: BinaryIO) -> None:
        """Serialise the document (PDF 1.4, classic cross-reference table)."""
        if not self.pages:
            raise ValueError("a PDF needs at least one page")
        objects: list[bytes] = []

        def add(body: bytes) -> int:
            objects.append(body)
            return len(objects)

        def stream(dictionary: str, data: bytes) -> bytes:
            packed = zlib.compress(data, 6)
            return f"<< {dictionary} /Filter /FlateDecode /Length {len(packed)} >>\nstream\n".encode("ascii") + packed + b"\nendstream"

        catalog = add(b"")  # filled once the page tree's number is known
        pages_id = add(b"")
        fonts = {
            key: add(f"<< /Type /Font /Subtype /Type1 /BaseFont /{base} /Encoding /WinAnsiEncoding >>".encode("ascii"))
            for key, (_, base) in _FONTS.items()
        }
        font_resources = " ".join(f"/{_FONTS[key][0]} {number} 0 R" for key, number in fonts.items())
        kids = []
        for page in self.pages:
            xobjects = []
            for name, array in page._images:
                rows, columns = array.shape[:2]
                number = add(stream(
                    f"/Type /XObject /Subtype /Image /Width {columns} /Height {rows} /ColorSpace /DeviceRGB /BitsPerComponent 8",
                    array.tobytes(),
                ))
                xobjects.append(f"/{name} {number} 0 R")
            content = add(stream("", b"\n".join(page._ops)))
            resources = f"/Font << {font_resources} >>" + (f" /XObject << {' '.join(xobjects)} >>" if xobjects else "")
            kids.append(add(
                f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {_number(page.width)} {_number(page.height)}] "
                f"/Resources << {resources} >> /Contents {content} 0 R >>".encode("ascii")
            ))
        objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode("ascii")
        objects[pages_id - 1] = (
            f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>".encode("ascii")
        )
        created = _dt.datetime.now(_dt.timezone.utc).strftime("D:%Y%m%d%H%M%SZ")
        info = add(b"<< /Title (" + _escape(_encode(self.title)) + b") /Producer (MedSegAI) /CreationDate ("
                   + created.encode("ascii") + b") >>")

        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(len(out))
            out += f"{number} 0 obj\n".encode("ascii") + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode("ascii")
        for offset in offsets:
            out += f"{offset:010d} 00000 n \n".encode("ascii")
        out += f"trailer\n<< /Size {len(objects) + 1} /Root {catalog} 0 R /Info {info} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode("ascii")
        handle.write(bytes(out))
