"""A minimal PNG codec for 8-bit grayscale images (the Pathfinder format), with numpy + zlib only.

Writing uses filter type 0 and a fixed zlib level, so the same array always gives the same bytes.
Reading handles all five PNG row filters and checks chunk CRCs; anything but 8-bit grayscale,
non-interlaced images raises DataError naming the file.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from efformer.errors import DataError

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a (height, width) uint8 array."""
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise DataError(f"encode_png expects a 2-D uint8 array, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1).tobytes()  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a (height, width) uint8 array as a grayscale PNG, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_png(image))
    os.replace(tmp, path)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """(height, width) uint8 array from the bytes of an 8-bit grayscale PNG."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DataError(f"{name}: decode_png needs the file's bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(SIGNATURE):
        raise DataError(f"{name}: not a PNG file (bad signature)")
    pos, ihdr, idat = len(SIGNATURE), None, []
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise DataError(f"{name}: truncated PNG chunk {kind!r}")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise DataError(f"{name}: CRC mismatch in PNG chunk {kind!r} (corrupt file)")
        if kind == b"IHDR":
            if length != 13:
                raise DataError(f"{name}: PNG header chunk IHDR has {length} bytes, expected 13 (corrupt file)")
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    else:
        if pos < len(data):
            raise DataError(f"{name}: truncated PNG: the file ends inside a chunk header at byte {pos}")
    if ihdr is None or not idat:
        raise DataError(f"{name}: PNG without IHDR or IDAT chunk (truncated or not an image file)")
    w, h, depth, color, _, _, interlace = ihdr
    if w < 1 or h < 1:
        raise DataError(f"{name}: PNG image is {w}x{h}; width and height must be >= 1 (corrupt file)")
    if depth != 8 or color != 0 or interlace != 0:
        raise DataError(f"{name}: only 8-bit grayscale non-interlaced PNGs are supported "
                        f"(got bit depth {depth}, colour type {color}, interlace {interlace})")
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
        raise DataError(f"{name}: corrupt PNG image data ({e})") from None
    if raw.size != h * (w + 1):
        raise DataError(f"{name}: PNG data has {raw.size} bytes, expected {h * (w + 1)} for {w}x{h}")
    rows = raw.reshape(h, w + 1)
    out = np.zeros((h, w), np.uint8)
    prev = np.zeros(w, np.uint8)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:
            cur = np.cumsum(line, dtype=np.uint8)  # wraps modulo 256 like the filter
        elif f == 2:
            cur = line + prev
        elif f in (3, 4):
            cur, left = np.zeros(w, np.uint8), 0
            for x in range(w):
                up = int(prev[x])
                pred = (left + up) >> 1 if f == 3 else _paeth(left, up, int(prev[x - 1]) if x else 0)
                left = (int(line[x]) + pred) & 0xFF
                cur[x] = left
        else:
            raise DataError(f"{name}: unknown PNG filter type {f} in row {y}")
        out[y], prev = cur, cur
    return out


def read_png(path: str | Path) -> np.ndarray:
    """(height, width) uint8 array of an 8-bit grayscale PNG file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror})") from None
    return decode_png(data, str(path))


__all__ = ["decode_png", "encode_png", "read_png", "write_png"]
