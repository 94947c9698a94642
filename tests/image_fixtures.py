"""Crafted image files for the tests of the pixel limits (prepare, predict, serve)."""

from __future__ import annotations

import struct
import zlib


def png_declaring(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit grey PNG of width x height whose first `rows` scanlines (all, when None) are present, all black: a
    36-megapixel one is 4 kB and takes about a second to decode (the serve load test uses it as its slow request)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    stride = 1 + (width + 7) // 8
    n = height if rows is None else rows
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(bytes(stride * min(1000, n - i))) for i in range(0, n, 1000)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
