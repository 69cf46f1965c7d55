"""One gzip member compressed on several threads (the way ``pigz`` does it).

A label map of a 512² × 200 CT is 52 MB of mostly zeros; ``zlib`` at level 1 needs ~0.05 s for it
on one core, which is most of the time it takes to write a ``.seg.nrrd`` file. Here the buffer is
cut into blocks, each block is deflated on its own by a pool thread (``zlib`` releases the GIL),
every block but the last ends with a sync flush (an empty stored block, byte-aligned, not final),
and the raw deflate streams are concatenated into one gzip member: any gzip reader sees a single,
ordinary stream. The CRC-32 of each block is computed beside its compression and the block CRCs
are combined (zlib's ``crc32_combine``, which the Python module does not expose).
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

__all__ = ["crc32_combine", "gzip_blocks", "write_gzip"]

_MIN_BLOCK = 4 << 20  # smaller blocks cost more in flush bytes and pool hand-offs than they gain
_BLOCKS_PER_THREAD = 2  # a few blocks per thread even out blocks that compress at different speeds
_CRC32_POLYNOMIAL = 0xEDB88320  # reflected CRC-32 (gzip, zlib.crc32)


def _multiply_mod(a: int, b: int) -> int:
    """``a(x) * b(x)`` modulo the CRC-32 polynomial, both in the reflected bit order of a CRC register."""
    product = 0
    mask = 1 << 31
    while mask and a & (2 * mask - 1):  # bits of a left at or below mask
        if a & mask:
            product ^= b
        mask >>= 1
        b = (b >> 1) ^ _CRC32_POLYNOMIAL if b & 1 else b >> 1
    return product


@functools.lru_cache(maxsize=1)
def _powers_of_x() -> tuple[int, ...]:
    """``[k]``: ``x**(2**k)`` modulo the CRC-32 polynomial, k = 0 .. 66 (enough for 2**64 bytes)."""
    power = 1 << 30  # x**1
    powers = [power]
    for _ in range(66):
        power = _multiply_mod(power, power)
        powers.append(power)
    return tuple(powers)


def crc32_combine(crc_first: int, crc_second: int, length_second: int) -> int:
    """CRC-32 of ``first + second`` from ``crc32(first)``, ``crc32(second)`` and ``len(second)``.

    zlib's ``crc32_combine``: appending ``n`` bytes multiplies the first CRC by ``x**(8 n)``
    modulo the CRC polynomial; that power is assembled from the powers ``x**(2**k)``.

    Args:
        crc_first: ``zlib.crc32(first)``.
        crc_second: ``zlib.crc32(second)``.
        length_second: ``len(second)`` in bytes, 0 .. 2**64 - 1.

    Raises:
        ValueError: ``length_second`` is out of that range.
    """
    if not 0 <= length_second < 1 << 64:
        raise ValueError(f"length_second must be in 0 .. 2**64 - 1, got {length_second}")
    powers = _powers_of_x()
    shift = 1 << 31  # x**0
    for bit in range(length_second.bit_length()):
        if length_second >> bit & 1:
            shift = _multiply_mod(powers[bit + 3], shift)  # 2**bit bytes = 2**(bit + 3) bits
    return _multiply_mod(shift, crc_first & 0xFFFFFFFF) ^ (crc_second & 0xFFFFFFFF)


def _deflate(block: memoryview, level: int, last: bool) -> tuple[bytes, int]:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = compressor.compress(block) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return data, zlib.crc32(block)


def gzip_blocks(buffer: memoryview | bytes, level: int = 1, threads: int = 1) -> Iterator[bytes]:
    """The bytes of one gzip member holding ``buffer``, compressed on ``threads`` threads.

    Args:
        buffer: the data (any contiguous bytes-like object; cast to bytes view, not copied).
        level: zlib level 1 (fastest) .. 9 (smallest).
        threads: worker threads; 1 compresses in the calling thread.

    Yields:
        The gzip header, the compressed blocks in order, then the trailer (CRC-32, size).

    Raises:
        ValueError: ``level`` not in 1..9 or ``threads`` < 1.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
        raise ValueError(f"level must be an integer 1..9, got {level!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    view = memoryview(buffer).cast("B")
    size = len(view)
    extra_flags = 4 if level == 1 else (2 if level == 9 else 0)
    yield struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, extra_flags, 255)  # no name, no mtime, OS unknown
    count = 1 if threads == 1 else max(1, min(threads * _BLOCKS_PER_THREAD, size // _MIN_BLOCK))
    bounds = [size * index // count for index in range(count + 1)]
    blocks = [view[low:high] for low, high in zip(bounds[:-1], bounds[1:])]
    last = len(blocks) - 1
    if count == 1:
        parts = iter([_deflate(blocks[0], level, True)])
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="medsegai-gzip")
        futures = [pool.submit(_deflate, block, level, index == last) for index, block in enumerate(blocks)]
        parts = (future.result() for future in futures)
    try:
        crc = 0
        for block, (data, block_crc) in zip(blocks, parts):
            crc = crc32_combine(crc, block_crc, len(block))
            yield data
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    yield struct.pack("<II", crc, size & 0xFFFFFFFF)


def write_gzip(handle: BinaryIO, buffer: memoryview | bytes, level: int = 1, threads: int = 1) -> int:
    """Write ``buffer`` to ``handle`` as one gzip member (see :func:`gzip_blocks`); returns bytes written."""
    written = 0
    for part in gzip_blocks(buffer, level, threads):
        handle.write(part)
        written += len(part)
    return written
