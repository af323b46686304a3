"""Awkward inputs for the shard stage, built on the fly from a real photograph."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.data.sample_corpus import base_photographs


def photo(size=(96, 64)) -> Image.Image:
    return Image.fromarray(base_photographs()[1][1]).resize(size)  # the cat


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width=60000, height=60000) -> bytes:
    """A valid little PNG header that declares a gigantic image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    """A landscape photo stored with EXIF orientation 6 (display rotated 90 degrees)."""
    img = photo((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes())


def awkward_files() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected reject reason or None when it must be accepted)."""
    p = photo()
    jpeg = encode(p, "JPEG")
    rgba = p.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray((np.asarray(p.convert("L"), dtype=np.uint16) * 257))
    return {
        "good.jpg": (jpeg, None),
        "duplicate.jpg": (jpeg, None),
        "grey.png": (encode(p.convert("L"), "PNG"), None),
        "cmyk.jpg": (encode(p.convert("CMYK"), "JPEG"), None),
        "palette.png": (encode(p.convert("P"), "PNG"), None),
        "rgba.png": (encode(rgba, "PNG"), None),
        "sixteen.png": (encode(sixteen, "PNG"), None),
        "rotated.jpg": (exif_rotated(), None),
        "small.jpg": (encode(photo((20, 18)), "JPEG"), None),
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"this is not an image\n" * 20, "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (encode(p, "PNG")[:300], "truncated"),
        "tiny.png": (encode(photo((8, 8)), "PNG"), "too_small"),
        "bomb.png": (png_bomb(), "too_many_pixels"),
    }


def img2dataset_tar(path, images: dict[str, bytes]) -> None:
    """A tar laid out as img2dataset writes it: {key}.jpg, {key}.txt, {key}.json per sample."""
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for ext, payload in (("jpg", data), ("txt", f"caption of {key}".encode()),
                                 ("json", json.dumps({"key": key, "url": f"http://example.com/{key}"}).encode())):
                if ext == "jpg" and data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
