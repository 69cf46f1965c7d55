"""parallel_gzip: one gzip member from blocks deflated on threads; CRC-32 combination."""

from __future__ import annotations

import gzip
import io
import os
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MedSegAILib.io.parallel_gzip import crc32_combine, gzip_blocks, write_gzip


def _one_member(data: bytes) -> bytes:
    """Decompress ``data`` as exactly one gzip member (nothing after it)."""
    decompressor = zlib.decompressobj(wbits=31)
    out = decompressor.decompress(data) + decompressor.flush()
    assert decompressor.eof and decompressor.unused_data == b""
    return out


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_real_label_map_round_trips_as_one_member(ct_small_label_map: np.ndarray, threads: int) -> None:
    labels = np.ascontiguousarray(np.tile(ct_small_label_map, (60, 1, 1)))  # 22 MB: up to 5 blocks of >= 4 MiB
    buffer = labels.tobytes()
    parts = list(gzip_blocks(labels.data, level=1, threads=threads))
    expected_blocks = 1 if threads == 1 else max(1, min(2 * threads, len(buffer) // (4 << 20)))
    assert len(parts) == expected_blocks + 2  # header, blocks, trailer
    data = b"".join(parts)
    assert _one_member(data) == buffer
    assert gzip.decompress(data) == buffer
    assert len(data) < len(buffer) / 10  # compressed, not stored


@pytest.mark.parametrize("size", [0, 1, (4 << 20) * 3 + 5])
def test_edge_sizes_and_random_data(size: int) -> None:
    buffer = os.urandom(size)
    handle = io.BytesIO()
    written = write_gzip(handle, buffer, level=6, threads=2)
    assert written == len(handle.getvalue())
    assert _one_member(handle.getvalue()) == buffer


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000), st.integers(0, 70_000))
def test_crc32_combine_equals_crc_of_concatenation(first: bytes, second: bytes, zeros: int) -> None:
    second = second + bytes(zeros)
    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == zlib.crc32(first + second)


def test_bad_arguments() -> None:
    for level in (0, 10, True, 1.0):
        with pytest.raises(ValueError, match="level"):
            list(gzip_blocks(b"x", level=level))
    for threads in (0, -1, False):
        with pytest.raises(ValueError, match="threads"):
            list(gzip_blocks(b"x", threads=threads))
    with pytest.raises(ValueError, match="length_second"):
        crc32_combine(0, 0, -1)
