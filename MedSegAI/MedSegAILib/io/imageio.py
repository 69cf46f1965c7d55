"""Read and write 3D images: NRRD, NIfTI, MetaImage files and DICOM folders.

Every reader returns a :class:`MedSegAILib.core.image.Volume` (array ``(z, y, x)``, LPS geometry) with
the file's own voxel type (int16 CT stays int16). Every writer is atomic: it writes a temporary
file next to the destination and renames it into place, so a failed or cancelled run never leaves
a partial output, and an existing file is only replaced when ``overwrite`` is true.
"""

from __future__ import annotations

import contextlib
import gzip
import mmap
import os
import secrets
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .dicom import DicomSeriesInfo, is_dicom_file, read_dicom_series, scan_dicom_folder
from ..core.errors import MedSegAIInputError
from ..core.image import Volume

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "read_volume",
    "write_volume",
    "list_dicom_series",
    "atomic_output",
    "full_suffix",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")
"""File name endings :func:`read_volume` accepts (besides a DICOM folder)."""

WRITABLE_SUFFIXES: tuple[str, ...] = (".nrrd", ".nii", ".nii.gz", ".mha")
"""File name endings :func:`write_volume` writes (``.mhd`` needs a second data file, so not atomic)."""

# NRRD fields that move the voxels away from "right after the header, packed": not memory-mapped
_NRRD_LAYOUT_FIELDS = {"data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"}
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz", ".tar.gz")
_EXPECTED = "a 3D scalar (grey-value) volume"


def full_suffix(path: str | os.PathLike) -> str:
    """Lower-case file ending, keeping compound endings whole (``.nii.gz``, ``.seg.nrrd``)."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """List the DICOM image series found (recursively) in ``folder``.

    Raises:
        MedSegAIInputError: ``folder`` is not a folder or holds no DICOM images.
    """
    return scan_dicom_folder(folder)


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a 3D scalar image file or a DICOM series folder.

    Args:
        path: ``.nrrd``, ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd`` file, or a folder searched
            recursively for DICOM files.
        series_uid: SeriesInstanceUID to read when the DICOM folder holds several series
            (ignored for image files).

    Returns:
        Volume with array ``(z, y, x)`` in the file's voxel type and LPS geometry. DICOM series
        have rescale slope/intercept applied; their metadata holds ``modality``,
        ``series_description`` and ``series_uid`` (never patient data).

    Raises:
        MedSegAIInputError: missing, unsupported, unreadable or truncated file; 2D, 4D or
            RGB/vector image; unusable DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise MedSegAIInputError(f"input {path} does not exist; check the path.")
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    suffix = full_suffix(path)
    if suffix == ".seg.nrrd":
        suffix = ".nrrd"
    if suffix not in SUPPORTED_SUFFIXES:
        if is_dicom_file(path):
            raise MedSegAIInputError(
                f"{path} is a single DICOM file; pass the folder that holds the whole DICOM series instead."
            )
        raise MedSegAIInputError(
            f"{path} has an unsupported file type {suffix or '(no extension)'!r}; pass a "
            f"{', '.join(SUPPORTED_SUFFIXES)} file or a DICOM folder."
        )
    return _read_image_file(path)


def _nifti_expected_size(header: bytes) -> int | None:
    """Bytes a complete NIfTI-1/2 file holds (voxel offset + voxel data), from its header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]], dtype=np.int64))
    return max(offset, 348) + count * bitpix // 8


def _nifti_is_complete(path: Path) -> bool:
    """False when a .nii/.nii.gz file holds fewer bytes than its header announces.

    ITK reads truncated NIfTI files without an error (the missing voxels become 0), so check the
    size: the file size for ``.nii``; for ``.nii.gz`` the gzip trailer's size field, and when that
    does not match (e.g. multi-member gzip), a full decompression pass.
    """
    if full_suffix(path) == ".nii":
        with open(path, "rb") as handle:
            expected = _nifti_expected_size(handle.read(544))
        return expected is None or path.stat().st_size >= expected
    try:
        with gzip.open(path, "rb") as handle:
            expected = _nifti_expected_size(handle.read(544))
    except (OSError, EOFError):
        return False
    if expected is None:
        return True
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
            return True
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError):
        return False
    return total >= expected


def _read_image_file(path: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise MedSegAIInputError(
            f"{path} could not be read as a {full_suffix(path)} image (damaged, truncated or not an image file); "
            "check the file or export it again."
        ) from e
    dimension = reader.GetDimension()
    size = tuple(reader.GetSize())
    components = reader.GetNumberOfComponents()
    size_text = "x".join(str(s) for s in size)
    if components != 1:
        raise MedSegAIInputError(
            f"{path} is a {size_text} image with {components} values per voxel (RGB, vector or multi-layer "
            f"image), but MedSegAI needs {_EXPECTED}; convert it to greyscale or pass one channel per file."
        )
    if dimension == 4 and size[3] == 1:
        dimension, squeeze = 3, True
    else:
        squeeze = False
    if dimension > 3:
        raise MedSegAIInputError(
            f"{path} is a {dimension}D image ({size_text} voxels, e.g. a time series), but MedSegAI needs "
            f"{_EXPECTED}; extract one 3D volume and pass that file."
        )
    if dimension < 3 or min(size[:3]) <= 1:
        raise MedSegAIInputError(
            f"{path} is a 2D image ({size_text} voxels), but MedSegAI needs {_EXPECTED} with several "
            "slices; pass the whole 3D scan."
        )
    truncated = MedSegAIInputError(
        f"{path} could not be read completely (damaged or truncated file); check the file or export it again."
    )
    if full_suffix(path) in (".nii", ".nii.gz") and not _nifti_is_complete(path):
        raise truncated
    mapped = None
    if not squeeze:
        mapped = _mapped_raw_nifti(path, reader) if full_suffix(path) == ".nii" else _mapped_raw_nrrd(path, reader)
    if mapped is not None:
        volume = Volume(mapped, reader.GetSpacing(), reader.GetOrigin(), np.array(reader.GetDirection()).reshape(3, 3))
    else:
        try:
            image = reader.Execute()
        except RuntimeError as e:
            raise truncated from e
        if squeeze:
            image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
        volume = Volume.from_sitk(image)
    if not np.all(np.isfinite(volume.direction)) or abs(np.linalg.det(volume.direction)) < 1e-6:
        raise MedSegAIInputError(f"{path} has an invalid orientation (direction) matrix; fix the file header.")
    return volume


def _numpy_dtype(pixel_id: int) -> np.dtype | None:
    """The numpy type of a scalar SimpleITK pixel type, or None."""
    import SimpleITK as sitk

    types = {
        sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16, sitk.sitkInt16: np.int16,
        sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32, sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64,
        sitk.sitkFloat32: np.float32, sitk.sitkFloat64: np.float64,
    }  # fmt: skip
    found = types.get(pixel_id)
    return None if found is None else np.dtype(found)


_NRRD_HEADER_LIMIT = 1 << 20  # an attached NRRD header is a few hundred bytes; refuse to scan further


def _nrrd_header(handle: BinaryIO) -> dict[str, str] | None:
    """The raw fields of an attached NRRD header (``field: value``, lower-case names); None if not NRRD.

    Leaves ``handle`` just after the blank line that ends the header, where the voxels start.
    Key/value pairs (``key:=value``) and comments are skipped; values stay strings.
    """
    magic = handle.readline(64)
    if not magic.startswith(b"NRRD000"):
        return None
    fields: dict[str, str] = {}
    while handle.tell() < _NRRD_HEADER_LIMIT:
        raw = handle.readline(_NRRD_HEADER_LIMIT)
        if not raw:
            return None  # no data part
        line = raw.decode("latin-1").rstrip()
        if not line:
            return fields
        if line.startswith("#"):
            continue
        name, separator, value = line.partition(":")
        if not separator:
            return None
        if value.startswith("="):  # a key/value pair, not a field
            continue
        fields[name.strip().lower()] = value.strip()
    return None


def _mapped_raw_nrrd(path: Path, reader: Any) -> np.ndarray | None:
    """The voxels of an uncompressed single-file 3D NRRD, memory-mapped read-only, or None.

    Mapping costs no read and no copy: pages are read when the engine first touches them (slab
    by slab, while the network runs) and are shared with the page cache. Only the plain layout
    is mapped (attached header, ``raw`` encoding, native byte order, no skips, scalar voxels of
    the type ITK reports, the file exactly header + voxels long); anything else returns None and
    is read by ITK as before. ``reader``: an ``ImageFileReader`` after ``ReadImageInformation``.
    """
    if full_suffix(path) not in (".nrrd", ".seg.nrrd") or reader.GetDimension() != 3:
        return None
    dtype = _numpy_dtype(reader.GetPixelID())
    if dtype is None:
        return None
    try:
        with open(path, "rb") as handle:
            header = _nrrd_header(handle)
            if header is None:
                return None
            shape = tuple(int(n) for n in reversed(reader.GetSize()))
            kinds = header.get("kinds", "domain domain domain").split()
            if (
                header.get("encoding") != "raw"
                or header.get("dimension") != "3"
                or header.get("sizes", "").split() != [str(n) for n in reversed(shape)]
                or set(header) & _NRRD_LAYOUT_FIELDS
                or (dtype.itemsize > 1 and header.get("endian") != sys.byteorder)
                or not set(kinds) <= {"domain", "space"}
            ):
                return None
            return _mapped_voxels(handle, handle.tell(), shape, dtype)
    except (OSError, ValueError):
        return None


def _mapped_voxels(handle: BinaryIO, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The ``shape`` voxels at ``offset`` of an open file that ends exactly after them, memory-mapped
    read-only (the mapping outlives ``handle``); None when the file's size says otherwise."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.fstat(handle.fileno()).st_size != offset + nbytes:
        return None
    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)


# NIfTI ``datatype`` codes of scalar voxels -> numpy type
_NIFTI_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8,
                512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64}


def _nifti_layout(header: bytes) -> tuple[str, np.dtype, tuple[int, ...], int, float, float] | None:
    """``(byte order, voxel type, dims (x, y, z, ...), voxel offset, scl_slope, scl_inter)`` of a
    single-file NIfTI-1 header (magic ``n+1``); None for anything else (NIfTI-2 included)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348 and header[344:348] == b"n+1\0":
            break
    else:
        return None
    datatype = struct.unpack(order + "h", header[70:72])[0]
    dims = struct.unpack(order + "8h", header[40:56])
    offset, slope, inter = struct.unpack(order + "3f", header[108:120])
    if datatype not in _NIFTI_TYPES or not 1 <= dims[0] <= 7 or offset != int(offset):
        return None
    return order, np.dtype(_NIFTI_TYPES[datatype]), tuple(int(d) for d in dims[1 : 1 + dims[0]]), int(offset), slope, inter


def _mapped_raw_nifti(path: Path, reader: Any) -> np.ndarray | None:
    """The voxels of an uncompressed single-file 3D ``.nii``, memory-mapped read-only, or None.

    As :func:`_mapped_raw_nrrd`, for the plain layout only: NIfTI-1 in one file, native byte
    order, 3 dimensions of the size ITK reports, the voxel type ITK reports, no intensity scaling
    (``scl_slope`` 0 or 1, ``scl_inter`` 0: ITK would return rescaled floats), the file exactly
    header + voxels long. Anything else returns None and is read by ITK.
    """
    dtype = _numpy_dtype(reader.GetPixelID())
    if reader.GetDimension() != 3 or dtype is None:
        return None
    try:
        with open(path, "rb") as handle:
            layout = _nifti_layout(handle.read(544))
            if layout is None:
                return None
            order, stored, dims, offset, slope, inter = layout
            shape = tuple(int(n) for n in reversed(reader.GetSize()))
            if (
                stored != dtype
                or list(dims) != list(reversed(shape))
                or (dtype.itemsize > 1 and order != ("<" if sys.byteorder == "little" else ">"))
                or slope not in (0.0, 1.0)
                or inter != 0.0
                or offset < 348
            ):
                return None
            return _mapped_voxels(handle, offset, shape, dtype)
    except (OSError, ValueError, OverflowError, struct.error):
        return None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Context manager for writing ``path`` atomically.

    Yields a temporary path in the same folder with the same (compound) suffix; write the file
    there. On normal exit the temporary file replaces ``path`` (``os.replace``); on any exception
    it is removed and the exception propagates. Missing parent folders are created.

    Args:
        path: final output path.
        overwrite: replace an existing ``path``; otherwise an existing path is refused.

    Raises:
        MedSegAIInputError: ``path`` exists (and ``overwrite`` is false) or is a folder.
    """
    path = Path(path)
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = full_suffix(path)
    temp = path.parent / f".{path.name[: -len(suffix) or None]}.tmp-{secrets.token_hex(6)}{suffix}"
    with open(temp, "xb"):
        pass
    try:
        yield temp
        if not temp.is_file():
            raise RuntimeError(f"the writer did not create the temporary file {temp}")
        _refuse_existing(path, overwrite)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise MedSegAIInputError(f"output {path} is a folder; give a file name for the output.")
    if path.exists() and not overwrite:
        raise MedSegAIInputError(f"output {path} exists; pass --overwrite to replace it or choose another output path.")


def write_volume(
    path: str | os.PathLike, volume: Volume, overwrite: bool = False, compress: bool = True
) -> Path:
    """Write ``volume`` to an image file atomically, geometry unchanged.

    Args:
        path: ``.nrrd``, ``.nii``, ``.nii.gz`` or ``.mha`` output file.
        volume: array ``(z, y, x)``; bool is written as uint8, float16 as float32.
        overwrite: replace an existing file.
        compress: gzip/zlib-compress the voxels where the format allows.

    Returns:
        The written path.

    Raises:
        MedSegAIInputError: unsupported output suffix, or the path exists and ``overwrite`` is false.
        TypeError: ``volume`` is not a :class:`Volume`.
    """
    import SimpleITK as sitk

    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    path = Path(path)
    suffix = full_suffix(path)
    if suffix == ".seg.nrrd":
        suffix = ".nrrd"
    if suffix not in WRITABLE_SUFFIXES:
        raise MedSegAIInputError(
            f"cannot write {path}: unsupported output type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(WRITABLE_SUFFIXES)}."
        )
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = volume.with_array(array).to_sitk()
    with atomic_output(path, overwrite) as temp:
        sitk.WriteImage(image, str(temp), useCompression=compress)
    return path
